"""`adamerging` as a recipe method: AdaMerging's coefficients learned on a suite's unlabelled inputs.

    method: adamerging
    base: models/base
    models: [models/ft-a, models/ft-b]
    parameters: {granularity: layer, on: task_arithmetic, steps: 100, suite: support.yaml, budget: 32}

The learned coefficients become the run's recorded parameters (`coefficients:`), so `reproduce` applies them
without learning again and without the suite's data.
"""

from __future__ import annotations

from pydantic import Field

from merging.algorithms.adamerging import AdaMergingParams, adamerging
from merging.runtime.determinism import SingleThread
from merging.methods.hooks import MethodLineage
from merging.methods.registry import MethodParams, Solved, merge_method, path_field
from merging.objective import ObjectiveRequest

PAPER = "https://arxiv.org/abs/2310.02575"


class AdaMergingRecipeParams(MethodParams, AdaMergingParams):
    suite: str = path_field("ta8-mini", description="whose unlabelled inputs the entropy is measured on")
    tasks: tuple[str, ...] | None = Field(None, description="a subset of the suite's tasks")
    budget: int = Field(32, gt=0, description="unlabelled inputs per task")


def _data(params: AdaMergingRecipeParams) -> ObjectiveRequest | None:
    if params.coefficients is not None:
        return None  # nothing to learn: the coefficients are given (a reproduction)
    return ObjectiveRequest(params.suite, params.tasks, params.budget, "entropy")


def _solve(inputs, params: AdaMergingRecipeParams, objective, progress) -> Solved:
    core = AdaMergingParams(**{k: getattr(params, k) for k in AdaMergingParams.model_fields})
    with SingleThread():  # the learned coefficients, and so the bytes, must not depend on the thread count
        result = adamerging(inputs.base, inputs.models, objective, core, inputs.names, progress)
    learned = params.coefficients is None
    details = {"adamerging": {"granularity": core.granularity, "on": core.on, "learned": learned,
                              "losses": result.losses, "mean_coefficients": [sum(r) / len(r) for r in result.coefficients]}}
    return Solved(result.state, details, parameters={"coefficients": result.coefficients} if learned else None)


def _lineage(details: dict) -> MethodLineage:
    means = details["adamerging"]["mean_coefficients"]
    return MethodLineage(candidate_details={i: {"mean_coefficient": round(m, 6)} for i, m in enumerate(means)})


def _describe(details: dict) -> str:
    d = details["adamerging"]
    losses = d["losses"]
    shown = f", entropy {losses[0]:.4g} → {losses[-1]:.4g}" if len(losses) > 1 else ""
    how = "learned" if d["learned"] else "given"
    return f"{d['granularity']}-wise on {d['on']}, coefficients {how} (mean {[round(m, 3) for m in d['mean_coefficients']]}){shown}"


@merge_method("adamerging", params=AdaMergingRecipeParams, paper=PAPER, solve=_solve, data=_data,
              suite_param="suite", tasks_param="tasks", lineage=_lineage, describe=_describe,
              example={"granularity": "layer", "steps": 20, "lr": 0.05, "budget": 16})
def adamerging_method(inputs, params, state):  # pragma: no cover  (the engine calls solve instead)
    """AdaMerging: task- or layer-wise coefficients learned by minimising prediction entropy on unlabelled data."""
    raise NotImplementedError("AdaMerging solves the whole model at once")
