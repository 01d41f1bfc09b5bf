"""The `mergeyard` command as a user runs it: a real process, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import random_family
from merging.checkpoints.digest import checkpoint_digest

MERGEYARD = [sys.executable, "-m", "flows.cli"]


def run(*args, cwd=None, env_home=None):
    env = {**os.environ, "MERGEYARD_HOME": str(env_home)} if env_home else None
    return subprocess.run([*MERGEYARD, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture
def recipe(tmp_path, write_family):
    bp, mps = write_family(*random_family(3, seed=9), layout="sharded")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "method": "ties",
        "base": bp.name,  # relative to the recipe's directory
        "models": [{"model": m.name, "weight": 1.0} for m in mps],
        "parameters": {"density": 0.2, "trim_scope": "global", "aggregate": "mean", "lambda": 1.0},
        "out_dtype": "float32",
    }))
    return path


def test_merge_json_and_digest_commands_agree(tmp_path, recipe):
    out = tmp_path / "merged"
    proc = run("merge", recipe, "--out", out, "--max-shard-bytes", 1000, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["digest"] == checkpoint_digest(out)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    digest = run("digest", out)
    assert digest.returncode == 0 and digest.stdout.strip() == result["digest"]
    as_json = json.loads(run("digest", out / "model.safetensors.index.json", "--json").stdout)
    assert as_json["digest"] == result["digest"] and as_json["tensors"] == 5


def test_merge_human_output_prints_the_digest(tmp_path, recipe):
    proc = run("merge", recipe, "--out", tmp_path / "m")
    assert proc.returncode == 0, proc.stderr
    assert checkpoint_digest(tmp_path / "m") in proc.stdout


@pytest.mark.parametrize("mutate,expect", [
    (lambda r: {**r, "method": "nope"}, "unknown merge method 'nope'"),
    (lambda r: {**r, "parameters": {"density": 2}}, "density"),
    (lambda r: {**r, "models": [{"model": "missing-model"}]}, "neither a path, a source URI nor a registered model"),
])
def test_user_errors_are_one_line_nonzero_and_leave_nothing(tmp_path, recipe, mutate, expect):
    data = mutate(yaml.safe_load(recipe.read_text()))
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "never"
    proc = run("merge", recipe, "--out", out)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_existing_output_is_refused_then_overwritten(tmp_path, recipe):
    out = tmp_path / "m"
    assert run("merge", recipe, "--out", out).returncode == 0
    again = run("merge", recipe, "--out", out)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert run("merge", recipe, "--out", out, "--overwrite").returncode == 0


def test_digest_of_a_pickle_is_refused(tmp_path):
    import torch

    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    proc = run("digest", tmp_path / "pytorch_model.bin")
    assert proc.returncode == 1 and "safetensors" in proc.stderr


def test_methods_lists_every_method_with_paper():
    proc = run("methods", "--json")
    listing = {m["name"]: m for m in json.loads(proc.stdout)}
    assert set(listing) == {"average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "fw_hard", "fw_soft", "mudsc",
                            "fisher", "regmean", "adamerging", "slerp", "nuslerp", "multislerp", "karcher", "model_stock",
                            "nearswap", "sce", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "passthrough",
                            "tsv", "iso_c", "iso_cts", "cart"}
    assert all(m["paper"].startswith("https://") for m in listing.values())
    assert listing["regmean"]["paper"].startswith("https://arxiv.org/abs/2212.09849")
    assert listing["mudsc"]["paper"].startswith("https://arxiv.org/abs/2403.01753") and not listing["mudsc"]["requires_base"]
    assert {"alpha", "mode", "calibration"} <= set(listing["mudsc"]["parameters"])
    assert listing["ties"]["paper"].startswith("https://arxiv.org/abs/2306.01708")
    assert listing["fw_hard"]["paper"].startswith("https://arxiv.org/abs/2503.12649") and listing["fw_hard"]["summary"]
    assert {"suite", "budget", "loss", "lambda", "iterations"} <= set(listing["fw_hard"]["parameters"])
    assert set(listing["ties"]["parameters"]) == {"density", "trim_scope", "aggregate", "lambda"}


def test_demo_writes_only_under_mergeyard_home(tmp_path, small_zoo):
    """A fresh checkout's first command, in its own process: ephemeral Prefect, SQLite, MLflow, all under the home."""
    import shutil

    home = tmp_path / "home"
    work = tmp_path / "cwd"
    work.mkdir()
    shutil.copytree(small_zoo[0], home / "zoo")  # the build itself is tested in test_zoo; reused here
    user_home = tmp_path / "user"
    # (no MLFLOW_*: mlflow.set_tracking_uri in an earlier in-process test leaves its URI in os.environ)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(MERGEYARD_HOME=str(home), HOME=str(user_home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run([*MERGEYARD, "demo", "--json"], capture_output=True, text=True, cwd=work, env=env, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    # every method with a demo example, the data-informed ones included
    assert {m["method"] for m in report["merges"]} == {"average", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                                                        "fw_hard", "fw_soft", "mudsc", "fisher", "regmean", "adamerging",
                                                        "tsv", "iso_c", "iso_cts", "cart"}
    assert report["promotion"]["decision"] == "promoted"
    for m in report["merges"]:
        assert m["merged"] and m["average"] > 0
    assert list(work.iterdir()) == []
    assert not user_home.exists() or not any(user_home.rglob("*"))  # no ~/.prefect, no ~/.cache
    assert {"lineage.db", "mlflow.db", "prefect", "prefect-results", "store", "zoo", "demo"} <= {p.name for p in home.iterdir()}
