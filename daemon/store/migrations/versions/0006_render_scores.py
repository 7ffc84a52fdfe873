"""render scores and tags from post-processing

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 09:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'render_scores',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('render_id', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('value', sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(['render_id'], ['renders.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_render_scores_lookup', 'render_scores', ['kind', 'name', 'value'])
    op.create_index('ix_render_scores_render_id', 'render_scores', ['render_id'])


def downgrade() -> None:
    op.drop_index('ix_render_scores_render_id', table_name='render_scores')
    op.drop_index('ix_render_scores_lookup', table_name='render_scores')
    op.drop_table('render_scores')
