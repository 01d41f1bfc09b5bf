"""MAP on the small zoo: a real Prefect flow run, the sample cache in the lineage DB, a picked point merged for real.

Checked against independent computations: each cached sample's accuracy against the engine's
task-arithmetic merge of the same coefficients scored by the evaluator, the picked model's bytes against
the engine run directly.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

TASKS = ["digits", "letters"]


def _config(zoo, **extra):
    from flows.map_flow import MapConfig
    from merging.algorithms.map import MapParams

    return MapConfig(suite="ta8-mini", tasks=TASKS, base=str(zoo / "base"),
                     candidates=[str(zoo / "finetuned" / t) for t in TASKS],
                     params=MapParams(population=24, generations=25), **extra)


def test_map_sweeps_caches_every_sample_stores_the_front_and_a_pick_is_merged_for_real(prefect_api, small_zoo, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from evaluation.evaluator import evaluate_checkpoint
    from flows.map_flow import map_flow
    from flows.map_steps import ta_recipe
    from flows.pipeline import pinned_settings, registry_for
    from flows.steps import suite_for
    from merging.engine import run_merge
    from merging.recipes.recipe import parse_recipe
    from registry import map_records
    from registry.schema import MapSample

    zoo, _, _ = small_zoo
    report = map_flow(_config(zoo))
    registry = registry_for(pinned_settings())
    suite = suite_for("ta8-mini", TASKS, None)

    # (n+1)(n+2) = 12 samples for two candidates, each one row keyed by digests + coefficients + suite digest
    assert report["real_evaluations"] == report["newly_evaluated"] == 12 and report["reused_samples"] == 0
    assert map_records.count_samples(registry, suite.digest) == 12
    with registry.Session() as s:
        sample = s.query(MapSample).order_by(MapSample.id.desc()).first()
        coefficients, stored = list(sample.coefficients), dict(sample.metrics["accuracy"])
        candidates = list(sample.candidates)
    direct = run_merge(parse_recipe({"method": "task_arithmetic", "base": str(zoo / "base"), "parameters": {"lambda": 1.0},
                                     "models": [{"model": str(zoo / "finetuned" / t), "weight": c}
                                                for t, c in zip(TASKS, coefficients)]}), tmp_path / "direct")
    assert stored == {t.task: t.accuracy for t in evaluate_checkpoint(direct.out_dir, suite).tasks}
    assert candidates == [registry.resolve(t).digest for t in TASKS]

    # the front: predicted accuracies for both tasks, non-dominated, with held-out surrogate errors
    points = report["points"]
    assert len(points) >= 3 and all(set(p["predicted"]) == set(TASKS) for p in points)
    for p in points:
        assert not any(q["predicted"]["digits"] > p["predicted"]["digits"] and q["predicted"]["letters"] > p["predicted"]["letters"]
                       for q in points)
    assert all(s["mae"] is not None and s["samples"] == 12 for s in report["surrogates"].values())
    assert Path(report["files"]["plot"]).stat().st_size > 10_000 and json.loads(Path(report["files"]["json"]).read_text())["id"] == report["front"]
    artifacts = registry.mirror.client.list_artifacts(report["files"]["mlflow_run"])
    assert {Path(a.path).suffix for a in artifacts} == {".png", ".json"}

    async def artifact(key):
        async with get_client() as client:
            return (await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))))[0]

    table = asyncio.run(artifact(f"map-front-{report['front']}"))
    assert "held-out R²" in table.data and f"{100 * points[0]['predicted']['digits']:.1f}" in table.data
    plot = asyncio.run(artifact(f"map-front-{report['front']}-plot"))
    assert plot.type == "image" and plot.data.startswith("data:image/png;base64,")

    # a second sweep over the same design evaluates nothing; a larger one reuses what it shares
    again = map_flow(_config(zoo))
    assert again["newly_evaluated"] == 0 and again["reused_samples"] == 12
    from merging.algorithms.map import MapParams

    bigger = map_flow(_config(zoo).model_copy(update={"params": MapParams(samples=16, population=24, generations=25)}))
    assert bigger["reused_samples"] >= 1 and bigger["newly_evaluated"] + bigger["reused_samples"] == 16

    # pick: merged for real, registered with the coefficients as lineage weights, predicted beside measured
    runner = CliRunner()
    from flows.cli import app

    picked = runner.invoke(app, ["map", "pick", str(report["front"]), "--prefer", "digits=3,letters=1", "--json"])
    assert picked.exit_code == 0, picked.output
    out = json.loads(picked.stdout[picked.stdout.index("{"):])
    model = registry.resolve(out["model"])
    weights = [e.weight for e, _ in registry.parents_of(model) if e.role == "candidate"]
    assert weights == pytest.approx(out["coefficients"])
    rebuilt = run_merge(ta_recipe(str(zoo / "base"), [str(zoo / "finetuned" / t) for t in TASKS], out["coefficients"]),
                        tmp_path / "rebuilt")
    assert rebuilt.digest == model.digest
    assert out["measured"] == {t.task: t.accuracy for t in evaluate_checkpoint(rebuilt.out_dir, suite).tasks}
    run = registry.producing_run(model)
    assert run.details["map"]["front"] == report["front"] and run.details["map"]["preference"] == {"digits": 3.0, "letters": 1.0}
    # the picked point is the front's best under the 3:1 preference
    best = max(points, key=lambda p: 0.75 * p["predicted"]["digits"] + 0.25 * p["predicted"]["letters"])
    assert out["coefficients"] == pytest.approx(best["coefficients"]) and out["point"] == points.index(best)
    assert abs(out["measured"]["digits"] - out["predicted"]["digits"]) < 0.15

    listed = runner.invoke(app, ["map", "list", "--json"])
    assert [f["id"] for f in json.loads(listed.stdout)] == [report["front"], again["front"], bigger["front"]]
    missing = runner.invoke(app, ["map", "pick", "999", "--prefer", "digits=1"])
    assert missing.exit_code == 1 and "no Pareto front 999" in missing.stderr
    wrong = runner.invoke(app, ["map", "pick", str(report["front"]), "--prefer", "shapes=1"])
    assert wrong.exit_code == 1 and "not one of the front's" in wrong.stderr
    incomplete = runner.invoke(app, ["map", "--suite", "ta8-mini"])
    assert incomplete.exit_code == 1 and "needs --suite, --base and --candidates" in incomplete.stderr
    # bad inputs are refused before any flow run starts: one line, no front stored
    candidates = ",".join(str(zoo / "finetuned" / t) for t in TASKS)
    no_base = runner.invoke(app, ["map", "--suite", "ta8-mini", "--base", "no-such-model", "--candidates", candidates])
    assert no_base.exit_code == 1 and no_base.stderr.strip() == (
        "error: recipe input 'no-such-model' is neither a path, a source URI nor a registered model")
    no_task = runner.invoke(app, ["map", "--suite", "ta8-mini", "--tasks", "digits,planets", "--base", str(zoo / "base"),
                                  "--candidates", candidates])
    assert no_task.exit_code == 1 and "suite 'ta8-mini' has no task 'planets'" in no_task.stderr
    assert [f["id"] for f in json.loads(runner.invoke(app, ["map", "list", "--json"]).stdout)] == [
        report["front"], again["front"], bigger["front"]]
