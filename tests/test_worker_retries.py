"""The worker's retry bookkeeping: backoff, and how many failures of which kind park a message."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, update

from gateway.config import parse_config
from gateway.errors import TransientError
from gateway.schema import messages
from gateway.spool import Envelope, get_message, spool_one
from gateway.store import utcnow
from gateway.worker import Worker, backoff_delay
from routing.model import Action, Decision


def env() -> Envelope:
    return Envelope(mail_from="alice@client.test", rcpt_tos=("sales@example.test",), client_addr="127.0.0.1",
                    helo="client.test", listener="test")


def mail(mid: str, refs: str = "", body: bytes = b"hello\r\n") -> bytes:
    head = f"Message-ID: {mid}\r\n" + (f"References: {refs}\r\n" if refs else "") + "Subject: t\r\n\r\n"
    return head.encode() + body


def create(raw: bytes, msg: Any) -> Decision:
    return Decision(Action.CREATE, ("test",))


def test_backoff_after_a_thousand_attempts_is_the_cap_not_an_overflow(engine: Engine) -> None:
    """`base * 2 ** attempts` overflowed a float past 1,023 attempts (a 60 s cap under the 72 h horizon makes
    ~4,300): OverflowError escaped `run_once`, the message kept its lease and was never retried on time."""
    for attempts in (1023, 1024, 5000, 10 ** 9):
        assert 45.0 <= backoff_delay(attempts, 5.0, 60.0) <= 60.0

    class Odoo503:
        def deliver(self, msg: Any, raw: bytes, decision: Decision) -> Any:
            raise TransientError("Odoo HTTP 503")

    ident = spool_one(engine, mail("<o@x>"), env())
    with engine.begin() as conn:
        conn.execute(update(messages).values(attempts=1024))
    worker = Worker(parse_config({"worker": {"backoff_max": 60}}, base_dir="."), engine, route=create,
                    deliver=Odoo503(), owner="w")
    assert worker.run_once() == 1
    m = get_message(engine, ident)
    assert m is not None and (m.state, m.attempts) == ("retrying", 1025)
    assert m.next_attempt_at > utcnow()


def _due_now(engine: Engine) -> None:
    """Every backoff is over."""
    with engine.begin() as conn:
        conn.execute(update(messages).values(next_attempt_at=messages.c.received_at))


def test_a_mail_routing_keeps_crashing_on_is_parked_and_its_thread_moves_on(engine: Engine) -> None:
    """Routing is pure: an exception on one mail comes again on every try. It was retried to the 72 h horizon
    (delivery crashes stop after 5), and every later mail of its thread waited behind it all that time."""
    def route(raw: bytes, msg: Any) -> Decision:
        if b"poison" in raw:
            raise ValueError("router bug on this mail")
        return Decision(Action.CREATE, ("test",))

    delivered: list[int] = []

    class Odoo:
        def deliver(self, msg: Any, raw: bytes, decision: Decision) -> Any:
            delivered.append(msg.id)
            from gateway.worker import Outcome
            return Outcome("delivered", "ok")

    worker = Worker(parse_config({}, base_dir="."), engine, route=route, deliver=Odoo(), owner="w")
    root = spool_one(engine, mail("<root@x>", body=b"poison\r\n"), env())
    reply = spool_one(engine, mail("<reply@x>", refs="<root@x>"), env())
    for _ in range(12):
        _due_now(engine)
        worker.run_once()
    poisoned, answered = get_message(engine, root), get_message(engine, reply)
    assert poisoned is not None and answered is not None
    assert (poisoned.state, poisoned.attempts) == ("dead", 4)
    assert "ValueError: router bug on this mail" in (poisoned.last_error or "")
    assert answered.state == "delivered" and delivered == [reply]


def test_only_crashes_count_toward_the_crash_limit(engine: Engine) -> None:
    """The cap on unexpected exceptions read `attempts`, which transient faults raise too: four 503s during an
    Odoo restart, then one bug, and the mail was parked dead as "delivery crashed 5 times". A release starts
    the count again."""
    from gateway.spool import release

    faults = iter([TransientError("Odoo HTTP 503")] * 4 + [KeyError("one-off bug")] * 4
                  + [KeyError("the same bug")] * 5)

    class Odoo:
        def deliver(self, msg: Any, raw: bytes, decision: Decision) -> Any:
            raise next(faults)

    worker = Worker(parse_config({}, base_dir="."), engine, route=create, deliver=Odoo(), owner="w")
    ident = spool_one(engine, mail("<c@x>"), env())
    for _ in range(8):  # four transient faults, four crashes
        _due_now(engine)
        assert worker.run_once() == 1
    m = get_message(engine, ident)
    assert m is not None and (m.state, m.attempts) == ("retrying", 8), m.last_error
    _due_now(engine)
    assert worker.run_once() == 1
    m = get_message(engine, ident)
    assert m is not None and m.state == "dead" and "KeyError" in (m.last_error or "")
    assert release(engine, ident, states=("dead",))
    for _ in range(4):
        _due_now(engine)
        assert worker.run_once() == 1
    assert get_message(engine, ident).state == "retrying"  # type: ignore[union-attr]
    _due_now(engine)
    assert worker.run_once() == 1
    assert get_message(engine, ident).state == "dead"  # type: ignore[union-attr]
