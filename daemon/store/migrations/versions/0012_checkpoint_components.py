"""checkpoint component sources recorded by the scan

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 15:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Filled in by the next scan of models/ (every daemon start scans); until then
    # `lorafarm models` scans by itself.
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('components_json', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_column('components_json')
