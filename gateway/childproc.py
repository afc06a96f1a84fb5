"""Child processes of `mailgate serve`: they must not outlive it (workers, commit helpers), and the commit
helpers are spoken to over a pipe (`PipeChild`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from gateway.metrics import HELPER_STARTS

log = logging.getLogger(__name__)


#: Signals that reach a child because they went to the whole process group (Ctrl-C in a terminal, a hang-up,
#: `kill -HUP -PGID`), not because anyone meant the child: `serve` answers them for its children (SIGINT stops
#: it, and it stops them in order; SIGHUP reloads it, and worker processes follow a reload counter).
GROUP_SIGNALS = (signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def signals_held(signals: tuple[int, ...] = GROUP_SIGNALS) -> Iterator[None]:
    """Block `signals` in this thread while a child process starts (multiprocessing's spawn, fork + exec):
    the child inherits the mask, so a SIGHUP or SIGINT sent to the process group in the second before it
    reaches `die_with_parent` stays pending there instead of killing it, and is then ignored. The child never
    unblocks them: it ignores them anyway. (uvloop's spawn, used for the commit helpers, resets the mask.)"""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def die_with_parent(signum: int = signal.SIGTERM, *, ignore: tuple[int, ...] = GROUP_SIGNALS) -> None:
    """Linux: get `signum` when the serve process dies (even by SIGKILL), so no orphan keeps running; and
    ignore `ignore`, which the parent answers for this child. By default SIGHUP killed a worker process it
    reached and SIGINT interrupted it mid-message."""
    for sig in ignore:
        signal.signal(sig, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signum)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signum)


# ------------------------------------------------------------------------------------------ pipe children
#: Reads one reply from the child's stdout: (True, value) or (False, error text). Raises
#: asyncio.IncompleteReadError at EOF.
ReplyReader = Callable[[asyncio.StreamReader], Awaitable[tuple[bool, Any]]]


class PipeChild:
    """A helper process spoken to over its stdin/stdout: requests go in order, replies come back in the
    same order, each resolving the oldest pending future.

    The commit helpers (`gateway.spool_process`, `gateway.batch_process`) share this: if the child dies, every
    request it had not answered fails with `error(text)` (callers answer 451 or retry), and the next request
    starts a new child. `env` carries what must not show in `ps` (a PostgreSQL password in the store URL).
    """

    def __init__(self, module: str, args: list[str], env: dict[str, str], read_reply: ReplyReader, *,
                 error: Callable[[str], Exception], name: str):
        self.module, self.args, self.env = module, args, env
        self.read_reply = read_reply
        self.error = error
        self.name = name
        self.on_reply: Callable[[bool], None] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._spawn_lock = asyncio.Lock()
        self._entering = 0                 # requests still waiting for the child to start (no future yet)
        self._entered = asyncio.Event()
        self._entered.set()
        self.children_started = 0

    @classmethod
    def commit_helper(cls, module: str, *, url: str, url_env: str, synchronous: str, max_batch: int,
                      max_wait_ms: float, read_reply: ReplyReader, error: Callable[[str], Exception],
                      name: str, extra_args: Sequence[str] = ()) -> "PipeChild":
        """A store-writing helper: `python -m module SYNC MAXBATCH MAXWAITMS [EXTRA…]`, the store URL in
        `url_env`."""
        return cls(module, [synchronous, str(max_batch), str(max_wait_ms), *extra_args], child_env({url_env: url}),
                   read_reply, error=error, name=name)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def up(self) -> bool:
        return (self._proc is not None and self._proc.returncode is None and self._reader is not None
                and not self._reader.done())

    async def ensure(self) -> asyncio.subprocess.Process:
        if self.up():
            assert self._proc is not None
            return self._proc
        async with self._spawn_lock:
            if self.up():  # another request started it while this one waited for the lock
                assert self._proc is not None
                return self._proc
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", self.module, *self.args,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=self.env)
            # Each child answers only the requests it was sent: its own queue of futures, so the reader of a
            # dead child can fail what that child left unanswered without touching the new child's requests.
            self._proc, self._pending = proc, collections.deque()
            self.children_started += 1
            HELPER_STARTS.labels(self.name).inc()
            grow_pipe_transport(proc)
            self._reader = asyncio.create_task(self._read_replies(proc, self._pending), name=f"{self.name}-replies")
            log.info("%s process %d started", self.name, proc.pid)
            return proc

    async def request(self, frame: bytes) -> Any:
        """Send one request; return the child's answer to it (or raise `error`)."""
        self._entering += 1
        self._entered.clear()
        try:
            proc = await self.ensure()
            assert proc.stdin is not None
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._pending.append(fut)
            try:
                proc.stdin.write(frame)
                if proc.stdin.transport.get_write_buffer_size() > 8 << 20:  # the child is behind: wait for it
                    await proc.stdin.drain()
            except (ConnectionError, RuntimeError) as exc:
                if not fut.done():
                    fut.set_exception(self.error(f"{self.name} process unavailable: {exc}"))
        finally:
            self._entering -= 1
            if not self._entering:
                self._entered.set()
        return await fut

    async def _read_replies(self, proc: asyncio.subprocess.Process,
                            pending: collections.deque[asyncio.Future[Any]]) -> None:
        assert proc.stdout is not None
        try:
            while True:
                ok, value = await self.read_reply(proc.stdout)
                if not pending:
                    log.error("%s process answered a request nobody sent", self.name)
                    continue
                fut = pending.popleft()
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(self.error(value or f"{self.name} failed"))
                if self.on_reply is not None:
                    self.on_reply(ok)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        code = await proc.wait()
        if pending:
            log.error("%s process %d exited (code %s) with %d request(s) unanswered; they fail", self.name,
                      proc.pid, code, len(pending))
        err = self.error(f"{self.name} process exited (code {code})")
        while pending:
            fut = pending.popleft()
            if not fut.done():
                fut.set_exception(err)

    async def close(self) -> None:
        """Let the child answer everything it was sent, then let it exit (EOF on its stdin)."""
        await self._entered.wait()  # requests that were waiting for the child to start are sent first
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


class HelperClient:
    """What a parent-side commit helper (`ProcessSpoolWriter`, `ProcessTransactionBatcher`) tells about its
    child process: tests kill it and count restarts."""

    _child: PipeChild

    @property
    def child_pid(self) -> int | None:
        return self._child.pid

    @property
    def children_started(self) -> int:
        return self._child.children_started


def commit_helper_store(url_env: str, synchronous: str) -> Any:  # pragma: no cover - runs in children
    """A commit helper child's start (the other end of `PipeChild.commit_helper`): die with the parent, log
    like it, take the store URL out of the environment, widen stdin, open the store (already migrated).

    The parent stops a helper by closing its stdin once every request was answered (`PipeChild.close`), so
    the helper ignores SIGTERM too: systemd's KillMode=control-group sends it to every process of the
    service at once, and a helper that died of it failed the commits of the sessions serve was draining
    (451 for mail serve had promised to finish). Only the parent's death still kills it (SIGKILL: nobody is
    left to answer, and SIGTERM is ignored)."""
    from gateway.logs import setup_logging
    from gateway.store import open_store

    die_with_parent(signal.SIGKILL, ignore=(signal.SIGTERM, *GROUP_SIGNALS))
    setup_logging()
    url = os.environ.pop(url_env)
    grow_pipe(0)
    return open_store(url, synchronous=synchronous, migrate=False)


def helper_store_url(engine: Any, writer: str) -> str | None:
    """The store URL for a commit helper process, or None when the work stays in the serve process: the config
    says `writer = "thread"`, or the store is in memory (a child could not see it)."""
    url = str(engine.url.render_as_string(hide_password=False))
    return None if writer == "thread" or ":memory:" in url else url


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The parent's environment plus `extra`, with this checkout importable (python -m gateway.…)."""
    env = dict(os.environ)
    env.update(extra)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def grow_pipe(fd: int) -> None:
    """A 100 KB request fits a 1 MiB pipe in one write (64 KiB default: several wake-ups per request)."""
    try:
        import fcntl

        fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ
    except (OSError, ImportError):
        pass


def grow_pipe_transport(proc: asyncio.subprocess.Process) -> None:
    transport = proc.stdin.transport if proc.stdin is not None else None
    pipe = transport.get_extra_info("pipe") if transport is not None else None
    if pipe is not None:
        grow_pipe(pipe.fileno())


_READ_CHUNK = 1 << 20


def serve_batches(take: Callable[[bytearray, int], tuple[list[Any], int]], answer: Callable[..., bytes], *,
                  max_batch: int, max_wait_ms: float = 0.0,
                  prepare: Callable[[list[Any]], Any] | None = None,
                  wants_prepare: Callable[[list[Any]], bool] = lambda items: True,
                  ) -> int:  # pragma: no cover - children
    """A commit helper's main loop: read requests from stdin, hand each batch to `answer`, write its replies.

    `take(buf, limit)` returns the complete requests at the start of `buf` (at most `limit`) and the bytes
    they used. A batch is whatever is already waiting in the pipe when the previous commit finished (group
    commit), plus, with `max_wait_ms`, what arrives within that long. Returns 0 at EOF (the parent closed
    our stdin: it is shutting down and has nothing more to send).

    With `prepare`, a batch goes through two stages: `prepare(items)` in a thread of its own, then
    `answer(items, future_of_prepare)` here, and the next batch's prepare overlaps this batch's answer (the
    spool writer syncs the next batch's body log appends while it commits this batch's rows). A batch for
    which `wants_prepare` is false skips the thread (its future is already done, with None)."""
    buf = bytearray()
    eof = False
    stage = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") if prepare is not None else None
    pending: tuple[list[Any], Future[Any]] | None = None  # prepared (or being prepared), not answered yet
    try:
        while True:
            if pending is not None and not eof and select.select([0], [], [], 0)[0]:
                data = os.read(0, _READ_CHUNK)  # whatever arrived, without waiting: the pending batch must go on
                eof = not data
                buf += data
            items, used = take(buf, max_batch)
            if not items:
                if pending is not None:
                    write_all(1, answer(*pending))
                    pending = None
                    continue
                if eof:
                    return 0
                data = os.read(0, _READ_CHUNK)  # block for the next request
                if not data:
                    eof = True
                buf += data
                continue
            deadline = time.monotonic() + max_wait_ms / 1000.0
            while len(items) < max_batch and not eof and \
                    select.select([0], [], [], max(0.0, deadline - time.monotonic()))[0]:
                data = os.read(0, _READ_CHUNK)
                if not data:
                    eof = True
                    break
                buf += data
                items, used = take(buf, max_batch)
            del buf[:used]
            if stage is None:
                write_all(1, answer(items))
                continue
            prepared = (items, stage.submit(prepare, items) if wants_prepare(items) else _NOTHING_TO_PREPARE)
            if pending is not None:
                write_all(1, answer(*pending))
            pending = prepared
    finally:
        if stage is not None:
            stage.shutdown(wait=True)


_NOTHING_TO_PREPARE: Future[Any] = Future()
_NOTHING_TO_PREPARE.set_result(None)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
