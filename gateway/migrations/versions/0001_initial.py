"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Placeholder while the schema settles in this first development session; frozen before release.
    from gateway.schema import metadata

    metadata.create_all(op.get_bind())


def downgrade() -> None:
    from gateway.schema import metadata

    metadata.drop_all(op.get_bind())
