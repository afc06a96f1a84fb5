"""The events outbox: event rows written in the same transaction as the fact that caused them.

Every producer (worker after delivery, outbound relay, tracking HTTP) builds `EventDraft`s and calls
`record_events(conn, drafts)` inside its own transaction. The event id is derived from a *seed* that names
the fact (e.g. "spool:42:bounced:bob@example.com"), so a retried transaction produces the same id and the
unique constraint turns the duplicate into a no-op: consumers see each fact once (ids stable across retries).
Dispatch (webhooks, pull API) lives in `gateway.events`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from gateway.fastsql import insert_rows
from gateway.schema import events
from gateway.store import utcnow

#: The event types of the contract (docs/events.md, schema version 1).
EVENT_TYPES = ("delivered", "deferred", "bounced", "opened", "clicked", "replied", "auto_replied", "complained")
SCHEMA_VERSION = 1


def spool_event_seed(spool_id: int, etype: str, recipient: str) -> str:
    """The fact behind a per-recipient event read from a spooled mail (a DSN's bounced or deferred). The
    relay names the DSN it spools for a failed copy with the same fact, so both give one event id."""
    return f"spool:{spool_id}:{etype}:{recipient.lower()}"


@dataclass(frozen=True)
class EventDraft:
    """An event about one sent mail (and recipient), before it has a sequence number."""

    type: str
    seed: str                              # names the fact; same fact → same id
    message_id: str | None = None          # Message-ID of the mail the event is about (the one we sent)
    model: str | None = None
    res_id: int | None = None
    recipient: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    occurred_at: dt.datetime | None = None

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {self.type!r}")

    @property
    def id(self) -> str:
        return "evt_" + hashlib.sha256(f"{self.type}\0{self.seed}".encode()).hexdigest()[:32]


def record_events(conn: Connection, drafts: list[EventDraft]) -> int:
    """Insert drafts not recorded yet (by id); returns how many were new. Call inside a transaction.

    One multi-row INSERT … ON CONFLICT (id) DO NOTHING for the batch (the relay records an event per recipient
    per result): a fact recorded before — a retried transaction, a duplicate in the batch — stays as it was."""
    if not drafts:
        return 0
    now = utcnow()
    rows = [{
        "id": d.id, "type": d.type, "occurred_at": d.occurred_at or now, "message_id": d.message_id,
        "model": d.model, "res_id": d.res_id, "recipient": d.recipient,
        "data": json.dumps(d.data, sort_keys=True, default=str),
    } for d in drafts]
    return insert_rows(conn, events, rows, skip_existing="id")


def event_to_json(row: Any) -> dict[str, Any]:
    """The wire form of one stored event (docs/events.md)."""
    m = row._mapping
    occurred = m["occurred_at"]
    # SQLite hands back naive UTC; PostgreSQL an aware time in the session's TimeZone (the server's zone by
    # default), which the contract's UTC must not depend on.
    occurred = occurred.replace(tzinfo=dt.timezone.utc) if occurred.tzinfo is None else \
        occurred.astimezone(dt.timezone.utc)
    record = {"model": m["model"], "id": m["res_id"]} if m["model"] else None
    return {
        "id": m["id"], "seq": m["seq"], "type": m["type"], "version": SCHEMA_VERSION,
        "occurred_at": occurred.isoformat(),
        "mail": {"message_id": m["message_id"], "record": record, "recipient": m["recipient"]},
        "data": json.loads(m["data"] or "{}"),
    }
