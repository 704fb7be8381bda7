"""the process supervising a running job, and standby generators

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('supervisor_host', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('supervisor_pid', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('supervisor_start_ticks', sa.BigInteger(), nullable=True))
    op.create_table('standbys',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('supervisor_host', sa.String(length=255), nullable=False),
    sa.Column('supervisor_pid', sa.Integer(), nullable=False),
    sa.Column('supervisor_start_ticks', sa.BigInteger(), nullable=True),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('start_ticks', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_standbys'))
    )


def downgrade() -> None:
    op.drop_table('standbys')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('supervisor_start_ticks')
        batch_op.drop_column('supervisor_pid')
        batch_op.drop_column('supervisor_host')
