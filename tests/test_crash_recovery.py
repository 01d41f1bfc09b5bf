"""kill -9 at chosen points of ingest, merge, evaluate, promote and run: `doctor` finds exactly what was left,
`doctor --fix` leaves a healthy home, and a rerun gives the same digest with nothing lost or duplicated.

The crashing command is a real process (`python -m flows.cli`) killed by the test-only hook
(merging/runtime/crashpoints.py: MERGEYARD_TEST_CRASH_AT); everything else runs in-process on the same home.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import random_family, save_checkpoint
from merging.runtime.atomic import OLD_MARK, TEMP_MARK
from tiny_suite import tiny_text  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent


def killed(*args, at: str, timeout: int = 300) -> None:
    """Run a command and have it SIGKILL itself at `at`. Its output goes to a file, not a pipe: a child it started
    (an ephemeral Prefect server) outlives it and would hold a pipe open."""
    env = {**os.environ, "MERGEYARD_TEST_CRASH_AT": at, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)], stdout=log, stderr=log,
                              text=True, cwd=ROOT, env=env, timeout=timeout)
        log.seek(0)
        assert proc.returncode == -signal.SIGKILL, f"not killed at {at}: rc {proc.returncode}\n{log.read()[-3000:]}"


def doctor(cli, *flags) -> dict:
    result = cli("doctor", "--json", *flags, ok=False)
    report = json.loads(result.stdout)
    assert result.exit_code == (6 if report["left"] else 0), result.output
    return report


def kinds(report) -> set[str]:
    return {f["kind"] for f in report["findings"]}


def mlflow_versions(digest: str) -> list:
    from flows.registry_access import open_registry

    registry = open_registry()
    return registry.mirror.client.search_model_versions(f"tags.`mergeyard.digest` = '{digest}'")


def home_state(home: Path) -> dict:
    """What a user would count: rows, runs by status, store entries, MLflow versions, leftovers."""
    from flows.registry_access import open_registry
    from registry.schema import MergeRun, Model

    registry = open_registry()
    with registry.Session() as s:
        runs = [r.status for r in s.query(MergeRun).order_by(MergeRun.id)]
        digests = sorted(m.digest for m in s.query(Model))
    entries = sorted(p.name for p in registry.store.entries())
    leftovers = [p.name for root in (home / "store", home / "tmp") if root.is_dir() for p in root.iterdir()
                 if TEMP_MARK in p.name or OLD_MARK in p.name or root.name == "tmp"]
    versions = registry.mirror.client.search_model_versions()
    registry.close()
    return {"models": digests, "runs": runs, "entries": entries, "leftovers": leftovers,
            "versions": sorted((v.name, v.tags.get("mergeyard.digest")) for v in versions)}


def assert_healthy(cli, home: Path) -> dict:
    fixed = doctor(cli, "--fix")
    assert fixed["left"] == 0, fixed
    assert doctor(cli)["findings"] == []
    state = home_state(home)
    assert state["leftovers"] == [], state
    assert state["entries"] == [d.replace(":", "-") for d in state["models"]]  # every entry a row, every row one
    assert "running" not in state["runs"]
    return state


@pytest.fixture
def plain_family(tmp_path, cli):
    """A base and two fine-tunes (registered), a recipe over them, and a new file not registered yet."""
    base, fts = random_family(2, seed=31)
    paths = [save_checkpoint(sd, tmp_path / f"in/{n}.safetensors") for n, sd in [("base", base), ("a", fts[0]), ("b", fts[1])]]
    for p in paths:
        cli("ingest", p, "--name", p.stem)
    extra, _ = random_family(0, seed=32)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "base": "base", "models": ["a", "b"],
                                      "parameters": {"density": 0.5, "lambda": 1.0}}))
    from merging.engine import run_merge
    from merging.recipes.recipe import parse_recipe

    expected = run_merge(parse_recipe({"method": "ties", "base": str(paths[0]), "models": [str(p) for p in paths[1:]],
                                       "parameters": {"density": 0.5, "lambda": 1.0}}), tmp_path / "reference").digest
    return {"recipe": recipe, "merged_digest": expected, "new": save_checkpoint(extra, tmp_path / "new.safetensors")}


INGEST_CASES = {
    # crash point: what it leaves behind
    "register.stored": {"unrecorded-entry"},
    "mirror.artifacts-logged": {"unrecorded-entry", "pending-logged-model"},
    "mirror.versioned": {"unrecorded-entry", "unrecorded-version"},
}


@pytest.mark.parametrize("point", list(INGEST_CASES))
def test_ingest_killed(point, cli, plain_family, isolated_home):
    from merging.checkpoints.digest import checkpoint_digest

    new = plain_family["new"]
    killed("ingest", new, "--name", "late", at=point)
    found = doctor(cli)
    assert kinds(found) == INGEST_CASES[point], found
    assert all(f["action"] for f in found["findings"])
    assert_healthy(cli, isolated_home)  # the copy is adopted: it verified and an ingest stored it
    again = json.loads(cli("ingest", new, "--name", "late", "--json").stdout)
    assert again["digest"] == checkpoint_digest(new) and not again["created"]
    assert len(mlflow_versions(again["digest"])) == 1
    assert home_state(isolated_home)["models"].count(again["digest"]) == 1


MERGE_CASES = {
    "merge.writing": {"interrupted-run", "temp-dir"},  # a partial output in its temporary directory
    "merge.staged": {"interrupted-run", "temp-dir"},  # the whole output in scratch, not registered
    "register.stored": {"interrupted-run", "temp-dir", "unrecorded-entry"},  # stored, no row
    "mirror.versioned": {"interrupted-run", "temp-dir", "unrecorded-entry", "unrecorded-version"},
}


@pytest.mark.parametrize("point", list(MERGE_CASES))
def test_merge_killed(point, cli, plain_family, isolated_home):
    before = home_state(isolated_home)
    killed("merge", plain_family["recipe"], "--name", "product", at=point)
    found = doctor(cli)  # opening the registry already failed the run: doctor reports it as repaired
    assert kinds(found) == MERGE_CASES[point], found
    interrupted = [f for f in found["findings"] if f["kind"] == "interrupted-run"]
    assert len(interrupted) == 1 and interrupted[0]["fixed"]
    if point != "mirror.versioned":  # (the unrecorded output is a merge's: removed, not adopted)
        assert [f["action"] for f in found["findings"] if f["kind"] == "unrecorded-entry"] in ([], ["remove"])
    state = assert_healthy(cli, isolated_home)
    assert state["models"] == before["models"] and state["runs"] == ["failed"]
    rerun = json.loads(cli("merge", plain_family["recipe"], "--name", "product", "--json").stdout)
    assert rerun["digest"] == plain_family["merged_digest"]
    after = home_state(isolated_home)
    assert after["runs"] == ["failed", "succeeded"] and after["models"] == sorted(before["models"] + [rerun["digest"]])
    assert len(mlflow_versions(rerun["digest"])) == 1


def test_evaluate_killed_leaves_an_open_mlflow_run_that_doctor_closes(cli, tiny_text, isolated_home):
    cli("ingest", tiny_text["base"], "--name", "tiny-base")
    killed("evaluate", "tiny-base", "--suite", tiny_text["suite"], at="mirror.evaluation-run-open")
    found = doctor(cli)
    assert kinds(found) == {"open-mlflow-run"}, found
    assert_healthy(cli, isolated_home)
    from flows.registry_access import open_registry
    from registry.schema import Evaluation

    registry = open_registry()
    assert registry.count(Evaluation) == 0  # the killed one recorded nothing
    report = json.loads(cli("evaluate", "tiny-base", "--suite", tiny_text["suite"], "--json").stdout)
    assert [t["task"] for t in report["tasks"]] == ["sentiment", "topic"] and registry.count(Evaluation) > 0


@pytest.mark.parametrize("point, left", [("promote.before-commit", {"alias", "audit-witness"}),
                                         ("promote.committed", {"audit-witness"})])
def test_promote_killed(point, left, cli, plain_family, isolated_home):
    cli("merge", plain_family["recipe"], "--name", "product")
    killed("promote", "product", "--to", "staging", at=point)
    found = doctor(cli)
    assert kinds(found) == left, found
    assert_healthy(cli, isolated_home)
    assert cli("audit", "--verify").exit_code == 0
    log = json.loads(cli("audit", "--json").stdout)
    assert [e["decision"] for e in log] == (["promoted"] if point == "promote.committed" else [])
    cli("promote", "product", "--to", "staging")  # the rerun: promoted, or unchanged where it had committed
    assert cli("audit", "--verify").exit_code == 0
    from flows.registry_access import open_registry

    registry = open_registry()
    model = registry.resolve("product")
    assert registry.mirror.alias_version("product", "staging") == model.mlflow_version


def test_pipeline_run_killed_mid_merge(cli, tiny_text, isolated_home, tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "tickets-merged", "suite": str(tiny_text["suite"]), "base": str(tiny_text["base"]),
        "candidates": [str(p) for p in tiny_text["finetuned"].values()], "score": {"method": "none"},
        "merges": [{"method": "task_arithmetic", "parameters": {"lambda": 0.5}}]}))
    killed("run", pipeline, at="merge.staged", timeout=600)
    found = doctor(cli)
    # the flow's ephemeral Prefect server outlived it; the evaluations it ran beside the merge may be open
    assert {"interrupted-run", "temp-dir", "orphan-server"} <= kinds(found) <= {
        "interrupted-run", "temp-dir", "orphan-server", "open-mlflow-run"}, found
    before = assert_healthy(cli, isolated_home)
    report = json.loads(_run_json(pipeline))
    merged = report["merges"][0]["digest"]
    after = home_state(isolated_home)
    assert after["runs"] == ["failed", "succeeded"]
    assert set(before["models"]) < set(after["models"]) and merged in after["models"]
    assert len(mlflow_versions(merged)) == 1


def _run_json(pipeline) -> str:
    """The rerun, as its own process like the killed one: a flow run in this process after a killed one left
    Prefect's in-process log handler recursing in the flow tests that followed (it happened only in-process)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MERGEYARD_TEST_CRASH_AT", None)
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: the ephemeral Prefect server outlives the run
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(pipeline), "--json"], stdout=log,
                              stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env, timeout=600)
        log.seek(0)
        out = log.read()
    assert proc.returncode == 0, out[-3000:]
    return out[out.index("{"):]
