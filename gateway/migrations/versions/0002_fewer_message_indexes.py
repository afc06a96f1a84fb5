"""drop three secondary indexes on messages that no query needs

Every spooled message wrote six index entries besides the row; `state` alone and `next_attempt_at` alone are
covered by `ix_messages_claim (state, next_attempt_at)`, and `sha256` alone by `ix_messages_dedupe
(message_id, sha256)` (the duplicate lookup always has both). Fewer b-tree pages per group commit: the spool
writer's commit is mostly page writes (bench/ingest.py).

Revision ID: 0002
Revises: 0001
"""
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_messages_state'))
        batch_op.drop_index(batch_op.f('ix_messages_sha256'))
        batch_op.drop_index(batch_op.f('ix_messages_next_attempt_at'))


def downgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_messages_next_attempt_at'), ['next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_messages_sha256'), ['sha256'], unique=False)
        batch_op.create_index(batch_op.f('ix_messages_state'), ['state'], unique=False)
