"""Runs whose process died: told apart from live ones by host, pid and heartbeat, and marked failed.

Every `running` merge run names its process and refreshes a heartbeat while it works. Whatever command opens the
registry next marks a run failed (reason: interrupted) once its process is gone: on this host when the pid is
dead, anywhere when the heartbeat is older than STALE_AFTER. Its MLflow run is closed as KILLED.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from sqlalchemy import select, update

from merging.runtime.processes import hostname, owner_alive
from registry.schema import MergeRun, utcnow

HEARTBEAT_SECONDS = 30.0
STALE_AFTER = timedelta(minutes=10)  # twenty missed heartbeats: the process is gone, wherever it ran


def _aware(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t  # SQLite drops the zone


def is_interrupted(run: MergeRun, now: datetime | None = None) -> bool:
    now = now or utcnow()
    alive = owner_alive(run.host, run.pid)
    if alive is not None:
        return not alive
    last = _aware(run.heartbeat_at) or _aware(run.started_at)
    return now - last > STALE_AFTER


def reap_interrupted(registry) -> list[int]:
    """Mark every `running` run whose process is gone failed; returns their ids."""
    with registry.Session() as s:
        running = s.scalars(select(MergeRun).where(MergeRun.status == "running")).all()
    reaped = []
    for run in running:
        if not is_interrupted(run):
            continue
        with registry.Session.begin() as s:  # only if it is still running: another opener may have reaped it
            done = s.execute(update(MergeRun).where(MergeRun.id == run.id, MergeRun.status == "running").values(
                status="failed", finished_at=utcnow(),
                error=f"interrupted: its process ({run.pid} on {run.host}) ended without finishing the run"))
        if done.rowcount:
            reaped.append(run.id)
            if registry.mirror is not None and run.mlflow_run_id:
                registry.mirror.close_run(run.mlflow_run_id, "KILLED")
    return reaped


class Heartbeat:
    """Refreshes a run's heartbeat from a daemon thread until stopped."""

    def __init__(self, registry, run_id: int, every: float = HEARTBEAT_SECONDS):
        self.registry, self.run_id, self.every = registry, run_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-run-{run_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                with self.registry.Session.begin() as s:
                    s.execute(update(MergeRun).where(MergeRun.id == self.run_id, MergeRun.status == "running")
                              .values(heartbeat_at=utcnow()))
            except Exception:  # a busy database this once: the next beat tries again
                pass

    def stop(self) -> None:
        self._stop.set()


def owner_columns() -> dict:
    import os

    return {"host": hostname(), "pid": os.getpid(), "heartbeat_at": utcnow()}
