"""Free space where a SQLite spool lives: refuse new mail at MAIL FROM, before a write would fail.

Without this, a full disk shows up as a 451 after the client has sent the whole message, for every message,
while `/healthz` (a read) still says "ok". Postfix refuses at MAIL FROM instead (`queue_minfree`, and 1.5 times
the declared SIZE): the client learns it before DATA, and tries another MX or later. Here the same, with
`[storage] min_free_mb` of headroom kept for what the workers still have to write.

PostgreSQL stores are not checked: the database's disk is not this host's to see.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

REFUSAL = "452 4.3.1 Insufficient system storage; try again later"


def _available(path: Path) -> int:
    """What an unprivileged process may still use on the filesystem that holds (or will hold: the store's
    folder is created at the first start) `path`. Unknown counts as plenty: the check then refuses nothing,
    and a write that fails still answers 451 and loses nothing."""
    while not path.exists() and path.parent != path:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError as exc:
        log.warning("cannot see the free space of %s: %s", path, exc)
        return sys.maxsize
    return st.f_bavail * st.f_frsize


@dataclass
class FreeSpace:
    """The filesystem holding `path`, looked at no more than once per `ttl` seconds (MAIL FROM is per message)."""

    path: Path
    min_free: int
    ttl: float = 1.0
    available: Callable[[Path], int] = _available
    warn_every: float = 60.0
    _at: float = field(default=-math.inf, init=False)
    _free: int = field(default=0, init=False)
    _refused: int = field(default=0, init=False)
    _warned_at: float = field(default=-math.inf, init=False)

    def free(self) -> int:
        now = time.monotonic()
        if now - self._at >= self.ttl:
            self._free, self._at = self.available(self.path), now
        return self._free

    def refusal(self, declared_size: int = 0) -> str | None:
        """The reply that refuses a new transaction, or None. A declared SIZE must fit 1.5 times over: the body
        is written once, and once more where SQLite copies its pages at checkpoint."""
        if self.free() < self.min_free + declared_size * 3 // 2:
            self._warn()
            return REFUSAL
        return None

    def _warn(self) -> None:
        """Once per `warn_every` seconds, with the count: while the disk is full every sender is refused."""
        self._refused += 1
        now = time.monotonic()
        if now - self._warned_at >= self.warn_every:
            log.warning("refusing new mail (%d time(s) since the last warning): %d bytes free in %s, "
                        "[storage] min_free_mb keeps %d", self._refused, self._free, self.path, self.min_free)
            self._refused, self._warned_at = 0, now


def declared_size(mail_options: list[str]) -> int:
    """The SIZE= parameter of MAIL FROM (RFC 1870), 0 when absent or not a number."""
    for option in mail_options:
        if option[:5].upper() == "SIZE=" and option[5:].isdigit():
            return int(option[5:])
    return 0


def storage_refusal(free_space: FreeSpace | None, mail_options: list[str]) -> str | None:
    """452 4.3.1 when the spool's disk cannot take this message (its declared SIZE), else None."""
    return free_space.refusal(declared_size(mail_options)) if free_space is not None else None


def spool_free_space(storage_url: str, min_free_mb: int) -> FreeSpace | None:
    """The check for a SQLite file store (its folder also holds the body log); None for other stores or 0."""
    from gateway.store import sqlite_file

    database = sqlite_file(storage_url) if min_free_mb else None
    return FreeSpace(database.parent, min_free_mb * 1024 * 1024) if database is not None else None
