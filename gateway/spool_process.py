"""The spool writer in its own process: the listeners' event loop and the commit no longer share one GIL.

Measured (bench/ingest.py, 16 sessions, 4 KB): with the writer as a thread of the listening process a
group commit of ~8 messages took 2.2–2.8 ms, against 0.8 ms for the very same `spool_many` call in a process
of its own — the writer thread waited for the GIL after each SQLite call while the loop served sessions, and
every session in the batch waited for that commit before its 250. A child process commits on the other core.

Wire (stdin → child): `!II` meta length, raw length; the envelope as `marshal`; the raw bytes.
Wire (child → stdout): per request, in request order, `!qI` spool id (or -1), error length; the error text.
The child batches whatever requests are waiting when it finishes a commit (group commit, as the thread
writer does) and answers only after that commit returned, so a 250 still means "on disk".

Large messages (≥ `inline_max`) stay with the in-process thread writer: it streams them into SQLite blobs
with one copy in memory (the 25 MB RSS target), where the pipe would add a copy in each process.
If the child dies, every message it had not answered gets 451 (the client retries) and the next store
starts a new child.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import marshal
import struct
import sys
from concurrent.futures import Future
from collections.abc import Callable
from typing import Any

from gateway.childproc import HelperClient, PipeChild, commit_helper_store, serve_batches
from gateway.spool import Envelope, SpoolError, SpoolWriter, commit_each_on_failure, make_body_log

log = logging.getLogger(__name__)

_REQ = struct.Struct("!II")
_REP = struct.Struct("!qI")


def encode_request(raw: bytes, env: Envelope) -> bytes:
    """One request. The envelope goes as `marshal` (C speed; parent and child are the same interpreter, which
    is marshal's only requirement): JSON here was 4 % of the listening loop's time per message."""
    meta = marshal.dumps((env.mail_from, tuple(env.rcpt_tos), env.client_addr, env.helo, env.listener, env.source,
                          env.received_at.isoformat()))
    return _REQ.pack(len(meta), len(raw)) + meta + raw


def decode_meta(meta: bytes) -> Envelope:
    mail_from, rcpts, client, helo, listener, source, received = marshal.loads(meta)
    return Envelope(mail_from=mail_from, rcpt_tos=tuple(rcpts), client_addr=client, helo=helo,
                    listener=listener, source=source, received_at=dt.datetime.fromisoformat(received))


def take_frames(buf: bytearray, limit: int) -> tuple[list[tuple[bytes, Envelope]], int]:
    """Complete requests at the start of `buf` (at most `limit`) and how many bytes they used."""
    items: list[tuple[bytes, Envelope]] = []
    pos = 0
    while len(items) < limit and len(buf) - pos >= _REQ.size:
        mlen, rlen = _REQ.unpack_from(buf, pos)
        end = pos + _REQ.size + mlen + rlen
        if len(buf) < end:
            break
        meta_end = pos + _REQ.size + mlen
        items.append((bytes(buf[meta_end:end]), decode_meta(bytes(buf[pos + _REQ.size:meta_end]))))
        pos = end
    return items, pos


# ------------------------------------------------------------------------------------------ the child
_URL_ENV = "MAILGATE_SPOOL_WRITER_URL"  # the store URL may hold a password: not on the command line (ps)


def child_main(synchronous: str, max_batch: int, max_wait_ms: float = 0.0,
               body_log_min: int = 0) -> int:  # pragma: no cover - child
    from gateway.spool import log_bodies, spool_many, spool_many_sqlite

    engine = commit_helper_store(_URL_ENV, synchronous)
    if engine.dialect.name != "sqlite":
        def answer(items: list[tuple[bytes, Envelope]]) -> bytes:
            return _answer(items, lambda idx: spool_many(engine, [items[k] for k in idx]))

        return serve_batches(take_frames, answer, max_batch=max_batch, max_wait_ms=max_wait_ms)

    raw_conn = engine.raw_connection()  # one connection for the child's life, pragmas applied by the engine
    dialect = engine.dialect
    body_log = make_body_log(engine, body_log_min)

    def prepare(items: list[tuple[bytes, Envelope]]) -> Any:
        """Stage one, in a thread: large bodies appended to the body log and synced."""
        return log_bodies(body_log, items)

    def answer_prepared(items: list[tuple[bytes, Envelope]], refs: Future[Any]) -> bytes:
        """Stage two: the rows, committed only once their bodies are durable (`refs.result()` re-raises a
        failed append or sync, and the whole batch answers 451)."""
        return _answer(items, lambda idx: spool_many_sqlite(
            raw_conn.driver_connection, dialect, [items[k] for k in idx], refs=_pick(refs.result(), idx)))

    def wants_prepare(items: list[tuple[bytes, Envelope]]) -> bool:
        return body_log is not None and any(body_log.wants(raw) for raw, _ in items)

    return serve_batches(take_frames, answer_prepared, max_batch=max_batch, max_wait_ms=max_wait_ms,
                         prepare=prepare, wants_prepare=wants_prepare)


def _pick(refs: list[Any] | None, idx: list[int]) -> list[Any] | None:
    return [refs[k] for k in idx] if refs is not None else None


def _answer(items: list[tuple[bytes, Envelope]], commit: Callable[[list[int]], list[int]]) -> bytes:
    """The replies for a batch; `commit(indexes)` commits those of `items` in one transaction. When the
    batch fails, each message is committed alone (`commit_each_on_failure`): only a message that fails on
    its own answers 451, and nothing of a failed commit is kept."""
    out = []
    for result in commit_each_on_failure(list(range(len(items))), commit):
        if isinstance(result, Exception):
            err = str(result).encode("utf-8", "replace")[:2000]
            out.append(_REP.pack(-1, len(err)) + err)
        else:
            out.append(_REP.pack(result, 0))
    return b"".join(out)


# ------------------------------------------------------------------------------------------ the parent
class ProcessSpoolWriter(HelperClient):
    """`SpoolWriter`'s interface, committing in a child process (`python -m gateway.spool_process`)."""

    def __init__(self, url: str, *, synchronous: str = "FULL", max_batch: int = 64, max_wait_ms: float = 0.0,
                 body_log_min: int = 0, inline: SpoolWriter, inline_max: int = 1 << 20, on_commit: Any = None):
        self.url = url
        self.inline = inline            # large messages, and the fallback's interface for tests
        self.inline_max = inline_max
        self._on_commit = on_commit
        self._child = PipeChild.commit_helper(
            "gateway.spool_process", url=url, url_env=_URL_ENV, synchronous=synchronous, max_batch=max_batch,
            max_wait_ms=max_wait_ms, extra_args=[str(body_log_min)], read_reply=_read_reply, error=SpoolError,
            name="spool writer")
        if on_commit is not None:
            self._child.on_reply = lambda ok: on_commit(1) if ok else None
        self.fail_writes: Exception | None = None  # fault injection for tests (disk full and such)

    async def start(self) -> None:
        await self.inline.start()
        await self._child.ensure()

    async def store(self, raw: bytes, envelope: Envelope) -> int:
        """Durably spool one message; raises SpoolError when the store cannot commit."""
        if self.fail_writes is not None:
            raise SpoolError(str(self.fail_writes))
        if len(raw) >= self.inline_max:
            return await self.inline.store(raw, envelope)
        return int(await self._child.request(encode_request(raw, envelope)))

    def notify_committed(self, count: int) -> None:
        if self._on_commit:
            self._on_commit(count)

    async def close(self) -> None:
        """Let the child answer everything it was sent, then let it exit (EOF on its stdin)."""
        await self._child.close()
        await self.inline.close()


async def _read_reply(stdout: asyncio.StreamReader) -> tuple[bool, Any]:
    ident, elen = _REP.unpack(await stdout.readexactly(_REP.size))
    err = (await stdout.readexactly(elen)).decode("utf-8", "replace") if elen else ""
    return (True, ident) if ident >= 0 else (False, err or "spool commit failed")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(child_main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])))
