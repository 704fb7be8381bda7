"""workers and their leases, job families and GPU time, files shared through the database

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 00:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('family', sa.String(length=16), server_default='ltx2', nullable=False))
        batch_op.add_column(sa.Column('worker_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('gpu_seconds', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('predicted_peak_gib', sa.Double(), nullable=True))
        batch_op.create_index('ix_jobs_user_id_started_at', ['user_id', 'started_at'], unique=False)
    # Jobs queued before this revision name their family only inside params.
    jobs = sa.table('jobs', sa.column('id', sa.Integer), sa.column('params', sa.JSON),
                    sa.column('family', sa.String))
    connection = op.get_bind()
    for job_id, params in connection.execute(sa.select(jobs.c.id, jobs.c.params)).all():
        family = (params or {}).get('family') if isinstance(params, dict) else None
        if family and family != 'ltx2':
            connection.execute(jobs.update().where(jobs.c.id == job_id).values(family=family))
    op.create_table('workers',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('gpu', sa.Integer(), nullable=True),
    sa.Column('gpu_name', sa.String(length=255), nullable=True),
    sa.Column('vram_budget_gib', sa.Double(), nullable=True),
    sa.Column('families', sa.JSON(), nullable=False),
    sa.Column('libraries', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('current_job_id', sa.Integer(), nullable=True),
    sa.Column('clips_rendered', sa.Integer(), nullable=False),
    sa.Column('drain_requested', sa.Boolean(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workers'))
    )
    op.create_table('blobs',
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_blobs'))
    )


def downgrade() -> None:
    op.drop_table('blobs')
    op.drop_table('workers')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_user_id_started_at')
        batch_op.drop_column('predicted_peak_gib')
        batch_op.drop_column('gpu_seconds')
        batch_op.drop_column('lease_until')
        batch_op.drop_column('worker_id')
        batch_op.drop_column('family')
