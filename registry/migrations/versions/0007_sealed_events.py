"""an audit event is appended with its place in the chain: the database refuses one without seq, prev_hash and
event_hash (a row written by hand outside the chain), where the engine can; on PostgreSQL the application's role
may no longer change where a model's bytes are (`models.store_path`) nor its identity (`digest`)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

SQLITE_TRIGGER = """
CREATE TRIGGER promotion_events_sealed BEFORE INSERT ON promotion_events
WHEN NEW.seq IS NULL OR NEW.prev_hash IS NULL OR NEW.event_hash IS NULL
BEGIN
    SELECT RAISE(ABORT, 'promotion_events: an event is appended with its place in the audit chain');
END
"""


# the columns of `models` the application updates (its MLflow version, its files after a restore, ...)
APP_UPDATES = ("name", "kind", "source_uri", "resolved_revision", "files", "architecture", "base_model_id",
               "num_params", "dtype", "size_bytes", "tensor_checksums", "mlflow_model_id", "mlflow_version")
APP_ROLE_SQL = f"""
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'mergeyard_app') THEN
        REVOKE UPDATE ON models FROM mergeyard_app;
        GRANT UPDATE ({', '.join(APP_UPDATES)}) ON models TO mergeyard_app;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'mergeyard: not allowed to change mergeyard_app here';
END
$$;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for column in ("seq", "prev_hash", "event_hash"):
            op.execute(f"ALTER TABLE promotion_events ALTER COLUMN {column} SET NOT NULL")
        op.execute(APP_ROLE_SQL)
    else:
        op.execute(SQLITE_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'mergeyard_app') THEN "
                   "GRANT UPDATE ON models TO mergeyard_app; END IF; END $$;")
        for column in ("seq", "prev_hash", "event_hash"):
            op.execute(f"ALTER TABLE promotion_events ALTER COLUMN {column} DROP NOT NULL")
    else:
        op.execute("DROP TRIGGER IF EXISTS promotion_events_sealed")
