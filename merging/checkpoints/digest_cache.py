"""A checkpoint's digest remembered by its files' identity, so an unchanged file is never hashed twice.

The key is, per safetensors file of the checkpoint, (device, inode, size, mtime_ns, ctime_ns): a rewrite, an
append, a `touch` or a copy changes one of them (ctime catches an mtime set back by hand), so a hit means the very
same bytes were hashed before. What a hit gives back: the digest, the per-tensor checksums and whether the
bytes passed validation (names, finite values). A file that changes *while* it is hashed is not recorded (its
identity is taken before and after the read and must agree).

Stored in a small SQLite file under the home (stdlib sqlite3: `mergeyard digest` must not import SQLAlchemy).
The cache is only ever an optimisation: any error reading or writing it reads as a miss.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from merging.checkpoints.checkpoint import Checkpoint

CACHE_FILE = Path("cache") / "digests.sqlite"  # under the home
SCHEMA = """CREATE TABLE IF NOT EXISTS digests (
    stamp TEXT PRIMARY KEY, digest TEXT NOT NULL, checksums TEXT, validated INTEGER NOT NULL DEFAULT 0)"""
# one file's own sha256 by that file's stamp (merging.checkpoints.digest.sequential_files): what the store records for its copy
FILES_SCHEMA = "CREATE TABLE IF NOT EXISTS files (stamp TEXT PRIMARY KEY, sha256 TEXT NOT NULL)"


@dataclass(frozen=True)
class Cached:
    digest: str
    checksums: dict[str, str] | None
    validated: bool


def file_stamp(path: Path) -> tuple[int, int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def checkpoint_stamp(ckpt: Checkpoint) -> str:
    """The identity of every file the checkpoint's tensors are read from, in shard order."""
    return json.dumps([file_stamp(f) for f in ckpt.files])


def use_wal(db, *statements: str, patience_s: float = 10.0) -> None:
    """Put an SQLite connection's database in WAL mode, then run `statements`. Switching a *new* file to WAL
    takes an exclusive lock without waiting on the busy timeout, so two first users at once (the merge's prefetch
    threads, first-use processes) saw "database is locked" at once: retried here for `patience_s`. `db` is a
    DB-API connection to SQLite (stdlib or SQLAlchemy's raw one)."""
    deadline = time.monotonic() + patience_s
    while True:
        cur = db.cursor()
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            for statement in statements:
                cur.execute(statement)
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
        finally:
            cur.close()


class DigestCache:
    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30)
        try:
            use_wal(db, SCHEMA, FILES_SCHEMA)
        except sqlite3.Error:
            db.close()
            raise
        return db

    def lookup(self, ckpt: Checkpoint, *, stamp: str | None = None) -> Cached | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            stamp = stamp or checkpoint_stamp(ckpt)
            with self._connect() as db:
                row = db.execute("SELECT digest, checksums, validated FROM digests WHERE stamp = ?",
                                 (stamp,)).fetchone()
        except (OSError, sqlite3.Error):
            return None
        if row is None:
            return None
        return Cached(row[0], json.loads(row[1]) if row[1] else None, bool(row[2]))

    def record(self, ckpt: Checkpoint, before: str, digest: str, checksums: dict[str, str] | None = None,
               validated: bool = False, file_sha256: dict[str, str] | None = None) -> bool:
        """Remember what hashing `ckpt` gave, given its stamp taken before the read; False if it changed meanwhile.
        `file_sha256` (file path -> sha256): whole-file hashes the same read gave."""
        if self.path is None:
            return False
        try:
            if checkpoint_stamp(ckpt) != before:
                return False
            stamps = {str(f): json.dumps(s) for f, s in zip(ckpt.files, json.loads(before))}
            with self._connect() as db:
                db.execute("INSERT INTO digests (stamp, digest, checksums, validated) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT(stamp) DO UPDATE SET digest = excluded.digest, "
                           "checksums = COALESCE(excluded.checksums, digests.checksums), "
                           "validated = MAX(excluded.validated, digests.validated)",
                           (before, digest, json.dumps(checksums) if checksums else None, int(validated)))
                db.executemany("INSERT OR REPLACE INTO files (stamp, sha256) VALUES (?, ?)",
                               [(stamps[f], sha) for f, sha in (file_sha256 or {}).items() if f in stamps])
            return True
        except (OSError, sqlite3.Error):
            return False

    def file_sha256(self, path: Path) -> tuple[str, str] | None:
        """(sha256, stamp) of one file as an earlier read hashed it, if the file is unchanged since."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            stamp = json.dumps(file_stamp(path))
            with self._connect() as db:
                row = db.execute("SELECT sha256 FROM files WHERE stamp = ?", (stamp,)).fetchone()
        except (OSError, sqlite3.Error):
            return None
        return (row[0], stamp) if row else None

    def digest(self, ckpt: Checkpoint) -> str:
        """The checkpoint's digest: remembered, or computed (with its checksums) and remembered."""
        from merging.checkpoints.digest import checkpoint_digest

        before = checkpoint_stamp(ckpt)
        hit = self.lookup(ckpt, stamp=before)
        if hit is not None:
            return hit.digest
        checksums: dict[str, str] = {}
        value = checkpoint_digest(ckpt, checksums)
        self.record(ckpt, before, value, checksums)
        return value
