"""Leases and fencing: a worker that can no longer vouch for its lease stops writing to Odoo, and each worker
owns its leases under a name no other worker has."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest
from sqlalchemy import Engine, update

import gateway.worker as worker_mod
from gateway.config import parse_config
from gateway.schema import messages
from gateway.spool import Envelope, get_message, history, spool_one
from gateway.worker import LeaseKeeper, Outcome, Worker
from routing.model import Action, Decision, Target


def env() -> Envelope:
    return Envelope(mail_from="alice@client.test", rcpt_tos=("sales@example.test",), client_addr="127.0.0.1",
                    helo="client.test", listener="test")


def mail(mid: str) -> bytes:
    return f"Message-ID: {mid}\r\nSubject: t\r\n\r\n".encode() + b"hello\r\n"


def create(raw: bytes, msg: Any) -> Decision:
    return Decision(Action.CREATE, ("test",))


def test_a_worker_whose_lease_ran_out_stops_writing_to_odoo(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Renewals failed (store unreachable) while Odoo was slow: the lease ran out, another worker claimed and
    delivered the message, and the first went on with its Odoo writes (`LeaseKeeper.lost` was set and never
    read): a second lead. The delivery's Odoo calls now go through the worker's lease check."""
    from gateway.spool import check_lease

    def store_unreachable(*args: Any) -> bool:
        raise RuntimeError("store unavailable")

    monkeypatch.setattr(worker_mod, "renew_lease", store_unreachable)
    config = parse_config({"worker": {"lease_seconds": 1.0}}, base_dir=".")
    ident = spool_one(engine, mail("<slow@x>"), env())
    writes: list[str] = []
    other_claims: list[int] = []

    class SlowOdoo:
        def deliver(self, msg: Any, raw: bytes, decision: Decision) -> Outcome:
            check_lease()
            time.sleep(1.3)  # a slow read; the lease runs out meanwhile
            other_claims.append(second.run_once())
            check_lease()  # what the delivery's client does before its next call: the create
            writes.append("first")
            return Outcome("delivered", "ok by the first worker")

    class QuickOdoo:
        def deliver(self, msg: Any, raw: bytes, decision: Decision) -> Outcome:
            check_lease()
            writes.append("second")
            return Outcome("delivered", "ok by the second worker")

    first = Worker(config, engine, route=create, deliver=SlowOdoo())
    second = Worker(config, engine, route=create, deliver=QuickOdoo())
    assert first.run_once() == 1
    assert (other_claims, writes) == ([1], ["second"])
    m = get_message(engine, ident)
    assert m is not None and m.state == "delivered"
    assert [h["note"] for h in history(engine, ident) if h["state"] == "delivered"] == ["ok by the second worker"]


def test_the_delivery_asks_the_lease_before_each_odoo_call(sqlite_engine: Engine) -> None:
    """`Delivery` is shared by the worker threads: the check comes from the calling thread's context, and
    every call on the Odoo client passes it first."""
    from gateway.delivery import Delivery
    from gateway.spool import LeaseLost, lease_fence

    calls: list[str] = []

    class Client:
        def __getattr__(self, name: str) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                calls.append(name)
                raise RuntimeError("stop here: the test only looks at whether the call was made")
            return call

    config = parse_config({"domains": [{"name": "example.test"}]}, base_dir=".")
    delivery = Delivery(config, sqlite_engine, Client())  # type: ignore[arg-type]
    ident = spool_one(sqlite_engine, mail("<fenced@x>"), env())
    msg = get_message(sqlite_engine, ident)
    assert msg is not None
    decision = Decision(Action.CREATE, ("test",), targets=(Target(model="crm.lead", alias="sales@example.test"),),
                        message_id="<fenced@x>", recipients=("sales@example.test",))

    def lost() -> None:
        raise LeaseLost("lease on message lost")

    token = lease_fence.set(lost)
    try:
        with pytest.raises(LeaseLost):
            delivery.deliver(msg, mail("<fenced@x>"), decision)
    finally:
        lease_fence.reset(token)
    assert calls == []
    token = lease_fence.set(lambda: None)
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            delivery.deliver(msg, mail("<fenced@x>"), decision)
    finally:
        lease_fence.reset(token)
    assert calls == ["message_process"]


def test_a_late_renewal_of_the_previous_message_leaves_the_next_one_alone(
        sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The keeper renews from a thread of its own: a renewal of message 1 answered (lost) after the worker
    moved on to message 2 must not fence message 2."""
    asked, answer = threading.Event(), threading.Event()

    def slow_refusal(engine: Any, ident: int, owner: str, lease: float) -> bool:
        if ident == 1:
            asked.set()
            answer.wait(10)
            return False  # message 1 is another worker's by now
        return True

    monkeypatch.setattr(worker_mod, "renew_lease", slow_refusal)
    keeper = LeaseKeeper(sqlite_engine, "w", lease_seconds=0.3)
    with keeper.holding(1, time.monotonic()):
        assert asked.wait(5)
    with keeper.holding(2, time.monotonic()):
        answer.set()
        time.sleep(0.05)
        keeper.fence()  # not lost: the answer was about message 1
        assert not keeper.lost


def test_workers_of_look_alike_containers_have_owners_of_their_own(sqlite_engine: Engine,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Containers of one image share the host name and, each in its own pid namespace, the pid: their first
    workers were both `host:1:w1` and took each other's leases for their own."""
    config = parse_config({}, base_dir=".")
    owners = []
    for _ in range(2):  # a fresh process each: the same host name, pid and worker number
        monkeypatch.setattr(worker_mod, "_WORKER_SEQ", itertools.count(1))
        owners.append(Worker(config, sqlite_engine, route=create, deliver=None).owner)
    assert owners[0] != owners[1]


def test_a_routing_only_worker_leaves_routed_mail_to_delivery_at_once(engine: Engine) -> None:
    """A worker without [odoo] routes and stops at `routed`; it kept the lease there, so a delivery worker on
    another node waited up to lease_seconds (120 s) for mail nobody was working on."""
    from gateway.worker import Outcome

    config = parse_config({}, base_dir=".")
    routing_only = Worker(config, engine, route=create, deliver=None, owner="router")
    quarantined = spool_one(engine, mail("<nowhere@x>"), env())
    ident = spool_one(engine, mail("<lead@x>"), env())

    def route(raw: bytes, msg: Any) -> Decision:
        if msg.id == quarantined:
            return Decision(Action.QUARANTINE, ("no alias",), reason="no route")
        return create(raw, msg)

    routing_only.route = route
    assert routing_only.run_once() == 1 and routing_only.run_once() == 1
    assert get_message(engine, quarantined).state == "quarantined"  # type: ignore[union-attr]
    assert get_message(engine, ident).state == "routed"  # type: ignore[union-attr]

    class Odoo:
        def deliver(self, msg: Any, raw: bytes, decision: Decision) -> Outcome:
            return Outcome("delivered", "ok")

    delivering = Worker(config, engine, route=create, deliver=Odoo(), owner="deliverer")
    assert delivering.run_once() == 1
    assert get_message(engine, ident).state == "delivered"  # type: ignore[union-attr]


def test_a_batch_claims_each_message_when_its_turn_comes(engine: Engine) -> None:
    """`run_once(batch=2)` claimed both messages at once and the keeper renewed only the one being delivered:
    the second sat under a lease nobody renewed, holding off other workers, then expired while the first was
    delivered (slow Odoo); another worker took it, and the first started it again when its turn came."""
    from gateway.spool import check_lease

    config = parse_config({"worker": {"lease_seconds": 1.0}}, base_dir=".")
    first_mail = spool_one(engine, mail("<one@x>"), env())
    second_mail = spool_one(engine, mail("<two@x>"), env())
    with engine.begin() as conn:  # routed earlier: delivery resumes with the stored decision
        conn.execute(update(messages).values(state="retrying", decision='{"action": "create", "explanation": []}',
                                             action="create"))
    started: list[tuple[str, int]] = []
    other_claims: list[int] = []

    class SlowOdoo:
        def deliver(self, msg: Any, raw: bytes, decision: Decision) -> Outcome:
            started.append(("first", msg.id))
            check_lease()
            if msg.id == first_mail:
                time.sleep(0.3)
                other_claims.append(second.run_once())  # the next message is free to take
                time.sleep(1.0)  # past the lease
                other_claims.append(second.run_once())
            check_lease()
            return Outcome("delivered", "ok")

    class QuickOdoo:
        def deliver(self, msg: Any, raw: bytes, decision: Decision) -> Outcome:
            started.append(("second", msg.id))
            return Outcome("delivered", "ok")

    first = Worker(config, engine, route=create, deliver=SlowOdoo(), owner="first")
    second = Worker(config, engine, route=create, deliver=QuickOdoo(), owner="second")
    assert first.run_once(batch=2) == 1
    assert other_claims == [1, 0]
    assert started == [("first", first_mail), ("second", second_mail)]
    states = [get_message(engine, i).state for i in (first_mail, second_mail)]  # type: ignore[union-attr]
    assert states == ["delivered", "delivered"]


def test_a_refusal_mail_is_not_sent_by_a_worker_that_lost_its_lease(sqlite_engine: Engine) -> None:
    """The refusal to a sender the alias does not take is mail out, sent once: like an Odoo write, it passes
    the lease check first, or the worker that lost the message and the one that took it over both sent it."""
    from gateway.delivery import Delivery
    from gateway.spool import LeaseLost, lease_fence
    from routing import msgdict

    config = parse_config({"domains": [{"name": "example.test"}]}, base_dir=".")
    delivery = Delivery(config, sqlite_engine, None)
    sent: list[str] = []
    delivery.refusals.refuse = lambda **kw: sent.append(kw["sender"]) or True  # type: ignore[method-assign]
    raw = mail("<refused@x>")
    msg = get_message(sqlite_engine, spool_one(sqlite_engine, raw, env()))
    assert msg is not None

    def lost() -> None:
        raise LeaseLost("lease on message lost")

    token = lease_fence.set(lost)
    try:
        with pytest.raises(LeaseLost):
            delivery._refuse(msg, raw, msgdict.parse_mail(raw), alias="vip@example.test", mid="<refused@x>")
    finally:
        lease_fence.reset(token)
    assert sent == []
    assert delivery._refuse(msg, raw, msgdict.parse_mail(raw), alias="vip@example.test", mid="<refused@x>") \
        == "; refusal sent" and sent == ["alice@client.test"]
