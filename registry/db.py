"""Database connections and schema migrations (Alembic, run programmatically).

The URL comes from MERGEYARD_DATABASE_URL (default: SQLite under
MERGEYARD_HOME). An embedded SQLite database is upgraded on first use; a
shared PostgreSQL database is upgraded only by `mergeyard db upgrade`, so a
team decides when its schema changes.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
import time
from typing import Callable, Iterator, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from merging.checkpoints.digest_cache import use_wal
from registry.errors import RegistryError, SchemaOutOfDateError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# pg_advisory_xact_lock key for schema upgrades: any fixed 64-bit number no other tool of the database uses
PG_UPGRADE_LOCK = 0x6D65_7267_6579_6172  # "mergeyar"
# how long a writer waits for SQLite's write lock before "database is locked" (seconds)
SQLITE_BUSY_SECONDS = 120


def sqlite_path(engine: Engine) -> Path | None:
    db = engine.url.database if engine.dialect.name == "sqlite" else None
    return Path(db) if db and db != ":memory:" else None


@contextmanager
def schema_lock(engine: Engine) -> Iterator[None]:
    """Serialise schema creation and upgrades between processes: a file lock beside an SQLite file (PostgreSQL
    takes an advisory lock inside the upgrade's own transaction). Eight first-use jobs at once each ran the
    initial migration and seven failed with `table models already exists`."""
    path = sqlite_path(engine)
    if path is None:
        yield
        return
    from filelock import FileLock

    with FileLock(str(path) + ".lock", timeout=600):
        yield


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise RegistryError(f"MERGEYARD_DATABASE_URL {url!r} is not a database URL") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # Several processes share one embedded database: wait for the writer instead of failing.
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            use_wal(dbapi_conn, "PRAGMA foreign_keys=ON", f"PRAGMA busy_timeout={SQLITE_BUSY_SECONDS * 1000}")

        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return create_engine(url, pool_pre_ping=True)


LOCKED_RETRIES = 4
T = TypeVar("T")


def is_locked(exc: OperationalError) -> bool:
    """SQLite's "database is locked": a writer outwaited the busy timeout (worth a retry, not a failure)."""
    return "database is locked" in str(getattr(exc, "orig", exc))


def retry_when_locked(write: Callable[[], T], on_give_up: Callable[[], None] | None = None) -> T:
    """`write()`, again after a pause while SQLite's busy timeout runs out under many writers; `on_give_up` runs
    before the last failure propagates (or before any other database error does)."""
    for attempt in range(LOCKED_RETRIES):
        try:
            return write()
        except OperationalError as exc:
            if not is_locked(exc) or attempt == LOCKED_RETRIES - 1:
                if on_give_up is not None:
                    on_give_up()
                raise
            time.sleep(0.5 * 2 ** attempt)
    raise AssertionError("unreachable")


def _alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def head_revision(engine: Engine) -> str:
    return ScriptDirectory.from_config(_alembic_config(engine)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise RegistryError(f"cannot connect to the lineage database {engine.url!r}: {exc.orig}") from None


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to `revision` (what `mergeyard db upgrade` runs)."""
    with schema_lock(engine):
        _apply(engine, revision)


def _apply(engine: Engine, revision: str) -> None:
    config = _alembic_config(engine)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # held to the transaction's end: a second upgrader waits, then
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_UPGRADE_LOCK})")  # finds nothing to do
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def ensure_schema(engine: Engine) -> None:
    """Upgrade an embedded SQLite database; require a current schema elsewhere."""
    current = current_revision(engine)
    if current == head_revision(engine):
        return
    if engine.dialect.name == "sqlite":
        with schema_lock(engine):  # another first-use process may have upgraded it while this one waited
            if current_revision(engine) != head_revision(engine):
                _apply(engine, "head")
        return
    raise SchemaOutOfDateError(
        f"the lineage database is at schema {current or 'none'}, this mergeyard needs {head_revision(engine)}; "
        "run `mergeyard db upgrade`"
    )
