"""`fw_hard` and `fw_soft` as recipe methods: FW-Merging's parameters plus the objective it optimises.

The objective's fields (`suite`, `tasks`, `budget`, `loss`) name data that
`merging/` never loads: whoever runs the recipe (the flows) builds the
objective from them and hands it to the engine.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from merging.fw import FWParams, FWSoftParams, fw_hard, fw_soft
from merging.determinism import SingleThread
from merging.methods.registry import MethodParams, Solved, merge_method, path_field

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


@merge_method("fw_hard", params=FWHardRecipeParams, paper=PAPER, solve=_solve_hard)
def fw_hard_method(inputs, params, state):  # pragma: no cover  (the engine calls solve instead)
    """FW-Merging, hard: each iteration steps towards the candidate a linear oracle picks on the target loss."""
    raise NotImplementedError("FW-Merging solves the whole model at once")


@merge_method("fw_soft", params=FWSoftRecipeParams, paper=PAPER, solve=_solve_soft)
def fw_soft_method(inputs, params, state):  # pragma: no cover
    """FW-Merging, soft: one selection per task, merged with layer-wise coefficients learned on entropy."""
    raise NotImplementedError("FW-Merging solves the whole model at once")
