"""`auto` coefficients: the grid scored on the calibration split only, each recorded score equal to the same
merge made and scored independently, the argmax chosen, and the choice reproduced with no data present."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from evaluation.evaluator import evaluate_checkpoint
from evaluation.suites import load_suite
from flows.objectives import build_request
from merging.engine import run_merge
from merging.recipes.recipe import parse_recipe
from tiny_suite import tiny_text  # noqa: F401  (a fixture)

CASES = [("task_arithmetic", "lambda", [0.2, 0.7, 1.3]), ("tsv", "alpha", [0.5, 1.5]),
         ("ties", "lambda", [0.4, 1.0, 2.5]), ("cart", "lambda", [0.5, 3.0])]


def _recipe(tiny, method, key, grid, suite=None, budget=6):
    return {"method": method, "base": str(tiny["base"]), "models": [str(p) for p in tiny["finetuned"].values()],
            "parameters": {key: "auto"}, "search": {"suite": str(suite or tiny["suite"]), "budget": budget,
                                                    "grid": grid}}


def _merge(recipe: dict, out, tiny):
    return run_merge(parse_recipe(recipe), out, data=lambda r: build_request(r, model_dirs=[tiny["base"]]))


@pytest.mark.parametrize("method,key,grid", CASES, ids=[c[0] for c in CASES])
def test_each_value_scored_as_an_independent_merge_would_be_and_the_best_chosen(tiny_text, tmp_path, method, key, grid):
    result = _merge(_recipe(tiny_text, method, key, grid), tmp_path / "auto", tiny_text)
    record = result.details["search"]
    assert record["parameter"] == key and record["split"] == "calibration" and record["grid"] == grid
    suite = load_suite(str(tiny_text["suite"])).for_model(tiny_text["base"])
    for tried in record["tried"]:  # the same merge written with that number, scored by the evaluator on calibration
        plain = {**_recipe(tiny_text, method, key, grid), "parameters": {key: tried["value"]}, "search": None}
        out = tmp_path / f"v{tried['value']}"
        run_merge(parse_recipe(plain), out)
        scored = evaluate_checkpoint(out, suite, split="calibration", limit=6)
        assert tried["tasks"] == pytest.approx({t.task: t.value for t in scored.tasks})
        assert tried["loss"] == pytest.approx(sum(t.loss for t in scored.tasks) / 2, rel=1e-4)
    best = max(record["tried"], key=lambda t: (t["score"], -t["loss"]))
    assert record["chosen"] == best["value"]
    assert result.resolved.parameters[key] == best["value"] and result.resolved.search is None
    # the output is the plain merge at the chosen value, byte for byte; the run is named by the request's hash
    chosen = run_merge(parse_recipe({**_recipe(tiny_text, method, key, grid), "parameters": {key: best["value"]},
                                     "search": None}), tmp_path / "chosen")
    assert result.digest == chosen.digest
    assert result.recipe_hash == parse_recipe(_recipe(tiny_text, method, key, grid)).recipe_hash


def test_the_evaluation_split_never_decides(tiny_text, tmp_path):
    """Two suites with the same calibration data and opposite evaluation labels choose identically."""
    spec = yaml.safe_load(tiny_text["suite"].read_text())
    flipped = tiny_text["root"] / "data" / "sentiment-eval-flipped.csv"
    rows = (tiny_text["root"] / "data" / "sentiment.csv").read_text().splitlines()
    flipped.write_text("\n".join([rows[0]] + [r.replace(",pos", ",XX").replace(",neg", ",pos").replace(",XX", ",neg")
                                              for r in rows[1:]]) + "\n")
    spec["tasks"][0]["eval"] = "data/sentiment-eval-flipped.csv"
    other = tiny_text["root"] / "suite-flipped.yaml"
    other.write_text(yaml.safe_dump(spec))
    assert load_suite(str(other)).digest != load_suite(str(tiny_text["suite"])).digest
    grid = [0.1, 0.5, 1.0, 2.0]
    a = _merge(_recipe(tiny_text, "task_arithmetic", "lambda", grid), tmp_path / "a", tiny_text).details["search"]
    b = _merge(_recipe(tiny_text, "task_arithmetic", "lambda", grid, suite=other), tmp_path / "b",
               tiny_text).details["search"]
    assert {k: v for k, v in a.items() if k != "suite"} == {k: v for k, v in b.items() if k != "suite"}


def test_bad_auto_recipes_are_refused_in_one_line(tiny_text, tmp_path):
    from merging.errors import MergeyardError, RecipeError

    with pytest.raises(RecipeError, match="name the suite in `search"):
        parse_recipe({**_recipe(tiny_text, "tsv", "alpha", [1.0]), "search": None})
    with pytest.raises(RecipeError, match="only its scale, alpha"):
        parse_recipe({**_recipe(tiny_text, "tsv", "alpha", [1.0]), "parameters": {"rank_fraction": "auto"}})
    with pytest.raises(RecipeError, match="has no scale"):
        parse_recipe({"method": "average", "models": ["a", "b"], "parameters": {"normalize": "auto"},
                      "search": {"suite": "x"}})
    with pytest.raises(MergeyardError, match="is chosen on data"):
        run_merge(parse_recipe(_recipe(tiny_text, "tsv", "alpha", [1.0])), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_registered_auto_merge_records_its_search_and_reproduces_without_data(tiny_text, cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_text, "iso_c", "alpha", [0.5, 1.0, 2.0])))
    merged = json.loads(cli("merge", recipe, "--name", "iso", "--json").stdout)
    from flows.registry_access import open_registry

    registry = open_registry()
    run = registry.producing_run(registry.resolve("iso"))
    stored = json.loads(run.recipe_json)
    search = run.details["search"]
    assert stored["parameters"]["alpha"] == search["chosen"] and "search" not in stored
    assert [t["value"] for t in search["tried"]] == [0.5, 1.0, 2.0]
    registry.close()
    shutil.rmtree(tiny_text["root"] / "data")  # no suite data left anywhere
    again = json.loads(cli("reproduce", "iso", "--json").stdout)
    assert again["ok"] and again["rebuilt_digest"] == merged["digest"]
    shown = cli("lineage", "iso").stdout
    assert "alpha" in shown and "auto" in shown
