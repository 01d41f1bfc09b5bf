"""A method carries its wiring: a data-informed toy method, registered from a temporary module through the public
registration alone, runs through `merge`, `run`, `lineage` and `reproduce` with no line of the flows knowing it."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
import yaml

from tiny_suite import tiny_text  # noqa: F401  (a fixture)

TOY = '''
"""A data-informed toy: the candidate whose weights score the lowest loss on the suite, whole."""
from merging.methods import MethodParams, Solved, merge_method
from merging.methods.hooks import EdgeSpec, MethodLineage
from merging.methods.registry import path_field
from merging.objective import ObjectiveRequest


class PickParams(MethodParams):
    suite: str = path_field("ta8-mini")
    tasks: tuple[str, ...] | None = None
    budget: int = 8


def solve(inputs, params, objective, progress):
    losses = [objective.loss({n: c.read(n) for n in c.names}) for c in inputs.models]
    best = min(range(len(losses)), key=losses.__getitem__)
    return Solved({n: inputs.models[best].read(n).float() for n in inputs.names}, {"pick": {"losses": losses, "chosen": best}})


@merge_method("toy_pick", params=PickParams, paper="https://example.org/toy-pick", solve=solve, requires_base=False,
              data=lambda p: ObjectiveRequest(p.suite, p.tasks, p.budget), suite_param="suite", tasks_param="tasks",
              lineage=lambda d: MethodLineage(edges=[EdgeSpec(d["pick"]["chosen"], "picked", weight=1.0)]),
              describe=lambda d: f"picked candidate {d['pick']['chosen']} of {len(d['pick']['losses'])}")
def toy_pick(inputs, params, state):
    """Keep the candidate whose weights score the lowest loss on the suite."""
    raise NotImplementedError("solved whole")
'''


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    (tmp_path / "toy_pick_method.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("toy_pick_method")
    yield "toy_pick"
    from merging.methods.registry import unregister

    unregister("toy_pick")
    sys.modules.pop("toy_pick_method", None)


def test_a_toy_data_informed_method_runs_through_merge_run_lineage_and_reproduce(toy_method, tiny_text, cli,
                                                                                   prefect_api, tmp_path):
    from evaluation.evaluator import load_state
    from evaluation.objectives import FewShotCrossEntropy
    from evaluation.suites import load_suite

    fts = list(tiny_text["finetuned"].values())
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(yaml.safe_dump({"method": "toy_pick", "base": str(tiny_text["base"]),
                                      "models": [str(p) for p in fts], "parameters": {"suite": "suite.yaml"}}))
    assert tiny_text["suite"] == tmp_path / "suite.yaml"  # beside the recipe, named relative to it
    merged = json.loads(cli("merge", recipe, "--name", "picked", "--json").stdout)
    # independently: the candidate with the lowest loss, computed here, is what was kept
    objective = FewShotCrossEntropy(load_suite(str(tiny_text["suite"])).for_model(tiny_text["base"]), samples_per_task=8)
    losses = [objective.loss({k.removeprefix("bert."): v for k, v in load_state(p).items()}) for p in fts]
    chosen = min(range(len(losses)), key=losses.__getitem__)
    from merging.checkpoints.checkpoint import Checkpoint

    name = "encoder.layer.0.output.dense.weight"
    assert torch.equal(Checkpoint(merged["store_path"]).read(name), Checkpoint(fts[chosen]).read("bert." + name))
    graph = json.loads(cli("lineage", "picked", "--format", "json").stdout)
    picked = [e for e in graph["edges"] if e["role"] == "picked"]
    assert len(picked) == 1 and picked[0]["weight"] == 1.0
    assert f"picked candidate {chosen} of 2" in cli("lineage", "picked").stdout
    assert json.loads(cli("reproduce", "picked", "--json").stdout)["ok"]
    # in a pipeline the method optimises the pipeline's suite: its suite_param is filled in, nothing else knows it
    pipeline = tiny_text["root"] / "toy-pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "toy-nightly", "suite": "suite.yaml", "base": "models/base",
                                        "candidates": ["models/ft-sentiment", "models/ft-topic"],
                                        "merges": [{"method": "toy_pick"}], "promotion": None}))
    report = json.loads(cli("run", pipeline, "--json").stdout)
    assert report["merges"][0]["method"] == "toy_pick" and report["merges"][0]["digest"] == merged["digest"]
