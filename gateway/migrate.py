"""Schema migrations with Alembic, run programmatically (no alembic.ini to ship or find).

`upgrade(engine)` runs when the gateway starts (`serve`, `worker`) and in `mailgate migrate`: a new store
is created at head, an old one is migrated. Operator commands only `check` the schema: a newer `mailgate` run
by hand must not change the schema under a running older gateway.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

MIGRATIONS = Path(__file__).with_name("migrations")

#: PostgreSQL advisory lock key held by the migration transaction (b"mgmg"): one process migrates at a time.
MIGRATION_LOCK = 0x6D676D67


class SchemaMismatch(Exception):
    """The store's schema is not the one this code needs; the message says which command fixes it.
    `database_newer`: a newer mailgate migrated it (migrating cannot help; this code is the one to upgrade)."""

    def __init__(self, message: str, *, database_newer: bool = False):
        super().__init__(message)
        self.database_newer = database_newer


def alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate to `revision`. A database a newer mailgate migrated is refused with `SchemaMismatch` (Alembic
    would fail with "Can't locate revision" and a traceback, which does not say that this code is too old)."""
    for attempt in range(5):
        try:
            at = current(engine)
            if at is not None and at not in _known_revisions():
                raise _newer(engine, at)
            command.upgrade(alembic_config(engine), revision)
            return
        except OperationalError as exc:
            # SQLite: processes opening a new store together (serve, its helpers, two nodes) can meet a lock
            # the busy timeout does not cover; the migration is one transaction, so trying again is safe.
            if engine.dialect.name != "sqlite" or "locked" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.2)


def _known_revisions() -> set[str]:
    return {s.revision for s in ScriptDirectory(str(MIGRATIONS)).walk_revisions()}


def _newer(engine: Engine, at: str) -> SchemaMismatch:
    where = engine.url.render_as_string(hide_password=True)
    return SchemaMismatch(f"{where}: the database is at schema revision {at}, which this mailgate does not "
                          f"know (it knows up to {head()}): this mailgate is older than the database; use "
                          "the mailgate version the gateway runs", database_newer=True)


def current(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from gateway.store import reading  # (gateway.store runs migrations: imported here, not at the top)

    with reading(engine) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head() -> str:
    """The newest revision this code knows."""
    script = ScriptDirectory(str(MIGRATIONS))
    return str(script.get_current_head())


def check(engine: Engine) -> str:
    """The store's revision when it is the one this code needs; `SchemaMismatch` saying what to run if the
    store is not migrated yet, older than the code, or newer than it (a newer mailgate migrated it)."""
    at, want = current(engine), head()
    if at == want:
        return at
    where = engine.url.render_as_string(hide_password=True)
    if at is None:
        raise SchemaMismatch(f"{where}: no mailgate schema yet; run `mailgate migrate -c <config>` "
                             "(or start `mailgate serve`)")
    if at not in _known_revisions():
        raise _newer(engine, at)
    raise SchemaMismatch(f"{where}: the database is at schema revision {at}, this mailgate needs {want}; "
                         "run `mailgate migrate -c <config>` (the running gateway migrates at its next start)")
