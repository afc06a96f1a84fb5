"""Alembic environment: uses the engine handed over by gateway.migrate (or the URL for the CLI)."""

from alembic import context
from sqlalchemy import create_engine

from gateway.schema import metadata

config = context.config
engine = config.attributes.get("engine") or create_engine(config.get_main_option("sqlalchemy.url"))

with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    context.run_migrations()
