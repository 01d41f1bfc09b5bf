"""A team's database under concurrency: first-use ingests with MLflow's own store on PostgreSQL, and many
promotions of one alias at once — exact counts, a chain that verifies, every event's `previous` the holder it
really replaced, and no traceback."""

from __future__ import annotations

import json

import pytest

from conftest import random_family, save_checkpoint
from test_registry_load import CLI, run_at_once


@pytest.fixture
def team(pg_cluster, tmp_path):
    """A fresh home whose lineage database and MLflow store are two PostgreSQL databases."""
    import os

    lineage, tracking = pg_cluster.create_database(), pg_cluster.create_database()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(MERGEYARD_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1",
               MERGEYARD_DATABASE_URL=pg_cluster.url(lineage), MLFLOW_TRACKING_URI=pg_cluster.url(tracking))
    yield env
    for name in (lineage, tracking):
        pg_cluster.drop_database(name)


def _registry(env):
    from pathlib import Path

    from registry.registry import Registry, RegistryConfig

    home = Path(env["MERGEYARD_HOME"])
    return Registry(RegistryConfig(env["MERGEYARD_DATABASE_URL"], home / "store", home / "tmp",
                                   env["MLFLOW_TRACKING_URI"], home / "mlartifacts"))


def _ingest_at_once(env, tmp_path, n: int, name: str | None = None) -> list[str]:
    done = run_at_once([f"{CLI} db upgrade"], env)
    assert done[0].returncode == 0, done[0].stderr[-800:]
    paths = [save_checkpoint(sd, tmp_path / f"c{i}.safetensors") for i, sd in enumerate(random_family(n, seed=91)[1])]
    results = run_at_once([f"{CLI} ingest {p} --name {name or f'c{i}'} --json" for i, p in enumerate(paths)], env)
    failed = [r.stderr[-1200:] for r in results if r.returncode]
    assert not failed, failed
    return [json.loads(r.stdout)["digest"] for r in results]


def test_eight_first_use_ingests_with_mlflow_on_postgresql(team, tmp_path):
    digests = _ingest_at_once(team, tmp_path, 8)
    registry = _registry(team)
    assert sorted(m.digest for m in registry.list_models()) == sorted(digests)
    versions = registry.mirror.client.search_model_versions()
    assert sorted(v.tags["mergeyard.digest"] for v in versions) == sorted(digests)  # one version each
    assert len(list(registry.store.entries())) == 8  # no orphan entry
    registry.close()


def promotions_at_once(team, tmp_path, n: int) -> None:
    digests = _ingest_at_once(team, tmp_path, 2, name="product")  # each promotion moves product@staging
    results = run_at_once([f"{CLI} promote {digests[i % 2]} --to staging --actor job{i} --json" for i in range(n)],
                          team)
    failed = [r.stderr[-1500:] for r in results if r.returncode]
    assert not failed, failed
    assert not [r for r in results if "Traceback" in r.stderr]
    registry = _registry(team)
    from registry.audit_chain import verify
    from registry.schema import PromotionEvent

    with registry.Session() as s:
        events = s.query(PromotionEvent).order_by(PromotionEvent.seq).all()
        assert verify(s).ok
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    holders: dict[tuple[str, str], int | None] = {}
    for e in events:  # each event's `previous` is the holder the events before it left
        assert e.previous_model_id == holders.get((e.model_name, e.alias)), e.seq
        if e.decision == "promoted":
            holders[(e.model_name, e.alias)] = e.model_id
    registry.close()


def test_eight_promotions_at_once_on_postgresql(team, tmp_path):
    promotions_at_once(team, tmp_path, 8)


@pytest.mark.slow
def test_thirty_two_promotions_at_once_on_postgresql(team, tmp_path):
    promotions_at_once(team, tmp_path, 32)
