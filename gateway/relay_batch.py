"""Group commit for the outbound side: many small transactions share one commit (one fsync).

The submission listener, the delivery worker and their result bookkeeping each write a few rows per mail.
One commit per mail would cap the relay at the disk's fsync rate (PERF-NOTES: 0.35–1.7 ms each); batching
them keeps durability (no caller's future resolves before *its* commit returned) at a fraction of the cost.
When a batch fails, each of its units is retried alone, so one failing unit fails only its own caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection, Engine

from gateway.batching import next_batch

log = logging.getLogger(__name__)
T = TypeVar("T")


class Committer(Protocol):
    """What the submission listener and the delivery worker need from a group committer: this thread-based
    one, or `gateway.batch_process.ProcessTransactionBatcher` (the default outside tests)."""

    async def run_grouped(self, group: Callable[[Connection, list[Any]], list[Any]], item: Any) -> Any: ...

    async def close(self) -> None: ...


class TransactionBatcher:
    """Runs `fn(conn)` units in shared transactions on one writer thread; `run` resolves after commit."""

    def __init__(self, engine: Engine, *, max_batch: int = 64, max_wait_ms: float = 2.0):
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[tuple[Callable[[Connection], Any], asyncio.Future[Any]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-commit")
        # Counters for metrics and bench/relay.py: how busy the writer thread is, how well batches fill.
        self.busy_seconds = 0.0
        self.batches = 0
        self.units = 0

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn` inside a transaction; return its result once that transaction is committed."""
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flusher(), name="relay-commit")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put((fn, fut))
        return await fut

    async def run_grouped(self, group: Callable[[Connection, list[Any]], list[Any]], item: Any) -> Any:
        """Like `run`, but units sharing `group` in one batch become one `group(conn, items)` call (which
        returns one result per item, in order): executemany instead of one statement per unit."""
        return await self.run(_Grouped(group, item))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    async def _flusher(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = await next_batch(self._queue, max_batch=self.max_batch, max_wait=self.max_wait)
            live = [(fn, fut) for fn, fut in batch if not fut.cancelled()]
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._commit, [fn for fn, _ in live])
            except Exception as exc:  # the commit itself failed: nobody's work is durable
                log.error("outbound store commit failed for %d unit(s): %s", len(live), exc)
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), (ok, value) in zip(live, results):
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

    def _commit(self, fns: list[Callable[[Connection], Any]]) -> list[tuple[bool, Any]]:
        t0 = time.perf_counter()
        try:
            return self._commit_batch(fns)
        finally:
            self.busy_seconds += time.perf_counter() - t0
            self.batches += 1
            self.units += len(fns)

    def _commit_batch(self, fns: list[Callable[[Connection], Any]]) -> list[tuple[bool, Any]]:
        # Fast path: the whole batch in one transaction, no savepoints (two extra statements per unit).
        try:
            with self.engine.begin() as conn:
                return [(True, value) for value in _run_units(conn, fns)]
        except Exception:
            if len(fns) == 1:
                raise
        # Something in the batch failed: run each unit alone so only the culprit's caller sees the error.
        results: list[tuple[bool, Any]] = []
        for fn in fns:
            try:
                with self.engine.begin() as conn:
                    results.append((True, _run_units(conn, [fn])[0]))
            except Exception as exc:
                results.append((False, exc))
        return results


class _Grouped:
    """A unit that may be merged with others of the same group into one call."""

    __slots__ = ("group", "item")

    def __init__(self, group: Callable[[Connection, list[Any]], list[Any]], item: Any):
        self.group = group
        self.item = item

    def __call__(self, conn: Connection) -> Any:
        return self.group(conn, [self.item])[0]


def _run_units(conn: Connection, fns: list[Callable[[Connection], Any]]) -> list[Any]:
    results: list[Any] = [None] * len(fns)
    groups: dict[Any, list[int]] = {}
    for i, fn in enumerate(fns):
        if isinstance(fn, _Grouped):
            groups.setdefault(fn.group, []).append(i)
        else:
            results[i] = fn(conn)
    for group, idx in groups.items():
        values = group(conn, [fns[i].item for i in idx])  # type: ignore[attr-defined]
        for i, value in zip(idx, values):
            results[i] = value
    return results
