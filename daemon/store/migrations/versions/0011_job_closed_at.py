"""jobs record when their end was acted on (job file filed, sweep grid, job_finished sent)

A job can end in a process that cannot act on it (a cancel from the CLI, a host that died),
so the daemons look for ended jobs whose end nobody has acted on yet: `closed_at` is null.
Jobs that ended before this column existed were acted on then; they are marked closed.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-12 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('closed_at', sa.DateTime(), nullable=True))
    op.execute("UPDATE jobs SET closed_at = COALESCE(finished_at, created_at) "
               "WHERE state IN ('done', 'failed')")


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('closed_at')
