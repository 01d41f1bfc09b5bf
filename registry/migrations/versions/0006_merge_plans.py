"""merge runs record the plan their merge executed (its JSON and digest): what each output tensor read, from
which byte ranges of which input, with which parameters, into which shard

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('merge_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('plan_digest', sa.String(length=80), nullable=True))
        batch_op.add_column(sa.Column('plan_json', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('merge_runs', schema=None) as batch_op:
        batch_op.drop_column('plan_json')
        batch_op.drop_column('plan_digest')
