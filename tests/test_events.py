"""The events outbox's dispatch side: signatures, fan-out with type filters, per-mail ordering, dead-letter,
replay, and the `mailgate events` CLI."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time

import pytest
from sqlalchemy import select, update

from gateway.config import WebhookConfig
from gateway.events import (
    Delivery, backoff, due_heads, fan_out, mark_failed, mark_sent, read_events, replay, retry_span, sign, verify,
)
from gateway.outbox import EventDraft, record_events
from gateway.schema import webhook_deliveries
from gateway.store import open_store, utcnow

pytestmark = pytest.mark.events


@pytest.fixture
def engine(tmp_path):
    eng = open_store(f"sqlite:///{tmp_path / 'e.db'}", synchronous="NORMAL")
    yield eng
    eng.dispose()


@pytest.fixture
def any_engine(store_url):
    """The per-mail ordering queries on SQLite and on PostgreSQL."""
    eng = open_store(store_url)
    yield eng
    eng.dispose()


def hook(**kw) -> WebhookConfig:
    base = dict(name="seq", url="http://127.0.0.1:9/x", secret_env="X", retry_min_seconds=10, retry_max_seconds=60)
    base.update(kw)
    return WebhookConfig(**base)


def add(engine, *drafts: EventDraft) -> None:
    with engine.begin() as conn:
        record_events(conn, list(drafts))


def ev(type_: str, mid: str, n: int, **kw) -> EventDraft:
    return EventDraft(type=type_, seed=f"{mid}:{n}", message_id=mid, recipient="a@customer.test", **kw)


def test_signature_roundtrip_and_tampering():
    body = b'{"id":"evt_1"}'
    header = sign(b"k" * 20, body, timestamp=1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert verify(b"k" * 20, body, header, now=1_700_000_010)
    assert not verify(b"k" * 20, body + b" ", header, now=1_700_000_010)
    assert not verify(b"x" * 20, body, header, now=1_700_000_010)
    assert not verify(b"k" * 20, body, header, now=1_700_001_000)  # too old: replayed
    assert not verify(b"k" * 20, body, "garbage", now=1_700_000_010)


def test_fan_out_respects_type_filter_and_is_idempotent(engine):
    add(engine, ev("delivered", "<m1>", 1), ev("opened", "<m1>", 2), ev("bounced", "<m2>", 3))
    h = hook(types=("opened", "bounced"))
    with engine.begin() as conn:
        assert fan_out(conn, h) == 3
        assert fan_out(conn, h) == 0
    with engine.connect() as conn:
        states = [r.state for r in conn.execute(select(webhook_deliveries).order_by(webhook_deliveries.c.event_seq))]
    assert states == ["skipped", "pending", "pending"]
    add(engine, ev("opened", "<m3>", 4))
    with engine.begin() as conn:
        assert fan_out(conn, h) == 1


def test_one_head_per_mail_until_it_is_sent_or_dead(any_engine):
    add(any_engine, ev("delivered", "<m1>", 1), ev("opened", "<m1>", 2), ev("delivered", "<m2>", 3),
        ev("clicked", "<m1>", 4))
    h = hook()
    with any_engine.begin() as conn:
        fan_out(conn, h)
        heads = due_heads(conn, "seq")
    assert [json.loads(d.body)["data"] == {} for d in heads] == [True, True]
    assert [d.seq for d in heads] == [1, 3]
    # m1's head fails: m1's next event must wait (it is not due either), m2 is unaffected.
    with any_engine.begin() as conn:
        assert mark_failed(conn, heads[0], h, "HTTP 503") == "pending"
        mark_sent(conn, heads[1].id)
        assert [d.seq for d in due_heads(conn, "seq")] == []
        conn.execute(update(webhook_deliveries).values(next_attempt_at=utcnow() - dt.timedelta(seconds=1)))
        assert [d.seq for d in due_heads(conn, "seq")] == [1]
        mark_sent(conn, due_heads(conn, "seq")[0].id)
        assert [d.seq for d in due_heads(conn, "seq")] == [2]


def test_mails_whose_heads_wait_do_not_starve_the_others(any_engine):
    """A receiver that keeps failing some events (a validation bug, say) leaves their mails' heads backing off
    for up to the horizon, with their later events queued behind. However many such rows there are, the next
    mail's due event still goes out: the scan looks at one head per mail, not at the oldest pending rows."""
    add(any_engine, *(ev("delivered", f"<stuck{i}>", i) for i in range(1, 4)),
        *(ev("opened", f"<stuck{i}>", 3 + i) for i in range(1, 4)), ev("delivered", "<fine>", 7))
    h = hook()
    with any_engine.begin() as conn:
        fan_out(conn, h)
        for head in due_heads(conn, "seq")[:3]:
            assert mark_failed(conn, head, h, "HTTP 422") == "pending"  # backing off now
        assert [d.seq for d in due_heads(conn, "seq", limit=3)] == [7]


def test_dead_letter_after_horizon_then_replay(any_engine):
    """The horizon counts retrying, not age: an event 10 days old (it waited behind its mail's earlier event,
    or was replayed after an outage) still gets its retries; it is dead once they would span the horizon."""
    old = utcnow() - dt.timedelta(days=10)
    add(any_engine, ev("delivered", "<m1>", 1, occurred_at=old), ev("opened", "<m1>", 2))
    h = hook(horizon_hours=72)
    with any_engine.begin() as conn:
        fan_out(conn, h)
        head = due_heads(conn, "seq")[0]
        assert mark_failed(conn, head, h, "connection refused") == "pending"
        tries, span = 1, backoff(1, h.retry_min_seconds, h.retry_max_seconds)
        while span + backoff(tries + 1, h.retry_min_seconds, h.retry_max_seconds) <= 72 * 3600:
            tries += 1
            span += backoff(tries, h.retry_min_seconds, h.retry_max_seconds)
        assert span == retry_span(tries, h.retry_min_seconds, h.retry_max_seconds)
        head = dataclasses.replace(head, attempts=tries)  # as if it had failed that often since
        assert mark_failed(conn, head, h, "connection refused") == "dead"
        # The dead event no longer blocks its mail's next one.
        assert [d.seq for d in due_heads(conn, "seq")] == [2]
        mark_sent(conn, due_heads(conn, "seq")[0].id)
    assert replay(any_engine, h, since=2) == 1
    with any_engine.connect() as conn:
        states = dict(conn.execute(select(webhook_deliveries.c.event_seq, webhook_deliveries.c.state)).all())
    assert states == {1: "dead", 2: "pending"}
    assert replay(any_engine, h) == 2


def test_verify_rejects_a_forged_header_without_crashing():
    body = b'{"id": "x"}'
    assert not verify(b"secret", body, "t=%d,v1=\u00e9" % int(time.time()))
    assert not verify(b"secret", body, "garbage")


def test_backoff_doubles_to_cap():
    assert [backoff(n, 10, 60) for n in range(1, 6)] == [10, 20, 40, 60, 60]


def test_delivery_body_is_the_documented_wire_form(engine):
    add(engine, EventDraft(type="bounced", seed="s", message_id="<m@odoo>", model="crm.lead", res_id=4,
                           recipient="x@customer.test",
                           data={"kind": "hard", "reason": "userunknown", "status": "5.1.1"}))
    with engine.begin() as conn:
        fan_out(conn, hook())
        (d,) = due_heads(conn, "seq")
    assert isinstance(d, Delivery)
    body = json.loads(d.body)
    assert set(body) == {"id", "seq", "type", "version", "occurred_at", "mail", "data"}
    assert body["mail"] == {"message_id": "<m@odoo>", "record": {"model": "crm.lead", "id": 4},
                            "recipient": "x@customer.test"}
    assert body["id"].startswith("evt_") and body["version"] == 1


def test_read_events_cursor_and_types(engine):
    add(engine, ev("delivered", "<m1>", 1), ev("opened", "<m1>", 2), ev("clicked", "<m1>", 3))
    assert [e["type"] for e in read_events(engine)] == ["delivered", "opened", "clicked"]
    assert [e["type"] for e in read_events(engine, after=1)] == ["opened", "clicked"]
    assert [e["type"] for e in read_events(engine, types=["clicked"])] == ["clicked"]
    assert len(read_events(engine, limit=2)) == 2


def test_pulling_with_the_cursor_never_skips_an_event_that_commits_late(any_engine):
    """PostgreSQL hands out sequence numbers at insert, so a transaction still open holds a lower `seq` than
    one that already committed. The cursor stops before that number until it commits, or until it has been
    missing for `settle` seconds (a rolled-back batch leaves a number that never comes)."""
    import time

    from gateway.events import GapWatch, read_settled

    gaps = GapWatch(settle=0.3)
    late = any_engine.connect()
    open_tx = late.begin()
    record_events(late, [ev("delivered", "<late>", 1)])
    if any_engine.dialect.name == "sqlite":  # one writer: the open transaction holds the lock
        open_tx.commit()
        late.close()
        add(any_engine, ev("opened", "<next>", 2))
        rows, cursor = read_settled(any_engine, gaps)
        assert [e["mail"]["message_id"] for e in rows] == ["<late>", "<next>"] and cursor == rows[-1]["seq"]
        return
    add(any_engine, ev("opened", "<next>", 2))
    assert read_settled(any_engine, gaps) == ([], 0)  # <next> committed, <late> still open: hold at 0
    open_tx.commit()
    late.close()
    rows, cursor = read_settled(any_engine, gaps)
    assert [e["mail"]["message_id"] for e in rows] == ["<late>", "<next>"] and cursor == rows[-1]["seq"]
    with any_engine.connect() as conn:  # a batch that rolls back leaves its number unused for good
        with conn.begin() as tx:
            record_events(conn, [ev("bounced", "<gone>", 3)])
            tx.rollback()
    add(any_engine, ev("clicked", "<after>", 4))
    assert read_settled(any_engine, gaps, after=cursor) == ([], cursor)
    time.sleep(0.35)
    rows, cursor2 = read_settled(any_engine, gaps, after=cursor)
    assert [e["mail"]["message_id"] for e in rows] == ["<after>"] and cursor2 == rows[0]["seq"]
    # a reader starting further back meets the same gap in the middle of its page (a watch of its own)
    rows, held = read_settled(any_engine, GapWatch(settle=60))
    assert [e["mail"]["message_id"] for e in rows] == ["<late>", "<next>"] and held == cursor


def test_a_reader_of_a_rare_type_moves_past_the_other_events(any_engine):
    """`types=bounced` with no bounce yet: `next` came back equal to `after`, so the reader rescanned every
    other event at each call, for ever. A filtered page that is not full read up to the top: the cursor moves
    there (and still stops before a number that may commit late, on PostgreSQL)."""
    from gateway.events import GapWatch, read_settled

    gaps = GapWatch(settle=60)
    add(any_engine, ev("delivered", "<m1>", 1), ev("opened", "<m1>", 2), ev("clicked", "<m1>", 3))
    rows, cursor = read_settled(any_engine, gaps, types=["bounced"])
    assert rows == [] and cursor == max_seq(any_engine)
    add(any_engine, ev("bounced", "<m2>", 4))
    rows, cursor = read_settled(any_engine, gaps, after=cursor, types=["bounced"])
    assert [e["type"] for e in rows] == ["bounced"] and cursor == rows[0]["seq"]
    if any_engine.dialect.name == "sqlite":
        return
    commit_late = _in_flight(any_engine, ev("bounced", "<late>", 5))  # the cursor waits before it
    add(any_engine, ev("opened", "<m3>", 6))
    held = read_settled(any_engine, gaps, after=cursor, types=["bounced"])
    commit_late()
    assert held == ([], cursor)
    rows, _ = read_settled(any_engine, gaps, after=cursor, types=["bounced"])
    assert [e["mail"]["message_id"] for e in rows] == ["<late>"]


def max_seq(engine):  # type: ignore[no-untyped-def]
    from sqlalchemy import func, select

    from gateway.schema import events as events_table

    with engine.connect() as conn:
        return conn.execute(select(func.max(events_table.c.seq))).scalar()


def test_cli_tail_and_replay(engine, tmp_path, capsys):
    from gateway.cli import main

    db = tmp_path / "e.db"
    cfg = tmp_path / "mailgate.toml"
    cfg.write_text(f'storage = {{ url = "sqlite:///{db}" }}\n'
                   '[[events.webhooks]]\nname = "seq"\nurl = "http://127.0.0.1:9/x"\nsecret_env = "X"\n')
    add(engine, ev("delivered", "<m1>", 1), EventDraft(type="bounced", seed="b", message_id="<m1>",
                                                       recipient="a@customer.test", data={"kind": "hard",
                                                       "reason": "userunknown", "status": "5.1.1"}))
    assert main(["events", "tail", "--config", str(cfg), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["delivered", "bounced"]
    assert main(["events", "tail", "--config", str(cfg), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "bounced" in out and "hard userunknown 5.1.1" in out and "delivered" not in out
    assert main(["events", "replay", "--config", str(cfg), "--subscriber", "seq"]) == 0
    assert "2 event(s)" in capsys.readouterr().out
    assert main(["events", "replay", "--config", str(cfg), "--subscriber", "nope"]) == 1


def test_fan_out_inserts_a_batch_with_one_statement(engine):
    """One executemany per batch, not an INSERT per event (the fan-out holds the write lock while it runs)."""
    from sqlalchemy import event

    add(engine, *(ev("delivered", f"<b{i}>", i) for i in range(5)))
    inserts: list[bool] = []

    def seen(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.startswith("INSERT INTO webhook_deliveries"):
            inserts.append(executemany)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        with engine.begin() as conn:
            assert fan_out(conn, hook()) == 5
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert inserts == [True]


def test_cli_replay_commits_each_fan_out_batch(engine, tmp_path, capsys, monkeypatch):
    """`events replay` commits every fan-out batch before the next: one transaction over all of them held
    SQLite's write lock (and so SMTP intake) for the whole fan-out."""
    from sqlalchemy import func

    import gateway.events
    from gateway.cli import main
    from gateway.store import reading

    db = tmp_path / "e.db"
    cfg = tmp_path / "mailgate.toml"
    cfg.write_text(f'storage = {{ url = "sqlite:///{db}" }}\n'
                   '[[events.webhooks]]\nname = "seq"\nurl = "http://127.0.0.1:9/x"\nsecret_env = "X"\n')
    add(engine, *(ev("delivered", f"<r{i}>", i) for i in range(7)))
    monkeypatch.setattr(gateway.events, "FANOUT_BATCH", 3)
    real = gateway.events.fan_out
    committed_before: list[int] = []

    def counting(conn, h):  # type: ignore[no-untyped-def]
        with reading(engine) as other:  # what other connections see: committed rows only
            committed_before.append(other.execute(select(func.count()).select_from(webhook_deliveries)).scalar())
        return real(conn, h)

    monkeypatch.setattr(gateway.events, "fan_out", counting)
    assert main(["events", "replay", "--config", str(cfg), "--subscriber", "seq"]) == 0
    assert committed_before == [0, 3, 6, 7]
    assert "7 event(s)" in capsys.readouterr().out


def test_cli_tail_with_types_shows_the_newest_and_refuses_a_negative_count(engine, tmp_path, capsys):
    """`-n N --types X` read the first 100,000 matching events and printed the last N of those (old events
    once more matched); `-n -5` printed all but the first five."""
    from gateway.cli import main

    db = tmp_path / "e.db"
    cfg = tmp_path / "mailgate.toml"
    cfg.write_text(f'storage = {{ url = "sqlite:///{db}" }}\n')
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO events (id, type, occurred_at, data) VALUES (?, ?, ?, '{}')",
                             [(f"evt_{i}", "bounced" if i % 2 else "delivered", "2024-01-01 00:00:00.000000")
                              for i in range(200_010)])
    assert main(["events", "tail", "--config", str(cfg), "--json", "-n", "2", "--types", "bounced"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["seq"], e["type"]) for e in got] == [(200_008, "bounced"), (200_010, "bounced")]
    assert main(["events", "tail", "--config", str(cfg), "--json", "-n", "3"]) == 0
    assert [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()] == [200_008, 200_009, 200_010]
    assert main(["events", "tail", "--config", str(cfg), "-n", "0", "--types", "bounced"]) == 0
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit) as exc:
        main(["events", "tail", "--config", str(cfg), "-n", "-5", "--types", "bounced"])
    assert exc.value.code == 2 and capsys.readouterr().out == ""


def test_a_page_and_its_gap_check_read_one_snapshot(any_engine):
    """PostgreSQL, READ COMMITTED: an event with a lower seq that committed between the page query and the gap
    query was not in the page, yet the gap check saw it, so `next` moved past it and the reader never got it.
    The late transaction commits here right after the page query (the first statement of `read_settled`)."""
    from sqlalchemy import event

    from gateway.events import GapWatch, read_settled

    if any_engine.dialect.name == "sqlite":
        pytest.skip("one writer on SQLite: no lower seq can commit after a higher one")
    late = any_engine.connect()
    open_tx = late.begin()
    record_events(late, [ev("bounced", "<late>", 1)])
    add(any_engine, ev("opened", "<next>", 2))

    def commit_late(*_args):  # type: ignore[no-untyped-def]
        if open_tx.is_active:
            open_tx.commit()

    event.listen(any_engine, "after_cursor_execute", commit_late)
    try:
        rows, cursor = read_settled(any_engine, GapWatch(settle=60))
    finally:
        event.remove(any_engine, "after_cursor_execute", commit_late)
        late.close()
    assert not open_tx.is_active  # the race happened
    assert (rows, cursor) == ([], 0)  # the page did not see <late>: hold before it
    rows, cursor = read_settled(any_engine, GapWatch(settle=60), after=cursor)
    assert [e["mail"]["message_id"] for e in rows] == ["<late>", "<next>"]


def _in_flight(engine, event):  # type: ignore[no-untyped-def]
    """PostgreSQL only: `event` recorded in a transaction left open (its seq taken, not committed); returns the
    function that commits it. SQLite has one writer: no lower seq can commit after a higher one."""
    if engine.dialect.name == "sqlite":
        pytest.skip("one writer on SQLite: no lower seq can commit after a higher one")
    late = engine.connect()
    open_tx = late.begin()
    record_events(late, [event])

    def commit() -> None:
        open_tx.commit()
        late.close()

    return commit


def test_fan_out_keeps_a_late_commit_in_its_mails_order(any_engine):
    """PostgreSQL: the relay's `delivered` (seq 1) is still uncommitted when the prefetch `opened` (seq 2) of
    the same mail commits. Fan-out took every committed event: `opened` was POSTed first, and `delivered`
    after it. Now the cursor waits before the missing number until it commits."""
    from gateway.events import GapWatch

    commit_late = _in_flight(any_engine, ev("delivered", "<M>", 1))
    h = hook()
    gaps = GapWatch(settle=60)
    add(any_engine, ev("opened", "<M>", 2))
    with any_engine.begin() as conn:
        assert fan_out(conn, h, gaps) == 0
        assert due_heads(conn, "seq") == []
    commit_late()
    with any_engine.begin() as conn:
        assert fan_out(conn, h, gaps) == 2
        heads = due_heads(conn, "seq")
    assert [json.loads(d.body)["type"] for d in heads] == ["delivered"]


def test_fan_out_sends_an_event_that_commits_after_its_gap_settled(any_engine):
    """A number missing for `settle` seconds counts as a rolled-back batch and the cursor passes it; should it
    commit after all (a transaction open that long), it still goes out, late, instead of never."""
    from gateway.events import GapWatch

    commit_late = _in_flight(any_engine, ev("bounced", "<L>", 1))
    h = hook()
    gaps = GapWatch(settle=0)
    add(any_engine, ev("opened", "<M>", 2))
    with any_engine.begin() as conn:
        assert fan_out(conn, h, gaps) == 1  # settle 0: given up at once, passed over
    commit_late()
    with any_engine.begin() as conn:
        assert fan_out(conn, h, gaps) == 1
        assert sorted(d.seq for d in due_heads(conn, "seq")) == [1, 2]


def test_occurred_at_goes_out_in_utc_whatever_the_sessions_time_zone(any_engine):
    """PostgreSQL hands timestamptz back in the session's TimeZone (the server's zone unless set): the wire
    showed `+01:00` times on a server in Berlin, where the contract says UTC."""
    from sqlalchemy import create_engine

    if any_engine.dialect.name == "sqlite":
        pytest.skip("SQLite stores and returns naive UTC")
    when = dt.datetime(2026, 11, 22, 15, 4, 5, tzinfo=dt.timezone.utc)
    add(any_engine, ev("delivered", "<m1>", 1, occurred_at=when))
    berlin = create_engine(any_engine.url, connect_args={"options": "-c timezone=Europe/Berlin"})
    try:
        (event,) = read_events(berlin)
    finally:
        berlin.dispose()
    assert event["occurred_at"] == "2026-11-22T15:04:05+00:00"


def test_replay_sends_events_the_fixed_type_filter_wants(engine):
    """A typo in `types` ("bounce") marked every event skipped; after the operator fixed the filter neither
    fan-out (it had seen them) nor replay (it left skipped rows alone) ever sent them. Replay now checks every
    row against the filter as it is, and skips pending ones it no longer wants."""
    add(engine, ev("bounced", "<m1>", 1), ev("opened", "<m1>", 2), ev("delivered", "<m2>", 3))
    with engine.begin() as conn:
        assert fan_out(conn, hook(types=("bounce", "delivered"))) == 3
    fixed = hook(types=("bounced", "opened"))
    assert replay(engine, fixed) == 2
    with engine.connect() as conn:
        states = dict(conn.execute(select(webhook_deliveries.c.event_seq, webhook_deliveries.c.state)).all())
    assert states == {1: "pending", 2: "pending", 3: "skipped"}


def test_tail_follow_prints_an_event_whose_lower_seq_was_in_flight_at_the_start(any_engine, tmp_path, capsys,
                                                                                 monkeypatch):
    """`tail --follow` followed from the highest committed number: an event with a lower number still in
    flight at that moment (PostgreSQL) committed behind the cursor and was printed neither by the listing nor
    by --follow. Now it is printed when it commits, and nothing already listed is printed again."""
    commit_late = _in_flight(any_engine, ev("bounced", "<late>", 1))
    add(any_engine, ev("opened", "<next>", 2))
    # the late one commits once the follower has started
    assert _follow(any_engine, tmp_path, monkeypatch, capsys, "5", commit_late) == ["<next>", "<late>"]


def test_tail_follow_without_a_listing_prints_only_new_events(any_engine, tmp_path, capsys, monkeypatch):
    """`-n 0 --follow`: what was there at the start stays unprinted, even though the follower's cursor may start
    below it (before a number that could still be in flight)."""
    from gateway.events import GapWatch

    import gateway.events

    add(any_engine, ev("delivered", "<old>", 1), ev("opened", "<old>", 2))
    if any_engine.dialect.name != "sqlite":
        with any_engine.connect() as conn:  # a rolled-back number between them: the cursor starts before it
            with conn.begin() as tx:
                record_events(conn, [ev("bounced", "<gone>", 3)])
                tx.rollback()
        add(any_engine, ev("clicked", "<old>", 4))
        monkeypatch.setattr(gateway.events, "GapWatch", lambda: GapWatch(settle=0))  # not 30 s at the gap
    assert _follow(any_engine, tmp_path, monkeypatch, capsys, "0",
                   lambda: add(any_engine, ev("replied", "<new>", 5))) == ["<new>"]


def _follow(engine, tmp_path, monkeypatch, capsys, listed: str, at_first_nap) -> list[str]:  # type: ignore[no-untyped-def]
    """The Message-IDs `events tail --json --follow -n LISTED` prints over its first four polls;
    `at_first_nap()` runs when the follower first sleeps (it has started)."""
    import types

    import gateway.cli_events
    from gateway.cli import main

    cfg = tmp_path / "mailgate.toml"
    cfg.write_text(f'storage = {{ url = "{engine.url.render_as_string(hide_password=False)}" }}\n')

    class Enough(Exception):
        pass

    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 1:
            at_first_nap()
        if len(naps) > 3:
            raise Enough

    monkeypatch.setattr(gateway.cli_events, "time", types.SimpleNamespace(sleep=nap))
    with pytest.raises(Enough):
        main(["events", "tail", "--config", str(cfg), "--json", "--follow", "-n", listed])
    return [json.loads(line)["mail"]["message_id"] for line in capsys.readouterr().out.splitlines()]


def test_metrics_show_each_subscribers_backlog(any_engine):
    """A subscriber failing for hours showed as log lines and a failure counter; what it has not received yet
    (pending) and what was given up (dead) are the figures to alert on, per subscriber."""
    from sqlalchemy import update

    from gateway.admin import exposition
    from gateway.events import GapWatch

    add(any_engine, ev("delivered", "<b1>", 1), ev("opened", "<b1>", 2), ev("clicked", "<b1>", 3))
    with any_engine.begin() as conn:
        assert fan_out(conn, hook(name="crm"), GapWatch(settle=0)) == 3
        conn.execute(update(webhook_deliveries).where(webhook_deliveries.c.event_seq == min_seq(conn))
                     .values(state="dead"))
    text = exposition(any_engine, None, ("crm", "bi"))().decode()
    assert 'mailgate_webhook_backlog{state="pending",subscriber="crm"} 2.0' in text
    assert 'mailgate_webhook_backlog{state="dead",subscriber="crm"} 1.0' in text
    assert 'mailgate_webhook_backlog{state="pending",subscriber="bi"} 0.0' in text


def min_seq(conn):  # type: ignore[no-untyped-def]
    from sqlalchemy import func, select

    return conn.execute(select(func.min(webhook_deliveries.c.event_seq))).scalar()
