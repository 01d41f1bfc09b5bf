"""merge runs carry their process (host, pid) and a heartbeat, so a run whose process died can be told from one
still working; per-tensor checksums of ingested models; store paths relative to the store, so a home can be moved or restored from a backup

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('merge_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('host', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('pid', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tensor_checksums', JSON, nullable=True))
    # an absolute /home/…/store/sha256-… becomes its entry's name; the registry joins it to its store root
    conn = op.get_bind()
    models = sa.table('models', sa.column('id', sa.Integer), sa.column('store_path', sa.Text))
    for row_id, path in conn.execute(sa.select(models.c.id, models.c.store_path)).all():
        name = path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        if name != path:
            conn.execute(models.update().where(models.c.id == row_id).values(store_path=name))


def downgrade() -> None:
    with op.batch_alter_table('merge_runs', schema=None) as batch_op:
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('pid')
        batch_op.drop_column('host')
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('tensor_checksums')
