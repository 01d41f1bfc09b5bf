"""Every method's output digest on fixed fixtures, against the digests the engine gave before it was split into a
planner and an executor (tests/data/method_digests.json): a refactor of the engine must change no byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import random_family, save_checkpoint
from merging.engine import run_merge
from merging.recipes.recipe import parse_recipe

GOLDEN = json.loads((Path(__file__).parent / "data" / "method_digests.json").read_text())["digests"]
SHAPES = {"model.layers.0.attn.w": (6, 5), "model.layers.0.b": (5,), "model.layers.1.attn.w": (5, 7),
          "model.embed_tokens.weight": (11, 5), "model.layers.1.conv": (2, 3, 2), "model.norm.scale": ()}
# case → (method, parameters, inputs: True base + 3 weighted models, False 3 models, "one" base + 1 model,
#         "two" base + 2 weighted models, "one-nobase" 1 model)
CASES = {
    "average": ("average", {}, False),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.3}, True),
    "ties_global": ("ties", {"density": 0.4, "lambda": 0.8}, True),
    "ties_per_tensor": ("ties", {"density": 0.4, "trim_scope": "per_tensor", "lambda": 0.8}, True),
    "ties_gradient": ("ties", {"density": [0.2, 0.8], "trim_scope": "per_tensor"}, True),
    "dare_linear": ("dare_linear", {"drop_rate": 0.5, "lambda": 0.5}, True),
    "dare_ties": ("dare_ties", {"drop_rate": 0.5}, True),
    "breadcrumbs": ("breadcrumbs", {"density": 0.7, "gamma": 0.05}, True),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.7, "gamma": 0.05}, True),
    "della": ("della", {"density": 0.6}, True),
    "della_linear": ("della_linear", {"density": 0.6}, True),
    "slerp": ("slerp", {"t": [0.2, 0.7]}, "one"),
    "nuslerp": ("nuslerp", {}, "two"),
    "multislerp": ("multislerp", {}, True),
    "karcher": ("karcher", {}, False),
    "model_stock": ("model_stock", {}, True),
    "nearswap": ("nearswap", {"t": 0.01}, "one"),
    "sce": ("sce", {"select_topk": 0.5}, True),
    "passthrough": ("passthrough", {}, "one-nobase"),
    "tsv": ("tsv", {}, True),
    "iso_c": ("iso_c", {"alpha": 1.2}, True),
    "iso_cts": ("iso_cts", {}, True),
    "cart": ("cart", {"rank_ratio": 0.4}, True),
    "task_arithmetic_bf16_out": ("task_arithmetic", {"lambda": 0.5}, True),
}


def recipe_for(case: str, base: Path, models: list[Path]) -> dict:
    method, params, shape = CASES[case]
    data = {"method": method, "parameters": params, "seed": 3}
    if shape is True:
        data.update(base=str(base), models=[{"model": str(m), "weight": w} for m, w in zip(models, (1.0, 0.7, 1.3))])
    elif shape is False:
        data.update(models=[str(m) for m in models])
    elif shape == "one":
        data.update(base=str(base), models=[str(models[0])])
    elif shape == "two":
        data.update(base=str(base), models=[{"model": str(models[0]), "weight": 0.4},
                                            {"model": str(models[1]), "weight": 0.6}])
    else:
        data.update(models=[str(models[0])])
    if case.endswith("bf16_out"):
        data["out_dtype"] = "bfloat16"
    return data


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("family")
    base, models = random_family(3, seed=21, spread=0.2, shapes=SHAPES)
    for sd in [base] + models:
        sd["ids"] = torch.arange(4)  # an integer buffer: copied from the reference, never merged
    return (save_checkpoint(base, tmp / "base", "sharded"),
            [save_checkpoint(m, tmp / f"m{i}", "sharded") for i, m in enumerate(models)], tmp)


def test_every_method_is_listed():
    from merging.methods import all_methods

    assert {m.name for m in all_methods() if not m.data_informed} <= {c[0] for c in CASES.values()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_digest_is_what_the_engine_gave_before_its_split(family, case):
    base, models, tmp = family
    result = run_merge(parse_recipe(recipe_for(case, base, models)), tmp / f"out-{case}", max_shard_bytes=300)
    assert result.digest == GOLDEN[case]
