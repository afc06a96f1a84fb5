"""Opening the store: one SQLAlchemy engine for SQLite (embedded default) or PostgreSQL (shared).

SQLite runs in WAL mode with `synchronous=FULL`, so a commit is an fsync'd, durable write: the listener's
250 depends on that. PostgreSQL gets a pool; `FOR UPDATE SKIP LOCKED` lets several nodes claim work.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from gateway.config import Config

log = logging.getLogger(__name__)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes; treat them as the UTC they were written as."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite file store (absolute); None for PostgreSQL and in-memory stores. What
    lives beside the file (the body log, the disk it shares) is found from here."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:" \
            or parsed.database.startswith("file:"):
        return None
    return Path(os.path.abspath(parsed.database))


def make_engine(url: str, *, synchronous: str = "FULL", pool_size: int = 8, page_size: int = 4096) -> Engine:
    """Create an engine with the durability settings the spool relies on."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, poolclass=NullPool if path == ":memory:" else None,
                               connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            # Only a new, empty database takes a page size (an existing one keeps its own until VACUUM).
            # `[storage] sqlite_page_size`: every page a commit touches is a WAL frame written and later
            # checkpointed. Measured per message in the writer process: at 4 KB, 4 KiB pages ≈90 µs and 16 KiB
            # ≈110 µs (the relay's bookkeeping: 450 vs 490–536 µs per mail); at 100 KB, 4 KiB ≈460 µs and
            # 8–16 KiB ≈360–410 µs (a body is 7 overflow pages instead of 25).
            cur.execute(f"PRAGMA page_size={int(page_size)}")
            _set_wal(cur)
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        # pysqlite's own transaction handling defers BEGIN; take the write lock at BEGIN instead, so two
        # writers queue on busy_timeout rather than failing with "database is locked" mid-transaction (in WAL
        # mode a deferred transaction that reads and then writes fails at once with SQLITE_BUSY_SNAPSHOT when
        # another writer committed in between). A connection from `reading()` begins deferred: a read must not
        # take the write lock, or every listing and lookup queues the spool writer (and so SMTP replies)
        # behind it for as long as it runs.
        @event.listens_for(engine, "connect")
        def _no_autobegin(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True,
                         pool_recycle=1800)


#: execution option of a `reading()` connection: its transactions begin deferred on SQLite (no write lock)
READ_ONLY = "mailgate_read_only"


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for reads only: `with reading(engine) as conn: conn.execute(select(...))`.

    On SQLite its transactions start with a plain (deferred) BEGIN, so it reads a WAL snapshot without the
    write lock, and the spool writer (and every other writer) commits while it runs. `engine.connect()` and
    `engine.begin()` take the write lock at BEGIN (see `make_engine`), which is right for a transaction that
    writes and wrong for a listing that reads for seconds. Do not write on this connection: a deferred
    transaction that writes after another process committed fails with SQLITE_BUSY_SNAPSHOT. On PostgreSQL it
    is a plain connection."""
    with engine.connect() as conn:
        yield conn.execution_options(**{READ_ONLY: True})


def _set_wal(cur: Any, tries: int = 100) -> None:
    """`PRAGMA journal_mode=WAL`, retried while the database is locked. Switching a new database to WAL takes
    an exclusive lock, and SQLite answers "database is locked" at once, without the busy timeout, when other
    processes have it open at that moment (serve, its helpers and worker processes, or two nodes starting
    together on a fresh store): one of them failed to start (seen in CI with four at once)."""
    for attempt in range(tries):
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == tries - 1:
                raise
            time.sleep(0.05 + random.random() * 0.05)


def init_store(engine: Engine) -> None:
    """Bring the schema to the newest revision (Alembic); idempotent and safe to run at every start."""
    from gateway.migrate import upgrade

    upgrade(engine)


def open_store(url: str, *, synchronous: str = "FULL", pool_size: int = 8, migrate: bool = True,
               page_size: int = 4096) -> Engine:
    engine = make_engine(url, synchronous=synchronous, pool_size=pool_size, page_size=page_size)
    if migrate:
        init_store(engine)
    return engine


def has_schema(engine: Engine) -> bool:
    return inspect(engine).has_table("messages")


def open_configured_store(config: Config, *, migrate: bool = True) -> Engine:
    """The store `config` names, with its `[storage]` durability and page-size settings (every process and
    command that opens the store goes through here, so a new setting cannot be missed at one of them)."""
    storage = config.storage
    return open_store(config.storage_url(), synchronous=storage.sqlite_synchronous,
                      page_size=storage.sqlite_page_size, migrate=migrate)
