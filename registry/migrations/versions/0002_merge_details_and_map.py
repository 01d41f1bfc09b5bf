"""merge run details; MAP's sample cache and Pareto fronts

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), 'postgresql')
ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    with op.batch_alter_table('merge_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('details', JSON, nullable=True))

    op.create_table('map_samples',
    sa.Column('id', ID, autoincrement=True, nullable=False),
    sa.Column('key', sa.String(length=80), nullable=False),
    sa.Column('base_digest', sa.String(length=80), nullable=False),
    sa.Column('candidates', JSON, nullable=False),
    sa.Column('coefficients', JSON, nullable=False),
    sa.Column('suite_name', sa.String(length=128), nullable=False),
    sa.Column('suite_digest', sa.String(length=80), nullable=False),
    sa.Column('metrics', JSON, nullable=False),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key')
    )
    with op.batch_alter_table('map_samples', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_map_samples_suite_digest'), ['suite_digest'], unique=False)

    op.create_table('map_fronts',
    sa.Column('id', ID, autoincrement=True, nullable=False),
    sa.Column('suite_name', sa.String(length=128), nullable=False),
    sa.Column('suite_digest', sa.String(length=80), nullable=False),
    sa.Column('base_digest', sa.String(length=80), nullable=False),
    sa.Column('candidates', JSON, nullable=False),
    sa.Column('tasks', JSON, nullable=False),
    sa.Column('variant', sa.String(length=16), nullable=False),
    sa.Column('settings', JSON, nullable=False),
    sa.Column('surrogates', JSON, nullable=False),
    sa.Column('points', JSON, nullable=False),
    sa.Column('real_evaluations', sa.Integer(), nullable=False),
    sa.Column('mlflow_run_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('map_fronts')
    with op.batch_alter_table('map_samples', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_map_samples_suite_digest'))
    op.drop_table('map_samples')
    with op.batch_alter_table('merge_runs', schema=None) as batch_op:
        batch_op.drop_column('details')
