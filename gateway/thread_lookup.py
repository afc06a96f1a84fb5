"""Lookups the pure router needs, backed by the store (and Odoo on a miss).

* `IndexThreadLookup` — `routing.model.ThreadLookup` over `thread_index` (Message-IDs we relayed or
  delivered), falling back to Odoo's `mail.message.search_read` for the ids newer in the chain than the
  newest indexed one (all of them when none is indexed). Odoo answers are cached (and written back to the
  index), so a busy thread costs one RPC, not one per reply.
* `SpoolDuplicateLookup` — `routing.model.DuplicateLookup` over `messages`: the same Message-ID *and* body hash
  already delivered or dropped.

A failing Odoo lookup raises `gateway.errors.TransientError`: routing a reply as new mail because Odoo was
briefly down would create a stray record, so the worker retries instead.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from sqlalchemy import Engine, and_, delete, insert, select, update

from gateway.odoo.client import OdooClient, m2o_id
from gateway.schema import messages, outbound_mails, outbound_recipients, thread_index
from gateway.store import reading, utcnow
from routing.model import ThreadHit


MAX_REFERENCES = 100  # newest ids of a reference chain that `find` looks up (see its docstring)


class IndexThreadLookup:
    """The newest known message of a reference chain, by position in the chain: thread index, then Odoo
    (cached) for the ids newer than the newest indexed one."""

    def __init__(self, engine: Engine, client: OdooClient | None = None, *, cache_size: int = 10_000,
                 negative_ttl: float = 30.0):
        self.engine = engine
        self.client = client
        self.cache_size = cache_size
        self.negative_ttl = negative_ttl
        self._cache: OrderedDict[str, ThreadHit] = OrderedDict()
        self._misses: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        self.odoo_lookups = 0  # observable in tests and metrics

    def find(self, message_ids: list[str]) -> ThreadHit | None:
        """The record the newest known id of `message_ids` (oldest first, as in References) belongs to.

        Only the newest `MAX_REFERENCES` ids are looked up: a References header can hold any number (a
        crafted one, tens of thousands), and one query or RPC with all of them fails on SQLite's bound-variable
        limit — the message would be retried until it went dead. A real thread's parent is the last id.

        The chain's position decides, as Odoo's parent look-up does (In-Reply-To, then References newest
        first): an indexed id only wins when Odoo holds none of the ids after it. Outlook truncates References
        and keeps the direct parent in In-Reply-To; when that parent was posted in Odoo without passing
        through us, the older indexed id would put the reply on the wrong record."""
        ids = [m for m in dict.fromkeys(message_ids) if m][-MAX_REFERENCES:]
        if not ids:
            return None
        indexed = self._from_index(ids)
        if indexed is not None and indexed.message_id == ids[-1]:
            return indexed
        newer = ids[ids.index(indexed.message_id) + 1:] if indexed is not None else ids
        return self._from_odoo(newer) or indexed

    def _from_index(self, ids: list[str]) -> ThreadHit | None:
        position = {m: n for n, m in enumerate(ids)}
        with reading(self.engine) as conn:
            rows = conn.execute(select(thread_index).where(thread_index.c.message_id.in_(ids))).all()
        if not rows:
            return None
        row = max(rows, key=lambda r: (position.get(r.message_id, -1), r.id))
        return ThreadHit(message_id=row.message_id, model=row.model, res_id=row.res_id, outbound=bool(row.outbound),
                         is_internal=bool(row.is_internal))

    def _from_odoo(self, ids: list[str]) -> ThreadHit | None:
        if self.client is None:
            return None
        cached: ThreadHit | None = None
        with self._lock:
            # a cached answer stands for its id; the ids after it in the chain are still asked
            for n in range(len(ids) - 1, -1, -1):
                if ids[n] in self._cache:
                    self._cache.move_to_end(ids[n])
                    cached, ids = self._cache[ids[n]], ids[n + 1:]
                    break
            if not ids:
                return cached
            key = tuple(ids)
            missed_at = self._misses.get(key)
            if missed_at is not None and time.monotonic() - missed_at < self.negative_ttl:
                return cached
        self.odoo_lookups += 1
        rows = self.client.find_messages(ids, ["model", "res_id", "message_id", "is_internal"], limit=500)
        if not rows:
            with self._lock:
                self._misses[key] = time.monotonic()
                if len(self._misses) > self.cache_size:
                    self._misses.clear()
            return cached
        position = {m: n for n, m in enumerate(ids)}
        row = max(rows, key=lambda r: (position.get(r.get("message_id"), -1), int(r.get("id") or 0)))
        hit = ThreadHit(message_id=row["message_id"], model=row.get("model") or None,
                        res_id=row.get("res_id") or None, is_internal=bool(row.get("is_internal")))
        with self._lock:
            self._cache[hit.message_id] = hit
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if hit.model and hit.res_id:
            index_message(self.engine, hit.message_id, hit.model, hit.res_id, is_internal=hit.is_internal)
        return hit


def index_message(engine: Engine, message_id: str, model: str | None, res_id: int | None, *,
                  outbound: bool = False, is_internal: bool = False) -> bool:
    """Add a thread_index row unless (message_id, model, res_id) is already there; True when added."""
    with engine.begin() as conn:
        exists = conn.execute(select(thread_index.c.id).where(and_(
            thread_index.c.message_id == message_id, thread_index.c.model == model,
            thread_index.c.res_id == res_id)).limit(1)).first()
        if exists:
            return False
        conn.execute(insert(thread_index).values(message_id=message_id, model=model, res_id=res_id,
                                                 outbound=outbound, is_internal=is_internal, created_at=utcnow()))
    return True


def forget_record(engine: Engine, model: str, res_id: int) -> int:
    """The record was deleted in Odoo: its thread index rows must not route replies to it any more. Rows of
    mail we relayed keep their Message-ID (bounce and reply events still find the mail) but lose the record,
    so a reply to them is new mail, as in Odoo (route_reply_model_none). Returns the rows changed."""
    where = and_(thread_index.c.model == model, thread_index.c.res_id == res_id)
    with engine.begin() as conn:
        dropped = conn.execute(delete(thread_index).where(where, thread_index.c.outbound.is_(False))).rowcount
        kept = conn.execute(update(thread_index).where(where, thread_index.c.outbound.is_(True))
                            .values(model=None, res_id=None)).rowcount
    return int(dropped or 0) + int(kept or 0)


def is_outbound(engine: Engine, message_id: str | None) -> ThreadHit | None:
    """The thread_index row of a mail we relayed (outbound), or None."""
    if not message_id:
        return None
    with reading(engine) as conn:
        row = conn.execute(select(thread_index).where(thread_index.c.message_id == message_id,
                                                      thread_index.c.outbound.is_(True))
                           .order_by(thread_index.c.id.desc()).limit(1)).first()
    if row is None:
        return None
    return ThreadHit(message_id=row.message_id, model=row.model, res_id=row.res_id, outbound=True)


def replying_recipient(engine: Engine, message_id: str | None, sender: str | None) -> str | None:
    """Which recipient of the mail we relayed as `message_id` a reply or auto-reply from `sender` speaks
    for: the recipient with that address; else, when the mail had a single recipient, that one (people
    answer from another address of theirs, an out-of-office comes from a robot address); else `sender`.

    Follow-up steps wait on events per (mail, recipient): a `replied` event naming an address the mail was
    never sent to closed no step."""
    sender = (sender or "").strip()
    if not message_id:
        return sender or None
    with reading(engine) as conn:
        rows = conn.execute(select(outbound_recipients.c.recipient).select_from(
            outbound_recipients.join(outbound_mails, outbound_mails.c.id == outbound_recipients.c.mail)).where(
            outbound_mails.c.message_id == message_id)).all()
    recipients = list(dict.fromkeys(r.recipient for r in rows))
    for rcpt in recipients:
        if rcpt.lower() == sender.lower():
            return rcpt
    if len(recipients) == 1:
        return recipients[0]
    return sender or None


def record_of(engine: Engine, message_id: str | None) -> tuple[str | None, int | None]:
    """(model, res_id) the thread index knows for a Message-ID (for event records), else (None, None)."""
    if not message_id:
        return None, None
    with reading(engine) as conn:
        row = conn.execute(select(thread_index.c.model, thread_index.c.res_id)
                           .where(thread_index.c.message_id == message_id, thread_index.c.model.is_not(None))
                           .order_by(thread_index.c.id.desc()).limit(1)).first()
    return (row.model, row.res_id) if row else (None, None)


class SpoolDuplicateLookup:
    """Already handled: a spooled message with the same Message-ID and body hash was delivered or dropped."""

    DONE = ("delivered", "dropped")

    def __init__(self, engine: Engine, *, exclude_id: int | None = None):
        self.engine = engine
        self.exclude_id = exclude_id

    def seen(self, message_id: str | None, sha256: str) -> bool:
        cond: list[Any] = [messages.c.sha256 == sha256, messages.c.state.in_(self.DONE)]
        cond.append(messages.c.message_id == message_id if message_id else messages.c.message_id.is_(None))
        if self.exclude_id is not None:
            cond.append(messages.c.id != self.exclude_id)
        with reading(self.engine) as conn:
            return conn.execute(select(messages.c.id).where(and_(*cond)).limit(1)).first() is not None


__all__ = ["IndexThreadLookup", "SpoolDuplicateLookup", "forget_record", "index_message", "is_outbound", "record_of", "m2o_id"]
