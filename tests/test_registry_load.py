"""Many first-use jobs at once on a fresh home (a team's scheduler starting its nightly jobs): every one succeeds.

Each job is what a user's scheduler runs: `mergeyard ingest CANDIDATE && mergeyard merge RECIPE`, all jobs
sharing one base (ingested by every merge at the same moment). On a fresh home eight such jobs used to fail
seven times with `table models already exists` (each ran the initial migration). PostgreSQL is upgraded by
`mergeyard db upgrade`, so there the jobs start with that many concurrent upgrades.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import random_family, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CLI = f"{sys.executable} -m flows.cli"


def run_at_once(commands: list[str], env: dict, timeout: int = 900) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(["bash", "-c", c], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    deadline = time.time() + timeout
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=max(1, deadline - time.time()))
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def jobs_at_once(n: int, database_url: str, tmp_path: Path) -> None:
    base, fts = random_family(n, seed=77)
    base_path = save_checkpoint(base, tmp_path / "in" / "base.safetensors")
    home = tmp_path / "fresh-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(MERGEYARD_HOME=str(home), HF_HUB_OFFLINE="1")
    if not database_url.startswith("sqlite"):
        env["MERGEYARD_DATABASE_URL"] = database_url
        upgrades = run_at_once([f"{CLI} db upgrade"] * n, env)
        assert [u.returncode for u in upgrades] == [0] * n, [u.stderr[-800:] for u in upgrades if u.returncode]
    commands = []
    for i, sd in enumerate(fts):
        cand = save_checkpoint(sd, tmp_path / "in" / f"c{i}.safetensors")
        recipe = tmp_path / f"recipe{i}.yaml"
        recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(base_path), "models": [str(cand)],
                                          "parameters": {"lambda": 0.5}}))
        commands.append(f"{CLI} ingest {cand} --name c{i} && {CLI} merge {recipe} --name merged-{i}")
    results = run_at_once(commands, env)
    failed = [r.stderr[-1500:] for r in results if r.returncode]
    assert not failed, failed

    from merging.checkpoints.digest import checkpoint_digest
    from registry.registry import Registry, RegistryConfig
    from registry.schema import MergeRun, Model

    registry = Registry(RegistryConfig(database_url if not database_url.startswith("sqlite") else
                                       f"sqlite:///{(home / 'lineage.db').resolve()}", home / "store", home / "tmp",
                                       f"sqlite:///{(home / 'mlflow.db').resolve()}", home / "mlartifacts"))
    with registry.Session() as s:
        models = s.query(Model).all()
        runs = s.query(MergeRun).all()
    digests = [m.digest for m in models]
    assert len(digests) == len(set(digests)) == 1 + 2 * n  # the base once, n candidates, n merges
    assert checkpoint_digest(base_path) in digests
    assert sorted(m.name for m in models if m.kind == "merged") == sorted(f"merged-{i}" for i in range(n))
    assert [r.status for r in runs] == ["succeeded"] * n
    versions = registry.mirror.client.search_model_versions()
    assert sorted(v.tags["mergeyard.digest"] for v in versions) == sorted(digests)  # one version per model
    assert sorted(p.name for p in registry.store.entries()) == sorted(d.replace(":", "-") for d in digests)
    assert not [p for p in (home / "store").iterdir() if p.name.startswith(".")]
    registry.close()


@pytest.mark.slow  # 2 × ~2 min on a shared CI; the default suite keeps 8 first-use ingests on PostgreSQL with
# MLflow (tests/test_team_concurrency.py) and concurrent ingests on both databases (tests/test_registry_concurrency.py)
def test_eight_first_use_jobs_at_once(database_url, tmp_path):
    jobs_at_once(8, database_url, tmp_path)


@pytest.mark.slow
def test_thirty_two_first_use_jobs_at_once(database_url, tmp_path):
    jobs_at_once(32, database_url, tmp_path)
