"""farm hosts and per-host inventory

The checkpoints and loras tables are an index of files on disk (rebuilt by a scan at every
start; file hashes stay cached in file_hashes), so they are recreated with their new per-host
keys instead of altered: SQLite cannot drop the old unnamed UNIQUE constraints in place.
No history (jobs, renders, events, batches) is touched.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 12:15:05.812205
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def _checkpoints(unique: sa.UniqueConstraint, *host: sa.Column) -> None:
    op.create_table(
        'checkpoints',
        sa.Column('id', sa.Integer(), nullable=False),
        *host,
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('family', sa.String(length=64), nullable=True),
        sa.Column('lineage', sa.String(length=64), nullable=True),
        sa.Column('variant', sa.String(length=64), nullable=True),
        sa.Column('recognised_by', sa.String(length=64), nullable=True),
        sa.Column('config_path', sa.Text(), nullable=True),
        sa.Column('size_bytes', sa.BigInteger(), nullable=False),
        sa.Column('mtime_ns', sa.BigInteger(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=True),
        sa.Column('model_hash', sa.String(length=16), nullable=True),
        sa.Column('state', sa.String(length=32), nullable=False),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        unique,
    )


def _loras(unique: sa.UniqueConstraint, *host: sa.Column) -> None:
    op.create_table(
        'loras',
        sa.Column('id', sa.Integer(), nullable=False),
        *host,
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=True),
        sa.Column('autov2', sa.String(length=16), nullable=True),
        sa.Column('autov3', sa.String(length=16), nullable=True),
        sa.Column('size_bytes', sa.BigInteger(), nullable=False),
        sa.Column('mtime_ns', sa.BigInteger(), nullable=False),
        sa.Column('layout', sa.String(length=64), nullable=True),
        sa.Column('family', sa.String(length=64), nullable=True),
        sa.Column('architecture', sa.String(length=64), nullable=True),
        sa.Column('lineage', sa.String(length=64), nullable=True),
        sa.Column('lineage_source', sa.Text(), nullable=True),
        sa.Column('variant', sa.String(length=64), nullable=True),
        sa.Column('expert', sa.String(length=16), nullable=True),
        sa.Column('rank', sa.Integer(), nullable=True),
        sa.Column('alpha', sa.Double(), nullable=True),
        sa.Column('triggers_json', sa.Text(), nullable=False),
        sa.Column('base_model', sa.Text(), nullable=True),
        sa.Column('base_model_hash', sa.String(length=64), nullable=True),
        sa.Column('state', sa.String(length=32), nullable=False),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        unique,
    )
    op.create_index('ix_loras_name', 'loras', ['name'])
    op.create_index('ix_loras_sha256', 'loras', ['sha256'])


def upgrade() -> None:
    op.create_table(
        'hosts',
        sa.Column('name', sa.String(length=128), nullable=False),
        sa.Column('hostname', sa.String(length=255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('devices_json', sa.Text(), nullable=False),
        sa.Column('loaded_json', sa.Text(), nullable=False),
        sa.Column('current_batch', sa.Integer(), nullable=True),
        sa.Column('state', sa.String(length=32), nullable=False),
        sa.Column('started_at', sa.DateTime(), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )
    op.create_index('ix_hosts_heartbeat_at', 'hosts', ['heartbeat_at'])
    op.drop_index('ix_loras_name', table_name='loras')
    op.drop_index('ix_loras_sha256', table_name='loras')
    op.drop_table('loras')
    op.drop_table('checkpoints')
    _checkpoints(sa.UniqueConstraint('host', 'name', name='uq_checkpoints_host_name'),
                 sa.Column('host', sa.String(length=128), nullable=False))
    op.create_index('ix_checkpoints_host', 'checkpoints', ['host'])
    _loras(sa.UniqueConstraint('host', 'path', name='uq_loras_host_path'),
           sa.Column('host', sa.String(length=128), nullable=False))
    op.create_index('ix_loras_host', 'loras', ['host'])


def downgrade() -> None:
    op.drop_index('ix_loras_host', table_name='loras')
    op.drop_index('ix_loras_name', table_name='loras')
    op.drop_index('ix_loras_sha256', table_name='loras')
    op.drop_table('loras')
    op.drop_index('ix_checkpoints_host', table_name='checkpoints')
    op.drop_table('checkpoints')
    _checkpoints(sa.UniqueConstraint('name'))
    _loras(sa.UniqueConstraint('path'))
    op.drop_index('ix_hosts_heartbeat_at', table_name='hosts')
    op.drop_table('hosts')
