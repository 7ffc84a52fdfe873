"""renders count the process deaths they were caught in (interrupted renders retry alone)

Revision ID: 0010
Revises: 0008
Create Date: 2026-12-05 12:50:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('renders', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deaths', sa.Integer(), nullable=False,
                                      server_default='0'))
        batch_op.create_index('ix_renders_retry_alone', ['state', 'deaths'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('renders', schema=None) as batch_op:
        batch_op.drop_index('ix_renders_retry_alone')
        batch_op.drop_column('deaths')
