"""Two teams' jobs ingesting the same bytes at the same moment: one model, one MLflow version."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import random_family, save_checkpoint
from merging.checkpoints.digest import checkpoint_digest
from registry.schema import Model

WORKER = r"""
import json, sys, time
from pathlib import Path
from registry.registry import Registry, RegistryConfig
cfg = json.loads(sys.argv[1])
registry = Registry(RegistryConfig(cfg["db"], Path(cfg["store"]), Path(cfg["scratch"]), cfg["mlflow"], Path(cfg["artifacts"])))
registry.mirror.experiment_id  # warm up MLflow before the barrier, so the ingests really overlap
Path(cfg["go"] + f".ready-{sys.argv[2]}").touch()
go = Path(cfg["go"])
while not go.exists():
    time.sleep(0.01)
model, created = registry.ingest(cfg["path"], name="raced")
print(json.dumps({"id": model.id, "digest": model.digest, "created": created, "version": model.mlflow_version}))
"""


def test_concurrent_ingest_of_the_same_bytes(registry, tmp_path):
    base, _ = random_family(0, seed=21)
    path = save_checkpoint({k: v.repeat(8, *([1] * (v.dim() - 1))) if v.dim() else v for k, v in base.items()},
                           tmp_path / "raced.safetensors")
    digest = checkpoint_digest(path)
    before = len(registry.mirror.client.search_model_versions(f"tags.`mergeyard.digest` = '{digest}'"))
    cfg = registry.config
    spec = json.dumps({"db": cfg.database_url, "store": str(cfg.store_root), "scratch": str(cfg.scratch),
                       "mlflow": cfg.mlflow_tracking_uri, "artifacts": str(cfg.mlflow_artifact_root),
                       "path": str(path), "go": str(tmp_path / "go")})
    root = Path(__file__).resolve().parent.parent
    workers = 3
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, spec, str(i)], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(workers)]
    deadline = time.time() + 180
    while len(list(tmp_path.glob("go.ready-*"))) < workers and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break  # a worker died before the barrier: its error is reported below
        time.sleep(0.05)
    (tmp_path / "go").touch()  # every worker is ready: release them together
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert {o["digest"] for o in outputs} == {digest}
    assert len({o["id"] for o in outputs}) == 1
    assert sum(o["created"] for o in outputs) == 1
    assert registry.count(Model) == 1
    assert len(registry.mirror.client.search_model_versions(f"tags.`mergeyard.digest` = '{digest}'")) == before + 1
    assert [p.name for p in registry.store.root.iterdir() if not p.name.startswith(".")] == [digest.replace(":", "-")]
    assert not [p for p in registry.store.root.iterdir() if ".tmp-" in p.name]  # merging.runtime.atomic.TEMP_MARK


def test_a_write_that_outwaits_the_busy_timeout_is_retried(tmp_path, monkeypatch):
    """SQLite's busy timeout can run out under many writers (each holds the write lock while MLflow logs): the
    registration is retried with back-off instead of failing the job."""
    import sqlite3
    import threading

    import pytest
    from sqlalchemy.exc import OperationalError

    import registry.db
    import registry.registry
    from registry.registry import Registry, RegistryConfig

    monkeypatch.setattr(registry.db, "SQLITE_BUSY_SECONDS", 0.3)
    db = tmp_path / "lineage.db"
    reg = Registry(RegistryConfig(f"sqlite:///{db}", tmp_path / "store", tmp_path / "scratch", None, tmp_path / "mlruns"))
    paths = [save_checkpoint(random_family(0, seed=s)[0], tmp_path / f"m{s}.safetensors") for s in (1, 2)]

    def hold_write_lock(seconds: float) -> None:
        holder = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another writer, holding the lock past the timeout
        threading.Timer(seconds, lambda: (holder.rollback(), holder.close())).start()

    monkeypatch.setattr(registry.db, "LOCKED_RETRIES", 1)  # the retry loop every registry write shares
    hold_write_lock(1.0)
    with pytest.raises(OperationalError, match="database is locked"):  # without retries: the job fails
        reg.ingest(str(paths[0]))
    time.sleep(1.2)
    monkeypatch.setattr(registry.db, "LOCKED_RETRIES", 4)  # the retry loop every registry write shares
    hold_write_lock(1.0)
    model, created = reg.ingest(str(paths[1]))
    assert created and reg.count(Model) == 1 and reg.find_digest(model.digest) is not None
    assert reg.store.has(model.digest) and not reg.store.has(checkpoint_digest(paths[0]))
    reg.close()
