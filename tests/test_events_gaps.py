"""Sequence gaps in the event stream: a fact recorded again burns no `seq` (PostgreSQL hands out a serial
value before it meets a conflict), and the gaps a reader meets all settle together, not one after another."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import insert, select

from gateway.events import GapWatch, read_settled
from gateway.outbox import EventDraft, record_events
from gateway.schema import events
from gateway.store import open_store, utcnow

pytestmark = pytest.mark.events


@pytest.fixture
def any_engine(store_url):
    eng = open_store(store_url)
    yield eng
    eng.dispose()


def opened(n: int) -> EventDraft:
    return EventDraft(type="opened", seed=f"out:{n}:opened:human", message_id=f"<m{n}>", recipient="a@c.test")


def test_a_fact_recorded_again_burns_no_sequence_number(any_engine):
    """A pixel fetched again records its `opened` again: ON CONFLICT DO NOTHING left the row alone but burned
    a sequence number on PostgreSQL each time, a permanent gap every reader then waited at."""
    with any_engine.begin() as conn:
        assert record_events(conn, [opened(1)]) == 1
    for _ in range(3):
        with any_engine.begin() as conn:
            assert record_events(conn, [opened(1), opened(1)]) == 0
    with any_engine.begin() as conn:
        assert record_events(conn, [opened(1), opened(2), opened(2), opened(3)]) == 2
    with any_engine.connect() as conn:
        seqs = conn.execute(select(events.c.seq, events.c.message_id).order_by(events.c.seq)).all()
    assert [tuple(r) for r in seqs] == [(1, "<m1>"), (2, "<m2>"), (3, "<m3>")]


def test_the_gaps_of_a_page_settle_together(any_engine):
    """Five numbers that never commit: the reader passes them all once `settle` has gone by, instead of waiting
    `settle` at each in turn (5 × settle)."""
    settle = 0.4
    with any_engine.begin() as conn:
        conn.execute(insert(events), [{"seq": seq, "id": f"evt_{seq}", "type": "delivered", "occurred_at": utcnow(),
                                       "data": "{}"} for seq in (1, 3, 5, 7, 9, 11)])
    gaps = GapWatch(settle=settle)
    got: list[int] = []
    cursor = 0
    started = time.monotonic()
    while len(got) < 6 and time.monotonic() - started < 5 * settle:
        rows, cursor = read_settled(any_engine, gaps, after=cursor)
        got += [e["seq"] for e in rows]
        time.sleep(settle / 10)
    assert got == [1, 3, 5, 7, 9, 11] and cursor == 11
    assert time.monotonic() - started < 2 * settle
