"""Large message bodies of a SQLite spool, in append-only segment files next to the database.

Why: a 100 KB body stored in SQLite is 25 WAL frames written at commit and the same 25 pages copied again into
the database at checkpoint — in the spool writer that was ≈370 µs of system time per message, more than half
its cost (`bench/ingest.py`, 16 sessions). Appended to a segment file it is one `write` and a share of one
`fdatasync`. Bodies under `[storage] body_log_min` stay in `message_bodies` (a few KB share pages with the
row; an extra fsync per commit would cost them more than it saves).

Durability: a writer appends a batch's bodies, fdatasyncs the segment, and only then commits the rows that
point at them (`message_body_refs`: segment, offset, length). A crash in between leaves unreferenced bytes,
never a reference to bytes that are not on disk. Readers check the length and the message's sha256.

Segments: each writer process creates its own (no shared append offset between processes), holds a shared
`flock` on it while it may still append, and starts a new one past `segment_bytes`, only between batches —
so a segment whose lock is free will never gain a reference again. A segment is deleted when no reference to
it remains (retention, `delete_message`) and no writer holds it: `drop_unreferenced`.

PostgreSQL stores every body in `message_bodies` (the database may be on another host and shared by nodes).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import fcntl
import hashlib
import itertools
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".seg"
_counter = itertools.count()


class BodyLogError(Exception):
    """A referenced body cannot be read back as it was stored (segment missing, short or altered), or the
    body log's folder cannot be written."""


@dataclass(frozen=True)
class BodyRef:
    """Where one body lives: `length` bytes at `offset` of segment file `segment` (a name, not a path)."""

    segment: str
    offset: int
    length: int


def body_log_dir(url: str) -> Path | None:
    """`<database file>-bodies/` for a SQLite file store; None for PostgreSQL and in-memory stores."""
    from gateway.store import sqlite_file

    database = sqlite_file(url)
    return database.with_name(database.name + "-bodies") if database is not None else None


class BodyLog:
    """One writer's append side. Not thread-safe: one writer (process or thread) owns it."""

    def __init__(self, directory: Path, *, min_size: int, segment_bytes: int = 256 << 20):
        self.directory = Path(directory)
        self.min_size = min_size
        self.segment_bytes = segment_bytes
        self._fd: int | None = None  # the segment appended to, while it takes more
        self._name = ""
        self._end = 0
        self._held: dict[str, int] = {}  # every segment this writer locks, by name (see `append_all`)
        self._last: str | None = None    # where the last batch that succeeded went

    def check_writable(self) -> None:
        """At start-up, not at the first large mail (which would get 451 until someone reads the logs):
        create the folder and a file in it, or raise an error that says what to change."""
        probe = self.directory / f".probe-{os.getpid()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            os.unlink(probe)
        except OSError as exc:
            raise BodyLogError(f"body log folder {self.directory} is not writable ({exc.strerror}): fix its "
                               "permissions, or set [storage] body_log_min = 0 to keep every body in the "
                               "database") from None

    def wants(self, raw: bytes) -> bool:
        return len(raw) >= self.min_size

    def append_all(self, bodies: Iterable[bytes]) -> list[BodyRef]:
        """Append a batch's bodies and make them durable (one fdatasync); call before committing their refs.

        A segment stays locked while a batch appended to it may still be uncommitted. The spool process
        commits a batch's rows while it already appends the next batch's bodies, and it calls this only after
        the batch before the previous one was answered: so at entry only the previous batch's segment
        (`_last`) and the current one need their locks. A new segment is started only here, before a batch.
        """
        self._release_settled()
        if self._fd is None or self._end >= self.segment_bytes:
            self._open_segment()
        assert self._fd is not None
        refs = []
        try:
            for raw in bodies:
                refs.append(BodyRef(self._name, self._end, len(raw)))
                _write_all(self._fd, raw)
                self._end += len(raw)
            if refs:
                os.fdatasync(self._fd)
        except BaseException:
            # A short write leaves the file's end unknown, a failed fdatasync leaves its pages unknown: the
            # batch fails (451) and the next one starts a fresh segment. This one stays locked until then, and
            # so does `_last`, whose batch may still be committing.
            self._fd = None
            raise
        if refs:
            self._last = self._name
        return refs

    def close(self) -> None:
        for fd in self._held.values():
            os.close(fd)  # releases the flock: the segment is now immutable
        self._held.clear()
        self._fd, self._last = None, None

    def _release_settled(self) -> None:
        """Unlock the segments no uncommitted batch can be in: all but the current one and `_last`."""
        keep = {self._last, self._name if self._fd is not None else None}
        for name in [n for n in self._held if n not in keep]:
            os.close(self._held.pop(name))

    def _open_segment(self) -> None:
        """Create a segment under a temporary name, lock it, then give it its name: a collector only looks at
        named segments, so it can never see one that is not locked yet. The directory is synced so the name
        is durable before any committed row points at it (and its parent, when the folder is new).

        The name is published with `link`, which fails on an existing name, not `rename`, which replaces it:
        two gateways on one volume, each in a container where it is pid 1, made the same name in the same
        second, and the second rename replaced a segment whose bodies had been acknowledged. The name also
        carries random bits, so that such a clash is rare and only costs another try."""
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            _sync_dir(self.directory.parent)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        base = f"{stamp}-{os.getpid()}-{next(_counter)}"
        tmp = self.directory / f".{base}-{os.urandom(6).hex()}{SEGMENT_SUFFIX}.new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            for _ in range(100):
                name = f"{base}-{os.urandom(4).hex()}{SEGMENT_SUFFIX}"
                try:
                    os.link(tmp, self.directory / name)
                    break
                except FileExistsError:
                    continue
            else:
                raise BodyLogError(f"no free segment name in {self.directory}")
            os.unlink(tmp)
            _sync_dir(self.directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._fd, self._name, self._end = fd, name, 0
        self._held[name] = fd
        log.info("body log: new segment %s", self.directory / name)


def read_body(directory: Path, ref: BodyRef, sha256: str | None = None) -> bytes:
    """The stored bytes, checked against the reference's length and (when given) the message's sha256."""
    path = directory / ref.segment
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BodyLogError(f"body log segment {path} is missing (restore it, then release the message)") from None
    try:
        chunks = []
        got = 0
        while got < ref.length:
            chunk = os.pread(fd, min(ref.length - got, 1 << 24), ref.offset + got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) != ref.length:
        raise BodyLogError(f"body log segment {path} ends before byte {ref.offset + ref.length} "
                           f"(has {ref.offset + len(data)}): truncated")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise BodyLogError(f"body at {path}:{ref.offset} does not match the message's sha256: altered")
    return data


def drop_unreferenced(directory: Path, segments: Iterable[str], still_referenced: Any) -> list[str]:
    """Delete the named segments that no row references and no writer holds; returns the deleted names.

    `still_referenced(name) -> bool` asks the store. It is asked while we hold the segment's exclusive lock,
    which a writer's shared lock excludes: a segment that can still gain references is never deleted."""
    dropped = []
    for name in sorted(set(segments)):
        if not name.endswith(SEGMENT_SUFFIX) or "/" in name or name.startswith("."):
            continue
        path = directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue  # a writer's current segment
                raise
            if still_referenced(name):
                continue
            os.unlink(path)
            dropped.append(name)
        finally:
            os.close(fd)
    if dropped:
        _sync_dir(directory)
        log.info("body log: deleted %d segment(s) no message refers to: %s", len(dropped), ", ".join(dropped))
    return dropped


def erase(directory: Path, refs: Iterable[BodyRef]) -> int:
    """Punch holes where these (no longer referenced) bodies were: the bytes read back as zeros and their
    blocks are freed now, not when the last message of the segment goes. Retention is a privacy promise
    (`[retention] raw_days`), and one unfinished message can keep a segment alive for a long time.
    Returns how many were erased; on a filesystem without hole punching they stay until the segment goes."""
    by_segment: dict[str, list[BodyRef]] = {}
    for ref in refs:
        by_segment.setdefault(ref.segment, []).append(ref)
    erased = 0
    for name, items in by_segment.items():
        try:
            fd = os.open(directory / name, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            for ref in items:
                if _FALLOCATE is None or _FALLOCATE(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                                                    ref.offset, ref.length):
                    why = os.strerror(ctypes.get_errno()) if _FALLOCATE is not None else "no fallocate(2)"
                    log.warning("body log: cannot punch holes in %s (%s); purged bodies stay on disk until "
                                "nothing in the segment is referenced", directory / name, why)
                    break
                erased += 1
            os.fdatasync(fd)
        finally:
            os.close(fd)
    return erased


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _fallocate() -> Any:
    """fallocate(2) with flags (Linux; os.posix_fallocate only allocates), or None where libc has none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fn


_FALLOCATE = _fallocate()


def sweep_leftovers(directory: Path, *, older_than: float = 3600.0) -> list[str]:
    """Delete what a crash can leave besides segments: a `.seg.new` created but not yet linked to its
    name and removed (a writer does both microseconds later, so one an hour old has no writer) and a start-up `.probe-*` file. Neither
    is ever referenced. Returns the deleted names."""
    cutoff = time.time() - older_than
    gone = []
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        if not (path.name.endswith(SEGMENT_SUFFIX + ".new") or path.name.startswith(".probe-")):
            continue
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                gone.append(path.name)
        except FileNotFoundError:
            continue
    if gone:
        log.info("body log: deleted %d file(s) left by a crash: %s", len(gone), ", ".join(sorted(gone)))
    return gone


def segment_names(directory: Path) -> list[str]:
    try:
        return sorted(p.name for p in directory.iterdir() if p.name.endswith(SEGMENT_SUFFIX))
    except FileNotFoundError:
        return []


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
