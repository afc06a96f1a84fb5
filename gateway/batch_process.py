"""The outbound store's group commit in a child process: the relay's SQL and rewrite off the listening GIL.

Measured (bench/relay.py, py-spy --gil on the gateway process, 16 sessions, 4 KB Odoo-shaped HTML): the
`TransactionBatcher` writer thread held the GIL 51 % of the time — `record_submissions` with its per-recipient
rewrite (VERP, pixel, link tokens: 150 µs a copy), SQLAlchemy statements, `record_results` — while the
event loop that receives and delivers the mail waited for it, with a quarter of the machine's CPU idle.
Here that work runs in `python -m gateway.batch_process`, same contract as `TransactionBatcher.run_grouped`:
a call returns only after the transaction holding its unit committed; units of the same group function in one
batch become one call (executemany); if the batch fails, each unit is retried alone so only the culprit's
caller sees the error.

Only module-level group functions cross the pipe (by `module:qualname`), with picklable items and results;
closures stay with the in-process `TransactionBatcher` (`[storage] writer = "thread"`, or an in-memory store).
Wire: `!I` length + pickle((group, item)) per request; `!I` length + pickle((ok, value-or-error-text)) per
reply, in request order. Parent and child are the same interpreter and code, and the pipe is private to them.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import pickle
import struct
import sys
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection

from gateway.childproc import HelperClient, PipeChild, commit_helper_store, serve_batches

log = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
_URL_ENV = "MAILGATE_BATCH_WRITER_URL"  # may hold a password: not on the command line (ps)

Group = Callable[[Connection, list[Any]], list[Any]]


class StoreUnavailable(Exception):
    """The outbound store could not commit this unit (or its helper process died before answering)."""


def group_ref(group: Group) -> str:
    """`module:qualname` of a module-level function: how the child finds it."""
    qualname = getattr(group, "__qualname__", "")
    if not qualname or "<" in qualname:
        raise TypeError(f"{group!r} is not a module-level function; it cannot run in the batch process")
    return f"{group.__module__}:{qualname}"


_groups: dict[str, Group] = {}


def resolve_group(ref: str) -> Group:
    """The function a `group_ref` names (imported once per child)."""
    fn = _groups.get(ref)
    if fn is None:
        module, _, qualname = ref.partition(":")
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        fn = _groups[ref] = obj
    return fn


def encode_request(ref: str, item: Any) -> bytes:
    body = pickle.dumps((ref, item), protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


def take_requests(buf: bytearray, limit: int) -> tuple[list[tuple[str, Any]], int]:
    """Complete requests at the start of `buf` (at most `limit`) and how many bytes they used."""
    items: list[tuple[str, Any]] = []
    pos = 0
    while len(items) < limit and len(buf) - pos >= _LEN.size:
        (n,) = _LEN.unpack_from(buf, pos)
        end = pos + _LEN.size + n
        if len(buf) < end:
            break
        items.append(pickle.loads(memoryview(buf)[pos + _LEN.size:end]))
        pos = end
    return items, pos


def run_units(conn: Connection, requests: list[tuple[str, Any]]) -> list[Any]:
    """Each group's items in one call, results back in request order."""
    results: list[Any] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, (ref, _) in enumerate(requests):
        groups.setdefault(ref, []).append(i)
    for ref, idx in groups.items():
        values = resolve_group(ref)(conn, [requests[i][1] for i in idx])
        for i, value in zip(idx, values):
            results[i] = value
    return results


def commit_batch(conn: Connection, requests: list[tuple[str, Any]]) -> list[tuple[bool, Any]]:
    """One transaction for the batch; if it fails, each unit alone (only the culprit fails).

    `conn` lives as long as the child: checking a connection out of the pool and back (with its reset) for
    every batch cost ≈40 µs per commit. A connection the database dropped is replaced by SQLAlchemy on next use."""
    try:
        with conn.begin():
            return [(True, value) for value in run_units(conn, requests)]
    except Exception as exc:
        if len(requests) == 1:
            return [(False, _describe(exc))]
    results: list[tuple[bool, Any]] = []
    for request in requests:
        try:
            with conn.begin():
                results.append((True, run_units(conn, [request])[0]))
        except Exception as exc:
            results.append((False, _describe(exc)))
    return results


def _describe(exc: Exception) -> str:
    log.error("outbound store unit failed: %s: %s", type(exc).__name__, exc)
    return f"{type(exc).__name__}: {exc}"[:2000]


def encode_replies(replies: list[tuple[bool, Any]]) -> bytes:
    out = []
    for ok, value in replies:
        try:
            body = pickle.dumps((ok, value), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # a result that cannot travel is that unit's failure, not the batch's
            body = pickle.dumps((False, f"result not picklable: {exc}"))
        out.append(_LEN.pack(len(body)) + body)
    return b"".join(out)


# ------------------------------------------------------------------------------------------ the child
def child_main(synchronous: str, max_batch: int, max_wait_ms: float = 0.0) -> int:  # pragma: no cover - child
    conn = commit_helper_store(_URL_ENV, synchronous).connect()
    stats = {"units": 0, "commits": 0}

    def answer(requests: list[tuple[str, Any]]) -> bytes:
        stats["units"] += len(requests)
        stats["commits"] += 1
        return encode_replies(commit_batch(conn, requests))

    code = serve_batches(take_requests, answer, max_batch=max_batch, max_wait_ms=max_wait_ms)
    log.info("outbound store process: %d units in %d commits", stats["units"], stats["commits"])
    return code


# ------------------------------------------------------------------------------------------ the parent
class ProcessTransactionBatcher(HelperClient):
    """`TransactionBatcher.run_grouped` with the transaction in a child process."""

    def __init__(self, url: str, *, synchronous: str = "FULL", max_batch: int = 64, max_wait_ms: float = 0.0):
        self._child = PipeChild.commit_helper(
            "gateway.batch_process", url=url, url_env=_URL_ENV, synchronous=synchronous, max_batch=max_batch,
            max_wait_ms=max_wait_ms, read_reply=_read_reply, error=StoreUnavailable, name="outbound store")
        self.units = 0

    async def start(self) -> None:
        await self._child.ensure()

    async def run_grouped(self, group: Group, item: Any) -> Any:
        """Run `group(conn, [item, …])` with other waiting units; return this item's result after commit."""
        frame = encode_request(group_ref(group), item)
        self.units += 1
        return await self._child.request(frame)

    async def close(self) -> None:
        await self._child.close()


async def _read_reply(stdout: asyncio.StreamReader) -> tuple[bool, Any]:
    (n,) = _LEN.unpack(await stdout.readexactly(_LEN.size))
    ok, value = pickle.loads(await stdout.readexactly(n))
    return bool(ok), value


if __name__ == "__main__":  # pragma: no cover
    sys.exit(child_main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
