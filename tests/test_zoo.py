"""The offline zoo from the committed CLIP asset: a small build, suites, and `mergeyard evaluate`."""

from __future__ import annotations

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from evaluation.evaluator import evaluate_checkpoint
from evaluation.objectives import FewShotCrossEntropy
from evaluation.suites import load_suite
from evaluation.zoo.asset import asset_paths, load_asset
from evaluation.zoo.build import SMALL_TASKS, build_zoo
from merging.checkpoints.digest import checkpoint_digest


def test_committed_asset_is_small_versioned_and_regenerable():
    weights, meta = asset_paths()
    record = json.loads(meta.read_text())
    assert weights.stat().st_size <= 5 * 1024 * 1024 and record["digest"] == checkpoint_digest(weights)
    assert record["command"].startswith("mergeyard zoo pretrain")
    clip, _ = load_asset()
    assert sum(p.numel() for p in clip.visual.parameters()) > 500_000


def test_small_zoo_fine_tunes_beat_zero_shot_and_are_reused(small_zoo):
    out, manifest, seconds = small_zoo
    assert set(manifest["finetuned"]) == set(SMALL_TASKS)
    assert checkpoint_digest(out / "base") == manifest["base"]["digest"]
    for task, entry in manifest["finetuned"].items():
        assert checkpoint_digest(out / entry["path"]) == entry["digest"]
        assert entry["accuracy"] > manifest["zero_shot"][task] + 0.05, task
    mtime = (out / "manifest.json").stat().st_mtime_ns
    started = time.perf_counter()
    assert build_zoo(out, small=True) == manifest  # same key: reused, not rebuilt
    assert time.perf_counter() - started < seconds / 2 and (out / "manifest.json").stat().st_mtime_ns == mtime


def test_full_build_settings_give_each_task_its_own_budget():
    from evaluation.zoo.build import FULL, FULL_OTHERS, FULL_TARGETS, SMALL, settings_for
    from evaluation.zoo.tasks import TA8_MINI, TASKS

    assert all(settings_for(t, small=True) == SMALL for t in TASKS)
    assert settings_for("counts", small=False) == FULL_TARGETS["counts"] and settings_for("colours", small=False) == FULL
    others = [t for t in TASKS if t not in TA8_MINI]
    assert len(others) == 14 and all(settings_for(t, small=False) == FULL_OTHERS for t in others)
    # the build's time goes to the eight targets: the others' fine-tunes are a fraction of any target's
    assert FULL_OTHERS.steps * FULL_OTHERS.per_class < min(s.steps * s.per_class for s in [FULL, *FULL_TARGETS.values()])


def test_adam_eps_near_the_gradient_scale_concentrates_the_update():
    """The targets' eps 2e-2: an entry moves about lr·g/(|g| + eps) instead of about lr whatever its gradient, so
    small-gradient entries move less and the task vector's energy sits in fewer entries."""
    from evaluation.zoo.train import FinetuneSettings, finetune

    clip, _ = load_asset()
    base = clip.visual.state_dict()

    def moved(eps: float) -> torch.Tensor:
        state = finetune(clip, "digits", FinetuneSettings(steps=3, lr=1e-3, batch=8, per_class=2, eps=eps))
        return torch.cat([(state[k] - base[k]).flatten().abs() for k in base if base[k].is_floating_point()])

    def top_fifth_share(delta: torch.Tensor) -> float:
        top = delta.sort(descending=True).values[: len(delta) // 5]
        return float((top ** 2).sum() / (delta ** 2).sum())

    plain, large_eps = moved(1e-8), moved(2e-2)
    assert large_eps.median() < 0.75 * plain.median()
    assert top_fifth_share(large_eps) > top_fifth_share(plain) + 0.05


def test_extra_fine_tunes_from_other_seeds_sit_beside_the_zoo_and_are_reused(small_zoo, tmp_path):
    import shutil

    from evaluation.zoo.build import build_extra_finetunes

    zoo = tmp_path / "zoo"
    shutil.copytree(small_zoo[0], zoo)
    manifest = json.loads((zoo / "manifest.json").read_text())
    manifest["finetuned"]["digits"]["steps"] = 40  # the task's recorded budget is what an extra fine-tune gets
    (zoo / "manifest.json").write_text(json.dumps(manifest))
    extra = build_extra_finetunes(zoo, ["digits"], [1])
    path = extra["digits-seed1"]
    assert path == zoo / "extra" / "digits-seed1"
    assert checkpoint_digest(path) != checkpoint_digest(zoo / "finetuned" / "digits")
    suite = load_suite("zoo:digits")
    assert evaluate_checkpoint(path, suite).tasks[0].accuracy > evaluate_checkpoint(zoo / "base", suite).tasks[0].accuracy
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert build_extra_finetunes(zoo, ["digits"], [1]) == extra and (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_suite_digest_is_stable_and_normalised_accuracy_uses_the_manifest(small_zoo):
    out, manifest, _ = small_zoo
    a = load_suite("ta8-mini")
    load_suite.cache_clear()
    assert load_suite("ta8-mini").digest == a.digest
    suite = load_suite("ta8-mini", str(out / "manifest.json")).subset(list(SMALL_TASKS))
    task = SMALL_TASKS[0]
    result = evaluate_checkpoint(out / manifest["finetuned"][task]["path"], suite)
    own = next(t for t in result.tasks if t.task == task)
    assert own.accuracy == pytest.approx(manifest["finetuned"][task]["accuracy"])
    assert own.normalized_accuracy == pytest.approx(1.0)
    # scored, fine-tuned and keyed at the asset's own learned temperature (as TA8's heads carry CLIP's), not at
    # a fixed 100: three and a half times sharper, it made every fine-tune collapse the other tasks' features
    learned = float(load_asset()[0].logit_scale.exp())
    assert suite.family.logit_scale == manifest["key"]["logit_scale"] == pytest.approx(learned) and 20 < learned < 40


def test_suite_digest_does_not_depend_on_the_thread_count():
    """Dask workers run torch with one thread: their suites must be the suites the flow computed."""
    import subprocess
    import sys

    code = ("import sys, torch; torch.set_num_threads(int(sys.argv[1])); from evaluation.suites import load_suite; "
            "print(load_suite('ta8-mini').digest)")
    digests = {subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True, text=True, check=True,
                              timeout=300).stdout.strip() for n in (1, 2)}
    assert len(digests) == 1 and next(iter(digests)).startswith("sha256:")


def test_few_shot_objective_on_the_zoo_suite(small_zoo):
    out, _, _ = small_zoo
    suite = load_suite("ta8-mini").subset(list(SMALL_TASKS[:2]))
    objective = FewShotCrossEntropy(suite)
    from evaluation.evaluator import load_state

    state = load_state(out / "base")
    loss, grads = objective.loss_and_grad(state)
    assert torch.isfinite(torch.tensor(loss)) and set(grads) == set(objective.names)
    assert all(grads[n].shape == state[n].shape for n in objective.names)
    assert any(float(g.abs().sum()) > 0 for g in grads.values())


def test_evaluate_command_records_rows_and_an_mlflow_run(small_zoo, monkeypatch, mlflow_store):
    out, manifest, _ = small_zoo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store[0])
    from flows.cli import app

    result = CliRunner().invoke(app, ["evaluate", str(out / "finetuned" / SMALL_TASKS[0]), "--suite", "ta8-mini",
                                      "--tasks", SMALL_TASKS[0], "--tasks", SMALL_TASKS[1], "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [t["task"] for t in report["tasks"]] == list(SMALL_TASKS[:2])
    from flows.registry_access import open_registry

    registry = open_registry()
    model = registry.resolve(report["model"])
    assert registry.latest_evaluations(model.id, "ta8-mini", "accuracy") == {
        t["task"]: t["accuracy"] for t in report["tasks"]}
    run = registry.mirror.client.search_runs([registry.mirror.experiment_id],
                                            f"tags.`mergeyard.digest` = '{model.digest}'")[0]
    assert run.data.metrics[f"{SMALL_TASKS[0]}/accuracy"] == pytest.approx(report["tasks"][0]["accuracy"])
    bad = CliRunner().invoke(app, ["evaluate", model.digest, "--suite", "nope"])
    assert bad.exit_code == 1 and "unknown suite" in bad.stderr


def test_evaluating_a_merged_model_annotates_its_merge_run(small_zoo, registry):
    out, manifest, _ = small_zoo
    from flows.evaluate import evaluate_model
    from flows.merge import merge_and_record
    from merging.recipes.recipe import parse_recipe

    recipe = parse_recipe({"method": "task_arithmetic", "base": str(out / "base"), "parameters": {"lambda": 0.3},
                           "models": [str(out / manifest["finetuned"][t]["path"]) for t in SMALL_TASKS[:2]]})
    merged = merge_and_record(recipe, registry, name="zoo-ta")
    model, result = evaluate_model(registry, "zoo-ta", "ta8-mini", tasks=list(SMALL_TASKS[:2]))
    assert model.id == merged.model.id
    run = registry.mirror.client.get_run(registry.producing_run(model).mlflow_run_id)
    assert run.data.metrics[f"ta8-mini/{SMALL_TASKS[0]}/accuracy"] == pytest.approx(result.tasks[0].accuracy)
    with registry.Session() as s:
        from registry.lineage import lineage

        graph = lineage(s, model.id)
    assert graph.nodes[model.id].metrics["ta8-mini/accuracy"] == pytest.approx(result.average_accuracy)
