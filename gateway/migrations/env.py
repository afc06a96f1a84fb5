"""Alembic environment: uses the engine handed over by gateway.migrate (or the URL for the CLI)."""

from alembic import context
from sqlalchemy import create_engine, text

from gateway.migrate import MIGRATION_LOCK
from gateway.schema import metadata

config = context.config
engine = config.attributes.get("engine") or create_engine(config.get_main_option("sqlalchemy.url"))

with engine.begin() as connection:
    if connection.dialect.name == "postgresql":
        # Every gateway process migrates at start: two nodes, serve and its worker processes, or serve and a
        # `mailgate migrate` starting together would otherwise both create the same tables (UniqueViolation on
        # pg_type) or drop the same index. The lock is held to the commit; whoever waited then finds the
        # schema at head and has nothing to do. (SQLite's BEGIN IMMEDIATE already serialises.)
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    context.configure(connection=connection, target_metadata=metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    context.run_migrations()
