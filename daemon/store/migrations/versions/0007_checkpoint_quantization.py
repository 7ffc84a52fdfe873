"""checkpoint quantization and second expert

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 10:20:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Both are filled in by the next scan of models/ (every daemon start scans).
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('quantization', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('transformer_2', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_column('transformer_2')
        batch_op.drop_column('quantization')
