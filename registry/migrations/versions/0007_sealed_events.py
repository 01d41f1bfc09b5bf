"""an audit event is appended with its place in the chain: the database refuses one without seq, prev_hash and
event_hash (a row written by hand outside the chain), where the engine can

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


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for column in ("seq", "prev_hash", "event_hash"):
            op.execute(f"ALTER TABLE promotion_events ALTER COLUMN {column} SET NOT NULL")
    else:
        op.execute(SQLITE_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for column in ("seq", "prev_hash", "event_hash"):
            op.execute(f"ALTER TABLE promotion_events ALTER COLUMN {column} DROP NOT NULL")
    else:
        op.execute("DROP TRIGGER IF EXISTS promotion_events_sealed")
