"""Fisher merging (Matena & Raffel, NeurIPS 2022): each parameter averaged with its models' diagonal Fisher as
weights, θ = Σ_i w_i F_i θ_i / Σ_i w_i F_i.

The Fisher of model i is the mean squared per-sample gradient of its loss on its task's calibration data
(`merging.objective.StatisticsRequest`, measured through the suite's family), or a registered statistics
artifact (`statistics: [...]`). `normalize` divides each model's Fisher by its mean first, so a model whose
losses have larger gradients everywhere does not outweigh the others wholesale (FusionBench's
`normalize_fisher_weight`). Where no model has any Fisher mass (an unused tensor) the weights fall back to
plain weighted averaging.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merging.runtime.determinism import SingleThread
from merging.methods.hooks import MethodLineage
from merging.methods.registry import Solved, merge_method
from merging.methods.statistics_params import (StatisticsParams, lineage_details, model_state, registered, request,
                                               tasks_per_model)

PAPER = "https://arxiv.org/abs/2111.09832"


class FisherParams(StatisticsParams):
    normalize: bool = Field(True, description="divide each model's Fisher by its mean first")
    floor: float = Field(1e-12, ge=0, description="added to every Fisher weight (no division by zero)")


def _fishers(inputs, params: FisherParams, statistics) -> tuple[list[dict], list[str | None], list[list[str]]]:
    if params.statistics:
        stats = registered(inputs, params)
        return [{n: s.read(n) for n in s.names} for s in stats], list(params.statistics), []
    assignments = tasks_per_model(params, statistics.tasks, len(inputs.models))
    with SingleThread():
        fishers = [statistics.fisher(model_state(inputs, i), tasks) for i, tasks in enumerate(assignments)]
    return fishers, [None] * len(fishers), assignments


def fisher_average(models: list[dict[str, torch.Tensor]], fishers: list[dict[str, torch.Tensor]], weights: list[float],
                   names: list[str], normalize: bool, floor: float) -> dict[str, torch.Tensor]:
    """The Fisher-weighted average of every tensor in `names` (a plain weighted mean where no Fisher covers it)."""
    scale = []
    for f in fishers:
        total = sum(float(v.double().sum()) for v in f.values())
        count = sum(v.numel() for v in f.values())
        scale.append(count / total if normalize and total > 0 else 1.0)
    out = {}
    for n in names:
        num = torch.zeros_like(models[0][n], dtype=torch.float64)
        den = torch.zeros_like(num)
        for m, f, w, s in zip(models, fishers, weights, scale):
            if n in f:
                weight = w * (f[n].double() * s + floor)
            else:
                weight = torch.full_like(num, w * (1.0 + floor))
            num += weight * m[n].double()
            den += weight
        out[n] = (num / den).float()
    return out


def _solve(inputs, params: FisherParams, statistics, progress) -> Solved:
    fishers, digests, assignments = _fishers(inputs, params, statistics)
    models = [{n: m.read(n).to(torch.float32) for n in inputs.names} for m in inputs.models]
    state = fisher_average(models, fishers, inputs.weights, inputs.names, params.normalize, params.floor)
    details = {"fisher": {"statistics": digests, "tasks_per_model": assignments,
                          "data_digest": getattr(statistics, "digest", None)}}
    return Solved(state, details)


@merge_method("fisher", params=FisherParams, paper=PAPER, solve=_solve, requires_base=False, data=request,
              suite_param="suite", tasks_param="tasks", model_params=("statistics",),
              lineage=lambda d: MethodLineage(candidate_details=lineage_details(d, "fisher")),
              describe=lambda d: "from registered statistics" if any(d["fisher"]["statistics"]) else
              f"Fisher on {d['fisher']['tasks_per_model']}",
              data_digests=lambda d: {"statistics": d["fisher"]["data_digest"] or ",".join(d["fisher"]["statistics"])},
              example={"budget": 32})
def fisher(inputs, params, state):  # pragma: no cover  (the engine calls solve instead)
    """Fisher merging: each parameter averaged with its models' diagonal Fisher information as weights."""
    raise NotImplementedError("Fisher merging solves the whole model at once")
