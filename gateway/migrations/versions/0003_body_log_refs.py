"""message_body_refs: bodies of a SQLite spool kept in segment files (gateway/body_log.py)

A 100 KB body in SQLite is 25 WAL frames at commit and 25 page copies at checkpoint; in a segment file it is
one append and a share of one fdatasync. Rows here point at (segment, offset, length).

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('message_body_refs',
    sa.Column('message', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('segment', sa.String(length=128), nullable=False),
    sa.Column('byte_offset', sa.BigInteger(), nullable=False),
    sa.Column('byte_length', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['message'], ['messages.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('message')
    )
    with op.batch_alter_table('message_body_refs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_message_body_refs_segment'), ['segment'], unique=False)


def downgrade() -> None:
    kept = op.get_bind().execute(sa.text("SELECT count(*) FROM message_body_refs")).scalar()
    if kept:
        raise RuntimeError(f"{kept} message bodies live in body log segment files (message_body_refs); "
                           "revision 0002 cannot read them, so the downgrade is refused")
    with op.batch_alter_table('message_body_refs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_message_body_refs_segment'))
    op.drop_table('message_body_refs')
