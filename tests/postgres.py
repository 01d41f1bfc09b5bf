"""A throwaway PostgreSQL cluster for the test session, and a fresh database per test.

initdb refuses to run as root, so as root the cluster belongs to the `postgres`
system user. Without PostgreSQL binaries the tests that need it skip, except
under CI (CI=true), where .ci/run installs them and a skip would hide a gap.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest


def find_bindir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(os.path.join(candidate, "initdb"), os.X_OK):
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_cluster_owner(args: list[str]) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        cmd = ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in args)]
    else:
        cmd = args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


class Cluster:
    """`password` set: connections over TCP must give it (scram-sha-256), as a team's server would; unset: trust."""

    def __init__(self, bindir: Path, password: str | None = None):
        self.bindir = bindir
        self.password = password
        self.root = Path(tempfile.mkdtemp(prefix="mergeyard-pg-"))
        self.port = _free_port()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        data = self.root / "data"
        auth = ["--auth=trust"]
        if password is not None:
            pwfile = self.root / "pwfile"
            pwfile.write_text(password + "\n")
            if os.geteuid() == 0:
                shutil.chown(pwfile, "postgres", "postgres")
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        init = _as_cluster_owner([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", *auth, "-E", "UTF8"])
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr}")
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        start = _as_cluster_owner([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(self.root / "pg.log"), "-w", "start"])
        if start.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {start.stderr}")

    def url(self, database: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        password = password if password is not None else (self.password if user == "postgres" else None)
        login = f"{user}:{password}" if password else user
        return f"postgresql+psycopg://{login}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        """A superuser connection (autocommit) for setting the cluster up."""
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", password=self.password,
                               dbname=database, autocommit=True)

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        _as_cluster_owner([str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "stop"])
        shutil.rmtree(self.root, ignore_errors=True)


def require_bindir() -> Path:
    bindir = find_bindir()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries are missing under CI; .ci/run should have installed the postgresql package")
        pytest.skip("PostgreSQL binaries not found (apt-get install postgresql): PostgreSQL variants skipped")
    return bindir


@pytest.fixture(scope="session")
def pg_cluster():
    cluster = Cluster(require_bindir())
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A fresh, empty lineage database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lineage.db'}"
        return
    cluster = request.getfixturevalue("pg_cluster")
    name = cluster.create_database()
    yield cluster.url(name)
    cluster.drop_database(name)
