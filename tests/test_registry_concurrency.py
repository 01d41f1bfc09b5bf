"""Two teams' jobs ingesting the same bytes at the same moment: one model, one MLflow version."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import random_family, save_checkpoint
from merging.digest import checkpoint_digest
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
    assert not [p for p in registry.store.root.iterdir() if ".tmp-" in p.name]  # merging.atomic.TEMP_MARK
