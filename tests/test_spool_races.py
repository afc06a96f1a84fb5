"""Spool operations racing each other across connections: retention against an operator's release, and what
a release leaves for the worker to route."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import Engine, event, update

from gateway.schema import messages
from gateway.spool import Envelope, get_message, get_raw, purge_raw, release, spool_one, transition
from gateway.store import utcnow


def env() -> Envelope:
    return Envelope(mail_from="alice@client.test", rcpt_tos=("sales@example.test",), client_addr="127.0.0.1",
                    helo="client.test", listener="test")


def mail(mid: str) -> bytes:
    return f"Message-ID: {mid}\r\nSubject: t\r\n\r\n".encode() + b"hello\r\n"


def test_a_release_committed_while_retention_runs_keeps_its_body(engine: Engine) -> None:
    """Retention selected a dead message as finished; before it deleted the body, `dead retry` put the message
    back to `received` (its own transaction). The purge went on without looking again: the mail was
    `received` with no body, and the worker parked it dead as "raw body missing"."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite: retention's BEGIN IMMEDIATE keeps the release out until it committed")
    ident = spool_one(engine, mail("<dead@x>"), env())
    transition(engine, ident, "dead", note="permanent error", error="boom")
    with engine.begin() as conn:
        conn.execute(update(messages).where(messages.c.id == ident)
                     .values(updated_at=utcnow() - dt.timedelta(days=40)))
    released: list[bool] = []

    def release_after_the_select(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not released and statement.lstrip().upper().startswith("SELECT") and "raw_purged" in statement:
            released.append(release(engine, ident, states=("dead",)))

    event.listen(engine, "after_cursor_execute", release_after_the_select)
    try:
        purged = purge_raw(engine, utcnow() - dt.timedelta(days=30))
    finally:
        event.remove(engine, "after_cursor_execute", release_after_the_select)
    assert released == [True]
    m = get_message(engine, ident)
    assert m is not None and m.state == "received"
    assert (purged, m.raw_purged, get_raw(engine, ident)) == (0, False, mail("<dead@x>"))
