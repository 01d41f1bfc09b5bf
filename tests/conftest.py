"""Shared fixtures: an isolated MERGEYARD_HOME, no network, checkpoint writers.

Checkpoints in tests are written with `safetensors.torch.save_file` and a
hand-written index, never with mergeyard's own writer, so the reader and the
writer are each checked against the library rather than against each other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Before anything imports huggingface_hub: no test may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Before anything imports Prefect: the session's own Prefect state, never ~/.prefect or a user's server.
import tempfile  # noqa: E402

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="mergeyard-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"

import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    home = tmp_path / "mergeyard-home"
    monkeypatch.setenv("MERGEYARD_HOME", str(home))
    from flows.settings import get_settings

    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


def save_checkpoint(sd: dict[str, torch.Tensor], path: Path, layout: str = "file", shards: int = 2) -> Path:
    """Write `sd` as a single file, a directory with model.safetensors, or `shards` shards + index."""
    path = Path(path)
    sd = {k: v.contiguous() for k, v in sd.items()}
    if layout == "file":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path))
        return path
    path.mkdir(parents=True, exist_ok=True)
    if layout == "dir":
        save_file(sd, str(path / "model.safetensors"))
        return path
    assert layout == "sharded"
    names = sorted(sd)
    groups = [names[i::shards] for i in range(shards)]  # interleaved: shard order is not name order
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({n: sd[n] for n in group}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def load_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read with the safetensors library directly."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


SHAPES = {"emb.weight": (37, 16), "blk.0.w": (16, 16), "blk.0.b": (16,), "blk.1.conv": (4, 3, 3, 3), "scale": ()}


def random_family(n_models: int, seed: int = 0, dtype=torch.float32, spread: float = 0.1, shapes=SHAPES):
    """A base and n 'fine-tuned' models: base + noise, in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    models = [{k: (v.float() + spread * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
              for _ in range(n_models)]
    return base, models


@pytest.fixture
def write_family(tmp_path):
    def write(base, models, layout="file"):
        suffix = ".safetensors" if layout == "file" else ""
        base_path = save_checkpoint(base, tmp_path / f"base{suffix}", layout)
        paths = [save_checkpoint(m, tmp_path / f"model{i}{suffix}", layout) for i, m in enumerate(models)]
        return base_path, paths

    return write


from postgres import database_url, pg_cluster  # noqa: E402,F401  (fixtures)


@pytest.fixture(scope="session")
def mlflow_schema(tmp_path_factory) -> Path:
    """An empty MLflow tracking + registry database, its schema created once (that takes seconds)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-schema") / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    client.search_experiments()
    client.search_registered_models()
    return db


@pytest.fixture
def mlflow_store(mlflow_schema, tmp_path):
    """Each test's own MLflow store, a copy of the empty one: what one test's aliases say is never another's
    (the audit check at teardown compares MLflow's aliases with the test's own log)."""
    import shutil

    root = tmp_path / "mlflow"
    root.mkdir()
    shutil.copyfile(mlflow_schema, root / "mlflow.db")
    return f"sqlite:///{root / 'mlflow.db'}", root / "artifacts"


@pytest.fixture
def registry_config(database_url, mlflow_store, tmp_path):
    from registry.registry import RegistryConfig

    uri, artifacts = mlflow_store
    return RegistryConfig(database_url=database_url, store_root=tmp_path / "store", scratch=tmp_path / "scratch",
                          mlflow_tracking_uri=uri, mlflow_artifact_root=artifacts, hf_cache=tmp_path / "hub",
                          digest_cache=tmp_path / "cache" / "digests.sqlite")


def assert_audit_intact(registry, request) -> None:
    """Every log a test leaves behind verifies (tests that tamper on purpose are marked `tampers`)."""
    if request.node.get_closest_marker("tampers") is not None:
        return
    from registry.promotion import verify_audit

    report = verify_audit(registry)
    assert report.ok, f"the audit log this test left fails verification: {report.problems}"


@pytest.fixture
def registry(registry_config, request):
    from registry.db import make_engine, upgrade
    from registry.registry import Registry

    engine = make_engine(registry_config.database_url)
    upgrade(engine)  # what `mergeyard db upgrade` does; only embedded SQLite upgrades itself
    engine.dispose()
    reg = Registry(registry_config)
    yield reg
    assert_audit_intact(reg, request)
    reg.close()


@pytest.fixture(scope="session")
def small_zoo(tmp_path_factory):
    """The small zoo (4 fine-tunes), built once per session (about a minute on 2 cores)."""
    import time

    from evaluation.zoo.build import build_zoo

    out = tmp_path_factory.mktemp("zoo") / "zoo"
    started = time.perf_counter()
    manifest = build_zoo(out, small=True)
    return out, manifest, time.perf_counter() - started


@pytest.fixture
def cli(tmp_path, monkeypatch, mlflow_store, request):
    """`mergeyard ...` in-process (one import of torch and MLflow for all); asserts exit 0 unless ok=False."""
    from typer.testing import CliRunner

    from flows.cli import app

    uri, _ = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    runner = CliRunner()

    def invoke(*args, ok=True):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output + result.stderr
        return result

    yield invoke
    from flows.registry_access import open_registry
    from flows.settings import get_settings

    settings = get_settings()
    if settings.database_url is None and (settings.home / "lineage.db").exists():  # the home's own log
        registry = open_registry(settings)
        assert_audit_intact(registry, request)
        registry.close()


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test server for the session (18-25 s to start here: a generous timeout)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
