"""The spool writer in its own process: the listeners' event loop and the commit no longer share one GIL.

Measured (bench/ingest.py, 16 sessions, 4 KB): with the writer as a thread of the listening process a
group commit of ~8 messages took 2.2–2.8 ms, against 0.8 ms for the very same `spool_many` call in a process
of its own — the writer thread waited for the GIL after each SQLite call while the loop served sessions, and
every session in the batch waited for that commit before its 250. A child process commits on the other core.

Wire (stdin → child): `!II` meta length, raw length; JSON meta (the envelope); the raw bytes.
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
import collections
import datetime as dt
import logging
import marshal
import os
import select
import struct
import sys
import time
from typing import Any

from gateway.spool import Envelope, SpoolError, SpoolWriter

log = logging.getLogger(__name__)

_REQ = struct.Struct("!II")
_REP = struct.Struct("!qI")
_READ_CHUNK = 1 << 20


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


def child_main(synchronous: str, max_batch: int, max_wait_ms: float = 0.0) -> int:  # pragma: no cover - child
    from gateway.childproc import die_with_parent
    from gateway.logs import setup_logging
    from gateway.spool import spool_many, spool_many_sqlite
    from gateway.store import open_store

    die_with_parent()
    setup_logging()
    url = os.environ.pop(_URL_ENV)
    _grow_pipe(0)
    engine = open_store(url, synchronous=synchronous, migrate=False)
    if engine.dialect.name == "sqlite":  # one connection for the child's life, pragmas applied by the engine
        raw_conn = engine.raw_connection()
        dialect = engine.dialect

        def commit(items: list[tuple[bytes, Envelope]]) -> list[int]:
            return spool_many_sqlite(raw_conn.driver_connection, dialect, items)
    else:
        def commit(items: list[tuple[bytes, Envelope]]) -> list[int]:
            return spool_many(engine, items)
    buf = bytearray()
    eof = False
    while True:
        items, used = take_frames(buf, max_batch)
        if not items:
            if eof:
                return 0
            data = os.read(0, _READ_CHUNK)  # block for the next request
            if not data:
                eof = True
            buf += data
            continue
        # Company for this commit: whatever else is already waiting in the pipe (and, with `group_commit_ms`,
        # what arrives within that long).
        deadline = time.monotonic() + max_wait_ms / 1000.0
        while len(items) < max_batch and not eof and \
                select.select([0], [], [], max(0.0, deadline - time.monotonic()))[0]:
            data = os.read(0, _READ_CHUNK)
            if not data:
                eof = True
                break
            buf += data
            items, used = take_frames(buf, max_batch)
        del buf[:used]
        try:
            ids = commit(items)
            reply = b"".join(_REP.pack(i, 0) for i in ids)
        except Exception as exc:  # every sender in the batch answers 451; nothing of the batch is kept
            log.error("spool commit failed for %d message(s): %s", len(items), exc)
            err = str(exc).encode("utf-8", "replace")[:2000]
            reply = b"".join(_REP.pack(-1, len(err)) + err for _ in items)
        _write_all(1, reply)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _grow_pipe(fd: int) -> None:
    """A 100 KB message fits a 1 MiB pipe in one write (64 KiB default: several wake-ups per message)."""
    try:
        import fcntl

        fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ
    except (OSError, ImportError):
        pass


# ------------------------------------------------------------------------------------------ the parent
class ProcessSpoolWriter:
    """`SpoolWriter`'s interface, committing in a child process (`python -m gateway.spool_process`)."""

    def __init__(self, url: str, *, synchronous: str = "FULL", max_batch: int = 64, max_wait_ms: float = 0.0,
                 inline: SpoolWriter, inline_max: int = 1 << 20, on_commit: Any = None):
        self.url = url
        self.synchronous = synchronous
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.inline = inline            # large messages, and the fallback's interface for tests
        self.inline_max = inline_max
        self._on_commit = on_commit
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: collections.deque[asyncio.Future[int]] = collections.deque()
        self._spawn_lock = asyncio.Lock()
        self.fail_writes: Exception | None = None  # fault injection for tests (disk full and such)
        self.children_started = 0

    @property
    def child_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self) -> None:
        await self.inline.start()
        await self._ensure_child()

    async def _ensure_child(self) -> asyncio.subprocess.Process:
        if self._child_up():
            assert self._proc is not None
            return self._proc
        async with self._spawn_lock:
            if self._child_up():  # another store started it while this one waited for the lock
                assert self._proc is not None
                return self._proc
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.spool_process", self.synchronous, str(self.max_batch),
                str(self.max_wait_ms),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=_child_env(self.url))
            self.children_started += 1
            _grow_pipe_transport(self._proc)
            self._reader = asyncio.create_task(self._read_replies(self._proc), name="spool-writer-replies")
            log.info("spool writer process %d started", self._proc.pid)
            return self._proc

    def _child_up(self) -> bool:
        return (self._proc is not None and self._proc.returncode is None and self._reader is not None
                and not self._reader.done())

    async def store(self, raw: bytes, envelope: Envelope) -> int:
        """Durably spool one message; raises SpoolError when the store cannot commit."""
        if self.fail_writes is not None:
            raise SpoolError(str(self.fail_writes))
        if len(raw) >= self.inline_max:
            return await self.inline.store(raw, envelope)
        proc = await self._ensure_child()
        assert proc.stdin is not None
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        try:
            proc.stdin.write(encode_request(raw, envelope))
            if proc.stdin.transport.get_write_buffer_size() > 8 << 20:  # the child is behind: wait for it
                await proc.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            if not fut.done():
                fut.set_exception(SpoolError(f"spool writer process unavailable: {exc}"))
        return await fut

    async def _read_replies(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                head = await proc.stdout.readexactly(_REP.size)
                ident, elen = _REP.unpack(head)
                err = (await proc.stdout.readexactly(elen)).decode("utf-8", "replace") if elen else ""
                if not self._pending:
                    log.error("spool writer process answered a request nobody sent")
                    continue
                fut = self._pending.popleft()
                if fut.done():
                    continue
                if ident >= 0:
                    fut.set_result(ident)
                    if self._on_commit:
                        self._on_commit(1)
                else:
                    fut.set_exception(SpoolError(err or "spool commit failed"))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        code = await proc.wait()
        if self._pending:
            log.error("spool writer process %d exited (code %s) with %d message(s) unanswered; they get 451",
                      proc.pid, code, len(self._pending))
        self._fail_pending(SpoolError(f"spool writer process exited (code {code})"))

    def _fail_pending(self, err: SpoolError) -> None:
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(err)

    def notify_committed(self, count: int) -> None:
        if self._on_commit:
            self._on_commit(count)

    async def close(self) -> None:
        """Let the child answer everything it was sent, then let it exit (EOF on its stdin)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        proc = self._proc
        if proc is not None and proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.inline.close()


def _child_env(url: str) -> dict[str, str]:
    env = dict(os.environ)
    env[_URL_ENV] = url
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _grow_pipe_transport(proc: asyncio.subprocess.Process) -> None:
    transport = proc.stdin.transport if proc.stdin is not None else None
    pipe = transport.get_extra_info("pipe") if transport is not None else None
    if pipe is not None:
        _grow_pipe(pipe.fileno())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(child_main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
