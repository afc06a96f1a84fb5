"""The outbound store's group commit in a child process: the same contract as `TransactionBatcher` (a call
returns after the commit holding it; if a batch fails, only the culprit's caller sees an error), plus what a
process adds: it can die (pending calls fail, the next call starts a new one). On SQLite and PostgreSQL.

The group functions below run in the child, which imports them from this module by name."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from sqlalchemy import Connection, Engine, text

from gateway.batch_process import ProcessTransactionBatcher, StoreUnavailable, group_ref

NOTES = "CREATE TABLE bp_notes (note VARCHAR(100) PRIMARY KEY)"


def add_notes(conn: Connection, items: list[str]) -> list[str]:
    """A group: one INSERT for every waiting item; "boom" fails the batch it is in."""
    if "boom" in items:
        raise ValueError("boom is not a note")
    conn.execute(text("INSERT INTO bp_notes (note) VALUES (:note)"), [{"note": i} for i in items])
    return [i.upper() for i in items]


def batch_sizes(conn: Connection, items: list[str]) -> list[int]:
    """A group that answers how many items shared its call."""
    return [len(items)] * len(items)


def notes(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(text("SELECT note FROM bp_notes")).scalars())


@pytest.fixture
def batcher_engine(engine: Engine) -> Engine:
    with engine.begin() as conn:
        conn.execute(text(NOTES))
    return engine


def batcher_for(engine: Engine, **kw) -> ProcessTransactionBatcher:  # type: ignore[no-untyped-def]
    return ProcessTransactionBatcher(engine.url.render_as_string(hide_password=False), **kw)


async def test_results_come_back_in_order_after_commit(batcher_engine: Engine) -> None:
    b = batcher_for(batcher_engine)
    try:
        got = await asyncio.gather(*(b.run_grouped(add_notes, f"n{i}") for i in range(40)))
        assert got == [f"N{i}" for i in range(40)]
        assert notes(batcher_engine) == {f"n{i}" for i in range(40)}  # committed: another connection sees them
        sizes = await asyncio.gather(*(b.run_grouped(batch_sizes, str(i)) for i in range(30)))
        assert max(sizes) > 1  # units waiting together shared one call (executemany, one commit)
    finally:
        await b.close()


async def test_a_failing_unit_fails_alone(batcher_engine: Engine) -> None:
    b = batcher_for(batcher_engine)
    try:
        await b.run_grouped(add_notes, "taken")
        results = await asyncio.gather(*(b.run_grouped(add_notes, n) for n in ("a", "boom", "b", "taken", "c")),
                                       return_exceptions=True)
        assert results[0] == "A" and results[2] == "B" and results[4] == "C"
        assert isinstance(results[1], StoreUnavailable) and "boom is not a note" in str(results[1])
        assert isinstance(results[3], StoreUnavailable)  # the duplicate key, and only it
        assert notes(batcher_engine) == {"taken", "a", "b", "c"}
    finally:
        await b.close()


def helper_starts() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("mailgate_helper_process_starts_total", {"helper": "outbound store"}) or 0.0


async def test_child_killed_pending_fail_and_next_call_restarts(batcher_engine: Engine) -> None:
    b = batcher_for(batcher_engine)
    starts = helper_starts()
    try:
        await b.run_grouped(add_notes, "before")
        pid = b.child_pid
        assert pid
        os.kill(pid, signal.SIGSTOP)  # hold the child so these stay unanswered
        pending = [asyncio.ensure_future(b.run_grouped(add_notes, f"lost{i}")) for i in range(5)]
        await asyncio.sleep(0.2)
        assert not any(p.done() for p in pending)
        os.kill(pid, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
        assert all(isinstance(r, StoreUnavailable) for r in results)
        assert await asyncio.wait_for(b.run_grouped(add_notes, "after"), 20) == "AFTER"
        assert b.children_started == 2 and b.child_pid != pid
        assert helper_starts() == starts + 2  # /metrics shows the restart
    finally:
        await b.close()
    assert notes(batcher_engine) == {"before", "after"}


async def test_close_answers_everything_in_flight(batcher_engine: Engine) -> None:
    b = batcher_for(batcher_engine)
    pending = [asyncio.ensure_future(b.run_grouped(add_notes, f"c{i}")) for i in range(50)]
    await asyncio.sleep(0)
    await b.close()
    assert all(p.done() and not p.cancelled() and p.exception() is None for p in pending)
    assert len(notes(batcher_engine)) == 50


def test_only_module_level_functions_cross_the_pipe() -> None:
    def local(conn: Connection, items: list[str]) -> list[str]:
        return items

    assert group_ref(add_notes) == "tests.test_batch_process:add_notes"
    with pytest.raises(TypeError, match="module-level"):
        group_ref(local)
    with pytest.raises(TypeError, match="module-level"):
        group_ref(lambda conn, items: items)


async def test_answers_stay_with_their_requests_across_a_child_restart(batcher_engine: Engine) -> None:
    """Requests racing a child's death either fail or get *their own* answer from the next child: the dead
    child's reader fails only what that child was sent (a shared queue of futures would misalign answers)."""
    b = batcher_for(batcher_engine)
    try:
        for round_ in range(3):
            await b.run_grouped(add_notes, f"warm{round_}")
            os.kill(b.child_pid or 0, signal.SIGKILL)
            items = [f"r{round_}-{i}" for i in range(30)]
            results = await asyncio.wait_for(
                asyncio.gather(*(b.run_grouped(add_notes, n) for n in items), return_exceptions=True), 30)
            for item, got in zip(items, results):
                assert isinstance(got, StoreUnavailable) or got == item.upper()
            late = await b.run_grouped(add_notes, f"late{round_}")
            assert late == f"LATE{round_}"
        stored = notes(batcher_engine)
        assert {f"late{r}" for r in range(3)} <= stored
    finally:
        await b.close()
