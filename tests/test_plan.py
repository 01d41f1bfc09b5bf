"""The merge as a plan: one parse per command, the plan's byte ranges and its JSON round trip, every engine
function short, the plan recorded with the run and shown by `reproduce --plan`."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import random_family, save_checkpoint
from merging.engine import run_merge
from merging.engine.plan import MergePlan
from merging.recipes.recipe import Recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def family(tmp_path):
    base, models = random_family(2, seed=4, spread=0.2)
    base["ids"] = torch.arange(3)
    for m in models:
        m["ids"] = torch.arange(3)
    return (save_checkpoint(base, tmp_path / "base", "sharded"),
            [save_checkpoint(m, tmp_path / f"m{i}", "sharded") for i, m in enumerate(models)])


def test_the_plan_reads_exactly_the_bytes_safetensors_stores(tmp_path, family):
    base, models = family
    recipe = parse_recipe({"method": "ties", "base": str(base), "models": [str(m) for m in models],
                           "parameters": {"density": [{"filter": ".w", "value": 0.9}, {"value": 0.3}],
                                          "trim_scope": "per_tensor"}})
    result = run_merge(recipe, tmp_path / "out", max_shard_bytes=600)
    plan = result.plan
    assert MergePlan.from_json(plan.to_json()) == plan and MergePlan.from_json(plan.to_json()).digest == plan.digest
    roots = [base, *models]
    from safetensors import safe_open

    for unit in plan.units:
        assert [r.input for r in unit.reads] == ([0, 1, 2] if unit.action == "merge" else [0])
        for r in unit.reads:  # the range holds the tensor's bytes, as the safetensors library reads them
            raw = (roots[r.input] / r.file).read_bytes()[r.offset:r.offset + r.length]
            with safe_open(str(roots[r.input] / r.file), "pt") as f:
                stored = f.get_tensor(r.tensor)
            assert raw == stored.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
    # the gradient is resolved per tensor in the plan, and the shards are the writer's
    densities = {u.name: u.params["density"] for u in plan.units if u.params}
    assert len(set(densities.values())) > 1
    assert {f for f in plan.shards} == {f for f in result.files if f.endswith(".safetensors")}
    assert [p.digest for p in plan.inputs] == list(result.input_digests.values())
    # files are named from their checkpoint, so a plan over digests is the same wherever the inputs lie
    assert all(not Path(r.file).is_absolute() and ".." not in r.file for u in plan.units for r in u.reads)


def test_global_ties_names_its_model_wide_step(tmp_path, family):
    base, models = family
    plan = run_merge(parse_recipe({"method": "ties", "base": str(base), "models": [str(m) for m in models]}),
                     tmp_path / "out").plan
    assert [s.step for s in plan.preparation] == ["ties.global_thresholds"] and plan.preparation[0].passes == 2
    assert plan.finalize.startswith("ties.majority_sign")


def test_a_recipe_is_parsed_once_per_merge_command(cli, tmp_path, family, monkeypatch):
    base, models = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(base), "models": [str(m) for m in models],
                                      "parameters": {"lambda": 0.4}}))
    calls = []
    original = Recipe.model_validate.__func__

    def counted(cls, *args, **kwargs):
        calls.append(1)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(Recipe, "model_validate", classmethod(counted))
    cli("merge", recipe, "--name", "ta")
    assert len(calls) == 1


def test_the_run_records_its_plan_and_reproduce_shows_and_compares_it(cli, tmp_path, family):
    base, models = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "dare_ties", "base": str(base), "models": [str(m) for m in models],
                                      "parameters": {"drop_rate": 0.5}}))
    cli("merge", recipe, "--name", "dt")
    shown = json.loads(cli("reproduce", "dt", "--plan", "--json").stdout)
    assert shown["method"] == "dare_ties" and len(shown["units"]) == len(random_family(0)[0]) + 1
    again = json.loads(cli("reproduce", "dt", "--json").stdout)
    assert again["ok"] and again["plan"] == {"recorded": shown["digest"], "rebuilt": shown["digest"], "same": True}
    assert "units, in order" in cli("reproduce", "dt", "--plan").stdout
    import os

    assert os.environ["MERGEYARD_HOME"] not in json.dumps(shown)  # digests and relative files: no home in it


def test_no_engine_function_is_longer_than_sixty_lines():
    long = []
    for path in sorted((ROOT / "merging" / "engine").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
