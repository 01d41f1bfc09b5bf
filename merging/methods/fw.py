"""`fw_hard` and `fw_soft` as recipe methods: FW-Merging's parameters plus the objective it optimises.

The objective's fields (`suite`, `tasks`, `budget`, `loss`) name data that
`merging/` never loads: the method asks for it as `ObjectiveRequest`s, whoever
runs the recipe (the flows) builds them, and the engine hands them to `solve`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from merging.fw import FWParams, FWSoftParams, fw_hard, fw_soft
from merging.determinism import SingleThread
from merging.methods.hooks import EdgeSpec, MethodLineage
from merging.methods.registry import MethodParams, Solved, merge_method, path_field
from merging.objective import ObjectiveRequest

PAPER = "https://arxiv.org/abs/2503.12649"


class _ObjectiveFields(MethodParams):
    suite: str = path_field("ta8-mini", description="the task suite whose loss is optimised (a name or a suite file)")
    tasks: tuple[str, ...] | None = Field(None, description="a subset of the suite's tasks")
    budget: int = Field(100, gt=0, description="samples per task (labelled for cross_entropy, unlabelled for entropy)")
    loss: Literal["cross_entropy", "entropy"] = Field("cross_entropy", description="the objective")


class FWHardRecipeParams(_ObjectiveFields, FWParams):
    pass


class FWSoftRecipeParams(_ObjectiveFields, FWSoftParams):
    loss: Literal["cross_entropy", "entropy"] = Field("entropy", description="coefficients learn on unlabelled entropy")


def _lineage(details: dict) -> MethodLineage:
    """FW-Merging's choices as lineage: one `selected` edge per (iteration, candidate), naming the tensors it
    built, their oracle scores and the step taken, so `mergeyard lineage` shows who built which layers."""
    grouped: dict[tuple[int, int], list[dict]] = {}
    for s in details.get("selections", []):
        grouped.setdefault((s["iteration"], s["candidate"]), []).append(s)
    edges = [EdgeSpec(cand, "selected", step=it, weight=rows[0]["step"],
                      details={"position": cand, "tensors": [r["tensor"] for r in rows],
                               "scores": [round(r["score"], 6) for r in rows]})
             for (it, cand), rows in sorted(grouped.items())]
    return MethodLineage(edges=edges, carried=("selections",))


def _describe(details: dict) -> str:
    losses = details.get("losses") or []
    chosen = sorted({s["candidate"] for s in details.get("selections", [])})
    shown = f", loss {losses[0]:.4g} → {losses[-1]:.4g}" if len(losses) > 1 else ""
    return f"selected candidates {chosen}{shown}"


def _objective(params) -> ObjectiveRequest:
    return ObjectiveRequest(params.suite, params.tasks, params.budget, params.loss)


def _soft_objectives(params) -> tuple[ObjectiveRequest, ObjectiveRequest]:
    """One objective per task for the selections, and the one the coefficients learn on."""
    return (ObjectiveRequest(params.suite, params.tasks, params.budget, "cross_entropy", per_task=True),
            _objective(params))


WIRING = dict(data=_objective, suite_param="suite", tasks_param="tasks", lineage=_lineage, describe=_describe,
              example={"iterations": 10, "step_size": 1.0, "lambda": 0.3})


def _selections(result) -> dict:
    return {"selections": [vars(s) for s in result.selections], "losses": result.losses,
            "initial_scores": result.initial_scores}


def _solve_hard(inputs, params, objective, progress) -> Solved:
    with SingleThread():
        result = fw_hard(inputs.base, inputs.models, objective, FWParams(**{k: getattr(params, k) for k in FWParams.model_fields}),
                         progress)
    return Solved(result.state, _selections(result))


def _solve_soft(inputs, params, objective, progress) -> Solved:
    task_objectives, merge_objective = objective
    with SingleThread():
        result = fw_soft(inputs.base, inputs.models, task_objectives, merge_objective,
                         FWSoftParams(**{k: getattr(params, k) for k in FWSoftParams.model_fields}), progress)
    return Solved(result.state, {**_selections(result), "coefficients": result.coefficients})


@merge_method("fw_hard", params=FWHardRecipeParams, paper=PAPER, solve=_solve_hard, **WIRING)
def fw_hard_method(inputs, params, state):  # pragma: no cover  (the engine calls solve instead)
    """FW-Merging, hard: each iteration steps towards the candidate a linear oracle picks on the target loss."""
    raise NotImplementedError("FW-Merging solves the whole model at once")


@merge_method("fw_soft", params=FWSoftRecipeParams, paper=PAPER, solve=_solve_soft,
              **{**WIRING, "data": _soft_objectives,
                 "example": {"iterations": 3, "step_size": 1.0, "lambda": 0.3, "adam_steps": 10, "adam_lr": 0.05}})
def fw_soft_method(inputs, params, state):  # pragma: no cover
    """FW-Merging, soft: one selection per task, merged with layer-wise coefficients learned on entropy."""
    raise NotImplementedError("FW-Merging solves the whole model at once")
