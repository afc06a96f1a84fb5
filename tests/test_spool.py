"""Storage tests, run against SQLite and (when configured) PostgreSQL: the spool's guarantees."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, select, update

from gateway.outbox import EventDraft, record_events
from gateway.schema import events, messages
from gateway.spool import (
    Envelope, SpoolWriter, claim, counts_by_state, delete_message, get_message, get_raw, header_facts, history,
    list_messages, purge_raw, release, spool_many, spool_one, transition,
)
from gateway.store import open_store, utcnow


def env(*rcpts: str) -> Envelope:
    return Envelope(mail_from="alice@client.test", rcpt_tos=rcpts or ("sales@example.test",), client_addr="127.0.0.1",
                    helo="client.test", listener="test")


def mail(mid: str, refs: str = "", body: bytes = b"hello\r\n") -> bytes:
    head = f"Message-ID: {mid}\r\n" + (f"References: {refs}\r\n" if refs else "") + "Subject: t\r\n\r\n"
    return head.encode() + body


def test_spool_is_byte_exact_with_envelope(engine: Engine) -> None:
    raw = mail("<a@x>", body=bytes(range(256)) * 4200 + b"\r\n")  # every byte value, >1 MiB (streamed blob path)
    ident = spool_one(engine, raw, env("sales@example.test", "Support@Example.test"))
    assert get_raw(engine, ident) == raw
    m = get_message(engine, ident)
    assert m is not None
    assert (m.state, m.message_id, m.size, m.rcpt_tos) == ("received", "<a@x>", len(raw),
                                                           ("sales@example.test", "Support@Example.test"))
    assert m.sha256 and m.client_addr == "127.0.0.1" and m.helo == "client.test"
    assert [h["state"] for h in history(engine, ident)] == ["received"]


def test_header_facts_thread_key_and_folded_ids() -> None:
    assert header_facts(mail("<a@x>")) == ("<a@x>", "<a@x>")
    assert header_facts(mail("<b@x>", refs="<root@x>\r\n <a@x>")) == ("<b@x>", "<root@x>")
    folded = b"Message-ID:\r\n <long.id.\r\n folded@x>\r\nIn-Reply-To: <p@x>\r\n\r\nbody"
    assert header_facts(folded) == ("<long.id.folded@x>", "<p@x>")
    assert header_facts(b"Subject: none\r\n\r\nMessage-ID: <in-body@x>\r\n") == (None, "")


async def test_group_commit_writer(engine: Engine) -> None:
    writer = SpoolWriter(engine, max_batch=16, max_wait_ms=5)
    ids = await asyncio.gather(*[writer.store(mail(f"<g{i}@x>"), env()) for i in range(100)])
    await writer.close()
    assert len(set(ids)) == 100
    assert {m.message_id for m in list_messages(engine, limit=500)} == {f"<g{i}@x>" for i in range(100)}


def test_claim_leases_are_exclusive_across_threads(engine: Engine) -> None:
    spool_many(engine, [(mail(f"<c{i}@x>"), env()) for i in range(60)])
    taken: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            got = claim(engine, name, limit=3, lease_seconds=60)
            if not got:
                return
            with lock:
                taken.extend(c.message.id for c in got)
            for c in got:
                assert transition(engine, c.message.id, "delivered", owner=name)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(set(taken)) and len(taken) == 60
    assert counts_by_state(engine)["delivered"] == 60


def test_expired_lease_is_taken_over_and_old_owner_cannot_finish(engine: Engine) -> None:
    ident = spool_one(engine, mail("<l@x>"), env())
    [first] = claim(engine, "crashed", lease_seconds=60)
    assert claim(engine, "other") == []  # still leased
    with engine.begin() as conn:  # the crashed worker's lease runs out
        conn.execute(update(messages).where(messages.c.id == ident)
                     .values(lease_until=utcnow() - dt.timedelta(seconds=1)))
    [second] = claim(engine, "other")
    assert second.message.id == first.message.id and second.raw == mail("<l@x>")
    assert not transition(engine, ident, "delivered", owner="crashed")
    assert transition(engine, ident, "delivered", owner="other")


def test_thread_order_older_message_blocks_newer(engine: Engine) -> None:
    a = spool_one(engine, mail("<root@x>"), env())
    b = spool_one(engine, mail("<reply@x>", refs="<root@x>"), env())
    other = spool_one(engine, mail("<unrelated@x>"), env())
    got = claim(engine, "w", limit=10)
    assert {c.message.id for c in got} == {a, other}  # the reply waits for its thread's root
    transition(engine, a, "retrying", owner="w", next_attempt_at=utcnow() + dt.timedelta(hours=1))
    assert claim(engine, "w2", limit=10) == []        # root still pending: reply still waits
    with engine.begin() as conn:
        conn.execute(update(messages).where(messages.c.id == a).values(next_attempt_at=utcnow()))
    [again] = claim(engine, "w2")
    assert again.message.id == a
    transition(engine, a, "delivered", owner="w2")
    [reply] = claim(engine, "w3")
    assert reply.message.id == b


def test_release_and_delete(engine: Engine) -> None:
    ident = spool_one(engine, mail("<q@x>"), env())
    [c] = claim(engine, "w")
    transition(engine, ident, "quarantined", owner="w", decision={"action": "quarantine", "explanation": ["no alias"]})
    assert list_messages(engine, states=["quarantined"])[0].action == "quarantine"
    assert release(engine, ident)
    assert get_message(engine, ident).state == "received"  # type: ignore[union-attr]
    assert not release(engine, ident)  # not quarantined any more
    assert delete_message(engine, ident)
    assert get_message(engine, ident) is None and get_raw(engine, ident) is None


def test_retention_purges_bodies_keeps_decisions(engine: Engine) -> None:
    """Bodies go `raw_days` after the message *finished*: one received 40 days ago and quarantined again
    today (an operator released it late) keeps its body, where it lost it at the next hourly pass."""
    old = spool_one(engine, mail("<old@x>"), env())
    new = spool_one(engine, mail("<new@x>"), env())
    pending = spool_one(engine, mail("<pending@x>"), env())
    late = spool_one(engine, mail("<late@x>"), env())
    long_ago = utcnow() - dt.timedelta(days=40)
    with engine.begin() as conn:
        conn.execute(update(messages).where(messages.c.id.in_([old, pending, late]))
                     .values(received_at=long_ago, updated_at=long_ago))
        conn.execute(update(messages).where(messages.c.id.in_([old, new]))
                     .values(state="delivered", decision='{"action": "create"}', action="create"))
        conn.execute(update(messages).where(messages.c.id == late).values(state="quarantined", updated_at=utcnow()))
    assert purge_raw(engine, utcnow() - dt.timedelta(days=30)) == 1
    assert get_raw(engine, old) is None and get_message(engine, old).raw_purged  # type: ignore[union-attr]
    assert get_message(engine, old).decision == {"action": "create"}  # type: ignore[union-attr]
    assert get_raw(engine, new) is not None and get_raw(engine, pending) is not None  # unfinished mail is kept
    assert get_raw(engine, late) is not None


def test_retention_purges_in_short_transactions(engine: Engine) -> None:
    """Every due body goes, a chunk per transaction (the spool writer waits for the lock between them)."""
    from sqlalchemy import event

    ids = [spool_one(engine, mail(f"<r{i}@x>"), env()) for i in range(8)]
    with engine.begin() as conn:
        conn.execute(update(messages).where(messages.c.id.in_(ids[:7]))
                     .values(state="delivered", updated_at=utcnow() - dt.timedelta(days=40)))
    commits: list[int] = []

    def count(conn: object) -> None:
        commits.append(1)

    event.listen(engine, "commit", count)
    try:
        assert purge_raw(engine, utcnow() - dt.timedelta(days=30), chunk=3) == 7
    finally:
        event.remove(engine, "commit", count)
    assert len(commits) == 4  # 3 + 3 + 1, then the query that finds nothing more
    assert [get_raw(engine, i) is None for i in ids] == [True] * 7 + [False]
    assert purge_raw(engine, utcnow() - dt.timedelta(days=30), chunk=3) == 0


def test_events_outbox_ids_stable_and_idempotent(engine: Engine) -> None:
    draft = EventDraft(type="bounced", seed="spool:1:bounced:bob@example.test", message_id="<m@x>",
                       recipient="bob@example.test", data={"kind": "hard"})
    with engine.begin() as conn:
        assert record_events(conn, [draft, draft]) == 1
    with engine.begin() as conn:  # a retried transaction records nothing new
        assert record_events(conn, [draft]) == 0
    with engine.connect() as conn:
        rows = conn.execute(select(events)).all()
    assert len(rows) == 1 and rows[0].id == draft.id


def test_transition_and_events_are_one_transaction(engine: Engine) -> None:
    ident = spool_one(engine, mail("<t@x>"), env())
    claim(engine, "w")
    draft = EventDraft(type="replied", seed=f"spool:{ident}:replied")

    def boom(conn) -> None:  # type: ignore[no-untyped-def]
        record_events(conn, [draft])
        raise RuntimeError("crash after the events, before commit")

    try:
        transition(engine, ident, "delivered", owner="w", also=boom)
    except RuntimeError:
        pass
    assert get_message(engine, ident).state == "received"  # type: ignore[union-attr]
    with engine.connect() as conn:
        assert conn.execute(select(events)).all() == []


def test_migrations_are_idempotent(store_url: str) -> None:
    first = open_store(store_url)
    spool_one(first, mail("<keep@x>"), env())
    first.dispose()
    second = open_store(store_url)  # a restart runs the migrations again
    assert [m.message_id for m in list_messages(second)] == ["<keep@x>"]
    second.dispose()


def test_migrations_match_the_schema(engine: Engine) -> None:
    """A schema change without a migration fails here (Alembic compares the migrated store to the models)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from gateway.schema import metadata

    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diffs == []


def test_sqlite_page_size_applies_to_a_new_store_and_an_existing_one_keeps_its_own(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`[storage] sqlite_page_size` sets a new database's pages; one created before keeps its page size and
    still opens (SQLite ignores page_size on a non-empty database outside VACUUM)."""
    import sqlite3

    from gateway.config import parse_config
    from gateway.store import open_store

    cfg = parse_config({"storage": {"url": f"sqlite:///{tmp_path}/new.db", "sqlite_page_size": 16384}},
                       base_dir=str(tmp_path))
    new = open_store(cfg.storage_url(), page_size=cfg.storage.sqlite_page_size)
    with new.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA page_size").scalar() == 16384
    new.dispose()
    default = open_store(f"sqlite:///{tmp_path}/default.db")
    with default.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA page_size").scalar() == 4096
    default.dispose()
    old_path = tmp_path / "old.db"
    raw = sqlite3.connect(old_path)
    raw.execute("PRAGMA page_size=8192")
    raw.execute("CREATE TABLE keep (x)")
    raw.commit()
    raw.close()
    old = open_store(f"sqlite:///{old_path}", page_size=16384)
    with old.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA page_size").scalar() == 8192
    assert spool_one(old, mail("<old@x>"), env()) > 0
    old.dispose()


def test_history_starts_with_the_receipt_read_from_the_message_row(engine: Engine) -> None:
    """Spooling writes no log row for the receipt (an insert per message saved); history still starts with
    it, and a store written before that (its own "received via …" row) does not show it twice."""
    from sqlalchemy import insert

    from gateway.schema import message_log

    ident = spool_one(engine, mail("<h@x>"), Envelope("a@client.test", ("sales@example.test",), listener="smtp-in"))
    transition(engine, ident, "routed", note="to crm.lead")
    got = history(engine, ident)
    assert [(h["state"], h["note"]) for h in got] == [("received", "via smtp smtp-in"), ("routed", "to crm.lead")]
    assert dt.datetime.fromisoformat(got[0]["at"]) <= dt.datetime.fromisoformat(got[1]["at"])
    legacy = spool_one(engine, mail("<old@x>"), env())
    with engine.begin() as conn:
        conn.execute(insert(message_log).values(message=legacy, at=utcnow(), state="received", note="via smtp smtp"))
    assert [h["state"] for h in history(engine, legacy)] == ["received"]


def test_a_delivery_slower_than_the_lease_keeps_it_and_each_worker_has_its_own_owner(engine: Engine) -> None:
    """Explicit delivery is several Odoo calls and can outlast the lease while Odoo is slow. The lease was
    never renewed, so another worker claimed the message mid-delivery and Odoo got it twice; and every
    worker `run_workers` built had the same owner (the building thread's), so leases could not tell them
    apart."""
    from gateway.config import parse_config
    from gateway.worker import Outcome, Worker
    from routing.model import Action, Decision

    config = parse_config({"worker": {"lease_seconds": 1.0}}, base_dir=".")
    spool_one(engine, mail("<slow@x>"), env())
    delivered: list[int] = []
    other_claims: list[int] = []

    def route(raw, msg):  # type: ignore[no-untyped-def]
        return Decision(Action.CREATE, ("test",))

    class SlowOdoo:
        def deliver(self, msg, raw, decision):  # type: ignore[no-untyped-def]
            time.sleep(1.2)  # past the lease: another worker tries to claim the message meanwhile
            other_claims.append(second.run_once())
            time.sleep(1.2)
            other_claims.append(second.run_once())
            delivered.append(msg.id)
            return Outcome("delivered", "ok")

    class QuickOdoo:
        def deliver(self, msg, raw, decision):  # type: ignore[no-untyped-def]
            delivered.append(msg.id)
            return Outcome("delivered", "ok")

    first = Worker(config, engine, route=route, deliver=SlowOdoo())
    second = Worker(config, engine, route=route, deliver=QuickOdoo())
    assert first.owner != second.owner
    assert first.run_once() == 1
    assert other_claims == [0, 0] and len(delivered) == 1
    [m] = list_messages(engine)
    assert m.state == "delivered"


def _open_behind_barrier(url: str, barrier, results) -> None:  # type: ignore[no-untyped-def]
    from gateway.store import open_store

    barrier.wait()
    try:
        open_store(url).dispose()
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


@pytest.mark.parametrize("start", [None, "0001"], ids=["fresh", "from-0001"])
def test_processes_starting_together_all_migrate(store_url: str, start: str | None) -> None:
    """Two nodes, or serve and its worker processes, starting at once on one store all come up: the
    migrations are serialised (PostgreSQL: an advisory lock), not raced into a UniqueViolation on pg_type or
    a "index ix_messages_state does not exist"."""
    import multiprocessing

    from gateway.migrate import current, head, upgrade
    from gateway.store import make_engine

    if start:
        old = make_engine(store_url)
        upgrade(old, start)
        old.dispose()
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_open_behind_barrier, args=(store_url, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    assert outcomes == ["ok"] * 4
    engine = make_engine(store_url)
    assert current(engine) == head()
    engine.dispose()


def test_released_mail_gets_a_full_retry_horizon_from_the_release(engine: Engine) -> None:
    """After an Odoo outage longer than the 72 h horizon, `dead retry --all` put mail back with its horizon
    still measured from receipt: one 503 and it went straight back to dead, with no backoff at all."""
    from gateway.config import parse_config
    from gateway.errors import TransientError
    from gateway.worker import Worker
    from routing.model import Action, Decision

    config = parse_config({}, base_dir=".")
    four_days_ago = utcnow() - dt.timedelta(days=4)

    def route(raw, msg):  # type: ignore[no-untyped-def]
        return Decision(Action.CREATE, ("test",))

    class OdooBlip:
        def deliver(self, msg, raw, decision):  # type: ignore[no-untyped-def]
            raise TransientError("Odoo HTTP 503 (one blip)")

    worker = Worker(config, engine, route=route, deliver=OdooBlip(), owner="w")
    envelope = Envelope(mail_from="alice@client.test", rcpt_tos=("sales@example.test",), received_at=four_days_ago)
    old = spool_one(engine, mail("<old@x>"), envelope)
    assert worker.run_once() == 1
    assert get_message(engine, old).state == "dead"  # type: ignore[union-attr]  # never released: horizon passed

    assert release(engine, old, note="dead retry by operator")
    released = get_message(engine, old)
    assert released is not None and released.retry_since is not None
    assert released.retry_since > four_days_ago and released.retry_start == released.retry_since
    assert worker.run_once() == 1
    m = get_message(engine, old)
    assert m is not None
    assert (m.state, m.attempts) == ("retrying", 1), (m.state, m.last_error)
    assert m.next_attempt_at > utcnow()  # backoff, not an immediate second try


def _writer_can_commit(path: str) -> bool:
    """Whether another connection can take the write lock and commit at once (no busy wait)."""
    import sqlite3

    other = sqlite3.connect(path, timeout=0.1, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("CREATE TABLE IF NOT EXISTS probe (x)")
        other.execute("INSERT INTO probe VALUES (1)")
        other.execute("COMMIT")
        return True
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
        return False
    finally:
        other.close()


def test_a_reading_connection_leaves_the_write_lock_to_writers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SQLite: a `reading()` transaction begins deferred, so a writer commits while it is open (the spool writer
    is not held up by a listing); a transaction from `engine.begin()` still holds the write lock from BEGIN."""
    from gateway.store import reading

    path = str(tmp_path / "store.db")
    engine = open_store(f"sqlite:///{path}")
    spool_one(engine, mail("<r@x>"), env())
    with reading(engine) as conn:
        assert conn.execute(select(messages.c.message_id)).scalar() == "<r@x>"
        assert conn.in_transaction()
        assert _writer_can_commit(path)
        assert conn.execute(select(messages.c.message_id)).scalar() == "<r@x>"  # its snapshot still reads
    with engine.begin() as conn:
        conn.execute(select(messages.c.id)).all()
        assert not _writer_can_commit(path)
    assert _writer_can_commit(path)
    engine.dispose()


@contextlib.contextmanager
def _write_lock_held(tmp_path, seed: Callable[[Engine], int]):  # type: ignore[no-untyped-def]
    """A SQLite store (seeded by `seed`, which returns a message id) whose engine waits at most 200 ms for a
    lock, while another connection holds the write lock: yields (engine, id)."""
    import sqlite3

    from sqlalchemy import event

    path = str(tmp_path / "store.db")
    engine = open_store(f"sqlite:///{path}")
    ident = seed(engine)
    engine.dispose()

    @event.listens_for(engine, "connect")
    def _short_busy(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.execute("PRAGMA busy_timeout=200")

    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE messages SET attempts = attempts WHERE id = ?", (ident,))
    try:
        yield engine, ident
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        engine.dispose()


def test_spool_and_event_readers_read_while_a_writer_holds_the_lock(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SQLite: every reader in gateway.spool and gateway.events goes through `reading()`; with another
    connection holding the write lock, each answers at once (before, each waited out busy_timeout)."""
    from gateway.events import GapWatch, read_events, read_settled
    from gateway.spool import collect_segments, verify_logged_bodies

    with _write_lock_held(tmp_path, lambda engine: spool_one(engine, mail("<w@x>"), env())) as (engine, ident):
        assert get_message(engine, ident).message_id == "<w@x>"  # type: ignore[union-attr]
        assert get_raw(engine, ident) == mail("<w@x>")
        assert [m.id for m in list_messages(engine)] == [ident]
        assert history(engine, ident)[0]["state"] == "received"
        assert counts_by_state(engine)["received"] == 1
        assert verify_logged_bodies(engine) == (0, [])
        assert collect_segments(engine) == []
        assert read_events(engine) == []
        assert read_settled(engine, GapWatch()) == ([], 0)

def test_release_and_delete_take_the_expected_states_in_the_same_statement(engine: Engine) -> None:
    """Delivered mail is never put back (it would reach Odoo twice), and a caller's expected states are part of
    the UPDATE/DELETE: a check made in an earlier transaction cannot act on mail that moved since."""
    ident = spool_one(engine, mail("<d@x>"), env())
    transition(engine, ident, "delivered")
    assert not release(engine, ident)
    assert not delete_message(engine, ident, states=["quarantined"])
    assert get_message(engine, ident).state == "delivered"  # type: ignore[union-attr]
    assert get_raw(engine, ident) is not None and history(engine, ident)[-1]["state"] == "delivered"
    transition(engine, ident, "dead")
    assert not release(engine, ident, states=["quarantined"])
    assert release(engine, ident, states=["dead"])
    with pytest.raises(ValueError):
        release(engine, ident, states=["delivered"])
    assert delete_message(engine, ident, states=["received"])
    assert get_message(engine, ident) is None


def test_the_workers_lookups_read_while_a_writer_holds_the_lock(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SQLite: the reads a worker makes per message (thread index, outbound lookups, the write ledger, the
    duplicate check, VERP resolution, the schema check) go through `reading()`: with another connection
    holding the write lock (the spool writer committing) each answers at once, where each took the write
    lock itself at BEGIN and queued behind every commit — and made the writer queue behind it."""
    from gateway.delivery import WriteLedger
    from gateway.migrate import current, head
    from gateway.relay import resolve_verp
    from gateway.thread_lookup import (
        IndexThreadLookup, SpoolDuplicateLookup, index_message, is_outbound, record_of, replying_recipient,
    )

    def seed(engine: Engine) -> int:
        index_message(engine, "<sent@x>", "crm.lead", 7, outbound=True)
        return spool_one(engine, mail("<w@x>"), env())

    with _write_lock_held(tmp_path, seed) as (engine, ident):
        assert is_outbound(engine, "<sent@x>") is not None
        assert record_of(engine, "<sent@x>") == ("crm.lead", 7)
        assert replying_recipient(engine, "<sent@x>", "a@b.example") == "a@b.example"
        assert IndexThreadLookup(engine, None)._from_index(["<sent@x>"]) is not None  # type: ignore[arg-type]
        assert not SpoolDuplicateLookup(engine).seen("<w@x>", "0" * 64)
        assert WriteLedger(engine, ident).empty
        assert resolve_verp(engine, b"k" * 32, "bounce+nothing@example.test") is None
        assert current(engine) == head()
