"""RegMean (Jin et al., ICLR 2023): each linear layer merged in closed form, the weights that best reproduce every
model's outputs on its own inputs; everything else averaged.

For a linear layer y = x Wᵀ and Gram matrices G_i = X_iᵀX_i of its inputs on model i's data:

    W*ᵀ = (Σ_i w_i G̃_i)⁻¹ Σ_i w_i G̃_i W_iᵀ,   G̃ = α·G + (1 − α)·diag(G)

the least-squares solution of min Σ_i w_i ‖X_i Wᵀ − X_i W_iᵀ‖² with the Grams' off-diagonal scaled by α (the
paper's regularisation; α = 1 is plain least squares). `regmean++` (Nguyen et al., 2025) takes each layer's
inputs from the merged model so far instead (layers in forward order, each merged before the next is measured),
so a layer sees the inputs the merged model will actually give it. Grams come from the suite's calibration data
(`merging.objective.StatisticsRequest`) or registered statistics artifacts (plain RegMean only: RegMean++
measures the merge it is building).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merging.runtime.determinism import SingleThread
from merging.errors import RecipeError
from merging.methods.hooks import MethodLineage
from merging.methods.registry import Solved, merge_method
from merging.methods.statistics_params import (StatisticsParams, lineage_details, model_state, registered, request,
                                               tasks_per_model)

PAPER = "https://arxiv.org/abs/2212.09849"


class RegMeanParams(StatisticsParams):
    alpha: float = Field(0.9, ge=0, le=1, description="scale of the Grams' off-diagonal (1: plain least squares)")
    variant: Literal["regmean", "regmean++"] = Field("regmean", description="layer inputs from each model, or from "
                                                                           "the merged model so far")


def regmean_layer(weights: list[torch.Tensor], grams: list[torch.Tensor], coefficients: list[float],
                  alpha: float) -> torch.Tensor:
    """The closed-form merge of one linear layer's weights (out × in) given each model's input Gram (in × in)."""
    lhs = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros((grams[0].shape[0], weights[0].shape[0]), dtype=torch.float64)
    for w, g, c in zip(weights, grams, coefficients):
        g = g.double()
        scaled = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        lhs += c * scaled
        rhs += c * scaled @ w.double().T
    solution = torch.linalg.lstsq(lhs, rhs).solution  # a rank-deficient Gram (unused inputs) still solves
    return solution.T.to(torch.float32)


def _average(models: list[dict], weights: list[float], names: list[str]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {n: sum(w * m[n] for w, m in zip(weights, models)) / total for n in names}


def _solve(inputs, params: RegMeanParams, statistics, progress) -> Solved:
    models = [{n: m.read(n).to(torch.float32) for n in inputs.names} for m in inputs.models]
    state = _average(models, inputs.weights, inputs.names)
    digests: list[str | None] = [None] * len(models)
    with SingleThread():
        if params.statistics:
            if params.variant == "regmean++":
                raise RecipeError("regmean++ measures the merge it builds: give it a suite, not registered statistics")
            stats = registered(inputs, params)
            grams = [{n: s.read(n) for n in s.names} for s in stats]
            digests = list(params.statistics)
            assignments = []
            layers = [n for n in inputs.names if all(n in g for g in grams)]
        else:
            assignments = tasks_per_model(params, statistics.tasks, len(models))
            if params.variant == "regmean":
                grams = [statistics.grams(model_state(inputs, i), tasks) for i, tasks in enumerate(assignments)]
                layers = [n for n in inputs.names if all(n in g for g in grams)]
            else:  # each layer's inputs from the merged model so far, layers in the order the forward reaches them
                full = {**model_state(inputs, 0), **state}
                layers = [n for n in statistics.linear_layers(full) if n in state]
        for k, name in enumerate(layers):
            if params.variant == "regmean++" and not params.statistics:
                full = {**model_state(inputs, 0), **state}
                layer_grams = [statistics.grams(full, tasks, only={name})[name] for tasks in assignments]
            else:
                layer_grams = [g[name] for g in grams]
            state[name] = regmean_layer([m[name] for m in models], layer_grams, inputs.weights, params.alpha)
            inputs.report(f"{params.variant}: layers", k + 1, len(layers))
    details = {"regmean": {"variant": params.variant, "alpha": params.alpha, "layers": len(layers),
                           "statistics": digests, "tasks_per_model": assignments,
                           "data_digest": getattr(statistics, "digest", None)}}
    return Solved(state, details)


@merge_method("regmean", params=RegMeanParams, paper=PAPER, solve=_solve, requires_base=False, data=request,
              suite_param="suite", tasks_param="tasks", model_params=("statistics",),
              lineage=lambda d: MethodLineage(candidate_details=lineage_details(d, "regmean")),
              describe=lambda d: f"{d['regmean']['variant']}, α={d['regmean']['alpha']:g}, "
                                 f"{d['regmean']['layers']} linear layers solved",
              data_digests=lambda d: {"statistics": d["regmean"]["data_digest"] or ",".join(d["regmean"]["statistics"])},
              example={"budget": 32, "alpha": 0.9})
def regmean(inputs, params, state):  # pragma: no cover  (the engine calls solve instead)
    """RegMean: each linear layer merged in closed form to reproduce every model's outputs on its own inputs."""
    raise NotImplementedError("RegMean solves the whole model at once")
