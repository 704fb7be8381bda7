"""drafts: which jobs are drafts or finalizes, and how long a draft's latents are kept

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 01:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('draft', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('draft_of', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('draft_kept_until', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('draft_kept_until')
        batch_op.drop_column('draft_of')
        batch_op.drop_column('draft')
