"""messages.retry_since: when an operator last released the message (`dead retry`, `quarantine release`)

The retry horizon ran from received_at, so mail put back after an outage longer than the horizon had one
attempt left: the first transient error parked it dead again. The horizon now runs from
coalesce(retry_since, received_at); NULL (every row before this revision) keeps the old meaning.

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('retry_since', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('retry_since')
