"""the promotion log hash-chained (seq, prev_hash, event_hash; existing events chained in id order), and on
PostgreSQL the least-privilege roles: mergeyard_app may only INSERT and SELECT the log

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

import importlib

from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

initial = importlib.import_module("registry.migrations.versions.0001_initial_schema")

# The roles a team grants its users (`GRANT mergeyard_app TO alice`): the application's may append to the audit
# log and read it, never change it; the admin's (who runs `mergeyard db upgrade`) owns the schema.
APP_ROLE_SQL = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mergeyard_app') THEN
        CREATE ROLE mergeyard_app NOLOGIN;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO mergeyard_app', current_database());
    GRANT USAGE ON SCHEMA public TO mergeyard_app;
    GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO mergeyard_app;
    REVOKE UPDATE, DELETE, TRUNCATE ON promotion_events FROM mergeyard_app;
    -- the schema's version is the admin's to move (`mergeyard db upgrade`), never the application's
    REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON alembic_version FROM mergeyard_app;
    GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO mergeyard_app;
    -- tables later migrations create (as the same admin) are the application's to use as well
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO mergeyard_app;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO mergeyard_app;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'mergeyard: not allowed to create roles here; create mergeyard_app as README "Running it for a team" says';
END
$$;
"""


def upgrade() -> None:
    with op.batch_alter_table('promotion_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('seq', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('prev_hash', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('event_hash', sa.String(length=64), nullable=True))
        batch_op.create_unique_constraint('uq_promotion_events_seq', ['seq'])
    # events written before the chain existed are chained once, here (the only time the log is rewritten)
    from registry.audit_chain import rechain

    initial.drop_append_only_triggers()
    rechain(op.get_bind())
    initial.create_append_only_triggers()
    if op.get_bind().dialect.name == "postgresql":
        op.execute(APP_ROLE_SQL)


def downgrade() -> None:
    initial.drop_append_only_triggers()
    with op.batch_alter_table('promotion_events', schema=None) as batch_op:
        batch_op.drop_constraint('uq_promotion_events_seq', type_='unique')
        batch_op.drop_column('event_hash')
        batch_op.drop_column('prev_hash')
        batch_op.drop_column('seq')
    initial.create_append_only_triggers()
