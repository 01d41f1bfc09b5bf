"""A merge plan executed on a Dask cluster (a LocalCluster of two worker processes): the digest is the one process's,
for every method that streams; global TIES's map-reduce and its majority-sign patches arrive whole; a worker
killed mid-merge costs nothing but time."""

from __future__ import annotations

import os
import signal
from functools import partial

import pytest
import torch

from conftest import random_family, save_checkpoint
from merging.engine import run_merge
from merging.engine.dask_executor import DaskExecutor, connect
from merging.recipes.recipe import parse_recipe
from test_plan_digests import CASES, GOLDEN, SHAPES, recipe_for

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    c = connect("local", workers=2)
    yield c
    cluster = c.cluster
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("family")
    base, models = random_family(3, seed=21, spread=0.2, shapes=SHAPES)
    for sd in [base] + models:
        sd["ids"] = torch.arange(4)
    return (save_checkpoint(base, tmp / "base", "sharded"),
            [save_checkpoint(m, tmp / f"m{i}", "sharded") for i, m in enumerate(models)], tmp)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_streaming_method_gives_the_one_process_digest(client, family, case):
    base, models, tmp = family
    result = run_merge(parse_recipe(recipe_for(case, base, models)), tmp / f"dask-{case}", max_shard_bytes=300,
                       executor_factory=partial(DaskExecutor, client=client))
    assert result.digest == GOLDEN[case]
    workers = result.details["executor"]["workers"]
    assert sum(w["units"] for w in workers.values()) == len(result.plan.units)
    # each unit read what the plan says it reads, and no more
    assert sum(w["bytes_read"] for w in workers.values()) == sum(r.length for u in result.plan.units for r in u.reads)


def _allocator_tuned() -> bool:
    from merging.runtime.allocator import tune_for_large_tensors

    return tune_for_large_tensors.cache_info().currsize == 1 and tune_for_large_tensors()


def test_workers_tune_the_allocator_dasks_nanny_detuned(client, family):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which turns every buffer over 128 kB into a fresh mmap (units 3×
    slower, bench/distributed_merge.py); each worker fixes glibc's thresholds on its first unit."""
    base, models, tmp = family
    assert all(v == 65536 for v in client.run(lambda: int(os.environ.get("MALLOC_TRIM_THRESHOLD_", 0))).values())
    run_merge(parse_recipe(recipe_for("task_arithmetic", base, models)), tmp / "tuned",
              executor_factory=partial(DaskExecutor, client=client))
    assert all(client.run(_allocator_tuned).values())


def _negative_majority(tmp):
    """Task vectors mostly negative, with exact cancellations: global TIES's zero-sum entries are patched."""
    g = torch.Generator().manual_seed(5)
    base = {f"layer.{i}.w": torch.zeros(64, 48) for i in range(6)}
    models = [{n: -(torch.rand(v.shape, generator=g) + 0.5) for n, v in base.items()} for _ in range(3)]
    # exact cancellations in every tensor: +x in model 0, −x in model 1, nothing in model 2
    for n in base:
        models[0][n][:8] = 0.75
        models[1][n][:8] = -0.75
        models[2][n][:8] = 0.0
    paths = [save_checkpoint(sd, tmp / name, "dir") for sd, name in zip([base] + models, ["b", "x", "y", "z"])]
    return {"method": "ties", "base": str(paths[0]), "models": [str(p) for p in paths[1:]],
            "parameters": {"density": 0.9, "lambda": 1.0}}


def test_global_ties_patches_arrive_from_the_workers(client, tmp_path):
    from merging.checkpoints.checkpoint import Checkpoint

    data = _negative_majority(tmp_path)
    local = run_merge(parse_recipe(data), tmp_path / "local")
    dask = run_merge(parse_recipe(data), tmp_path / "dask", executor_factory=partial(DaskExecutor, client=client))
    assert dask.digest == local.digest
    # the fixture does exercise the patch: the zero-sum rows took the negative side (−0.75 / 1 agreeing model)
    merged = Checkpoint(tmp_path / "dask").read("layer.0.w")
    assert torch.allclose(merged[:8], torch.full((8, 48), -0.75))


def test_a_worker_killed_mid_merge_changes_nothing(client, tmp_path):
    shapes = {f"model.layers.{i}.w": (256, 192) for i in range(24)}
    base, models = random_family(3, seed=4, spread=0.1, shapes=shapes)
    paths = [save_checkpoint(sd, tmp_path / n, "dir") for sd, n in zip([base] + models, "bxyz")]
    data = {"method": "ties", "base": str(paths[0]), "models": [str(p) for p in paths[1:]],
            "parameters": {"density": 0.3}}
    local = run_merge(parse_recipe(data), tmp_path / "local")
    pids = client.run(os.getpid)
    victim = sorted(pids.values())[0]
    killed = []

    def progress(stage, done, total):
        if stage == "merge" and not killed and done < total:
            os.kill(victim, signal.SIGKILL)
            killed.append(done)

    dask = run_merge(parse_recipe(data), tmp_path / "dask", progress=progress,
                     executor_factory=partial(DaskExecutor, client=client, window=4))
    assert killed and dask.digest == local.digest
    client.wait_for_workers(2, timeout=60)  # the nanny brings it back for the next test


def test_merge_and_reproduce_on_a_cluster_from_the_command_line(cli, tmp_path):
    import json

    import yaml

    base, fts = random_family(2, seed=31)
    paths = [save_checkpoint(sd, tmp_path / f"in/{n}.safetensors") for n, sd in [("base", base), ("a", fts[0]),
                                                                                   ("b", fts[1])]]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "base": str(paths[0]), "models": [str(p) for p in paths[1:]],
                                      "parameters": {"density": 0.5}}))
    here = json.loads(cli("merge", recipe, "--name", "here", "--json").stdout)
    there = json.loads(cli("merge", recipe, "--name", "there", "--dask", "local", "--json").stdout)
    assert there["digest"] == here["digest"]
    # a model merged in one process rebuilds on a cluster to the same digest
    rebuilt = cli("reproduce", "here", "--dask", "local", "--json")
    assert json.loads(rebuilt.stdout)["ok"] is True


def test_the_driver_killed_leaves_what_doctor_clears(cli, isolated_home, tmp_path):
    import json

    import yaml
    from test_crash_recovery import assert_healthy, doctor, killed, kinds

    shapes = {f"model.layers.{i}.w": (64, 48) for i in range(12)}
    base, fts = random_family(2, seed=8, shapes=shapes)
    paths = [save_checkpoint(sd, tmp_path / f"in/{n}.safetensors") for n, sd in [("base", base), ("a", fts[0]),
                                                                                   ("b", fts[1])]]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(paths[0]),
                                      "models": [str(p) for p in paths[1:]], "parameters": {"lambda": 0.4}}))
    expected = run_merge(parse_recipe(yaml.safe_load(recipe.read_text())), tmp_path / "reference").digest
    killed("merge", recipe, "--name", "product", "--dask", "local", at="merge.writing#5")
    found = doctor(cli)
    assert kinds(found) >= {"interrupted-run", "temp-dir"}, found
    assert_healthy(cli, isolated_home)
    rerun = json.loads(cli("merge", recipe, "--name", "product", "--dask", "local", "--json").stdout)
    assert rerun["digest"] == expected
