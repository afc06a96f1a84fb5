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


def test_a_released_message_is_routed_again_after_a_transient_routing_error(engine: Engine) -> None:
    """`release` kept the old decision: when the first routing after it failed transiently (Odoo's alias list
    not read yet), the message went to `retrying` and the next attempt reused the quarantine decision, so the
    release was silently undone. The old decision stays readable in the history."""
    from gateway.config import parse_config
    from gateway.errors import TransientError
    from gateway.spool import history
    from gateway.worker import Outcome, Worker
    from routing.model import Action, Decision

    routes = iter([Decision(Action.QUARANTINE, ("no alias for sales@",), reason="no route"),
                   TransientError("Odoo's aliases not loaded"), Decision(Action.CREATE, ("alias sales@",))])

    def route(raw: bytes, msg: Any) -> Decision:
        step = next(routes)
        if isinstance(step, Exception):
            raise step
        return step

    delivered: list[str] = []

    class Odoo:
        def deliver(self, msg: Any, raw: bytes, decision: Decision) -> Outcome:
            delivered.append(decision.action.value)
            return Outcome("delivered", "ok")

    worker = Worker(parse_config({}, base_dir="."), engine, route=route, deliver=Odoo(), owner="w")
    ident = spool_one(engine, mail("<q@x>"), env())
    assert worker.run_once() == 1 and get_message(engine, ident).state == "quarantined"  # type: ignore[union-attr]
    assert release(engine, ident, states=("quarantined",))
    m = get_message(engine, ident)
    assert m is not None and (m.decision, m.action) == (None, None)
    assert worker.run_once() == 1
    m = get_message(engine, ident)
    assert m is not None and m.state == "retrying"
    with engine.begin() as conn:  # the backoff is over
        conn.execute(update(messages).where(messages.c.id == ident).values(next_attempt_at=utcnow()))
    assert worker.run_once() == 1
    m = get_message(engine, ident)
    assert m is not None and (m.state, m.action, delivered) == ("delivered", "create", ["create"])
    states = [h["state"] for h in history(engine, ident)]
    assert states == ["received", "routed", "quarantined", "received", "retrying", "routed", "delivered"]
    assert "quarantine" in (history(engine, ident)[1]["note"] or "")
