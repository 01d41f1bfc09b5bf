"""`fw_hard` and `fw_soft` as recipe methods: FW-Merging's parameters plus the objective it optimises.

The objective's fields (`suite`, `tasks`, `budget`, `loss`) name data that
`merging/` never loads: the method asks for it as `ObjectiveRequest`s, whoever
runs the recipe (the flows) builds them, and the engine hands them to `solve`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from merging.runtime.determinism import SingleThread
import torch

from merging.algorithms.fw import FWParams, FWSoftParams, fw_hard, fw_soft, initial_merge
from merging.checkpoints.inputs import MergeInputs
from merging.methods.hooks import EdgeSpec, MethodLineage
from merging.methods.registry import MethodParams, Solved, merge_method, path_field
from merging.methods.ties import TiesParams, finalize_ties, prepare_ties, ties
from merging.objective import ObjectiveRequest

PAPER = "https://arxiv.org/abs/2503.12649"
LAMBDA_GRID = (0.1, 0.2, 0.3, 0.4, 0.6, 0.8)


class _ObjectiveFields(MethodParams):
    suite: str = path_field("ta8-mini", description="the task suite whose loss is optimised (a name or a suite file)")
    tasks: tuple[str, ...] | None = Field(None, description="a subset of the suite's tasks")
    budget: int = Field(100, gt=0, description="samples per task (labelled for cross_entropy, unlabelled for entropy; "
                        "FusionBench: 100)")
    loss: Literal["cross_entropy", "entropy"] = Field("cross_entropy", description="the objective")


class FWHardRecipeParams(_ObjectiveFields, FWParams):
    pass


class FWSoftRecipeParams(_ObjectiveFields, FWSoftParams):
    loss: Literal["cross_entropy", "entropy"] = Field("entropy", description="coefficients learn on unlabelled entropy")
    minibatch: int | None = Field(16, gt=0, description="samples per task in each AdaMerging step (FusionBench: 16)")


def _lineage(details: dict) -> MethodLineage:
    """FW-Merging's choices as lineage: one `selected` edge per (iteration, candidate), naming the tensors it
    built, their oracle scores and the step taken, so `mergeyard lineage` shows who built which layers. Steps
    towards the initial merge or towards zero are counted in the run's details (`other_targets`)."""
    grouped: dict[tuple[int, int], list[dict]] = {}
    for s in details.get("selections", []):
        if s.get("candidate") is not None:
            grouped.setdefault((s["iteration"], s["candidate"]), []).append(s)
    edges = [EdgeSpec(cand, "selected", step=it, weight=rows[0]["step"],
                      details={"position": cand, "tensors": [r["tensor"] for r in rows],
                               "scores": [round(r["score"], 6) for r in rows]})
             for (it, cand), rows in sorted(grouped.items())]
    return MethodLineage(edges=edges, carried=("selections",))


def _describe(details: dict) -> str:
    losses = details.get("losses") or []
    chosen = sorted({s["candidate"] for s in details.get("selections", []) if s.get("candidate") is not None})
    other = details.get("other_targets") or {}
    also = "".join(f", {n} steps towards {k}" for k, n in other.items() if n)
    shown = f", loss {losses[0]:.4g} → {losses[-1]:.4g}" if len(losses) > 1 else ""
    return f"selected candidates {chosen}{also}{shown}"


def _objective(params) -> ObjectiveRequest:
    return ObjectiveRequest(params.suite, params.tasks, params.budget, params.loss)


def _soft_objectives(params) -> tuple[ObjectiveRequest, ObjectiveRequest]:
    """One labelled objective per task for its oracle, and the one the coefficients learn on (in minibatches)."""
    return (ObjectiveRequest(params.suite, params.tasks, params.budget, "cross_entropy", per_task=True),
            ObjectiveRequest(params.suite, params.tasks, params.budget, params.loss, minibatch=params.minibatch))


WIRING = dict(data=_objective, suite_param="suite", tasks_param="tasks", lineage=_lineage, describe=_describe,
              example={"iterations": 4, "step_size": 1.0, "lambda": 0.3})


def _decisions(result) -> dict:
    return {"selections": [vars(s) for s in result.selections], "losses": result.losses,
            "initial_scores": result.initial_scores, "other_targets": result.other_targets()}


def initial_state(base, candidates, p: FWParams) -> dict[str, torch.Tensor]:
    """θ_0: `initial_merge`'s, or TIES of all candidates (the authors' `second_merge_method: ties_merge`: the whole
    model trimmed to `density` per candidate, elected signs, the mean of agreeing entries, at λ)."""
    if p.init != "ties":
        return initial_merge(base, candidates, p)
    state = initial_merge(base, candidates, p.model_copy(update={"init": "base"}))
    names = [n for n in base.names if base.entries[n].is_float]
    inputs = MergeInputs(base=base, models=list(candidates), weights=[1.0] * len(candidates), names=names,
                         device=torch.device("cpu"), check_finite=False)
    params = TiesParams(density=p.density, trim_scope="global", aggregate="mean", **{"lambda": p.lam})
    prepared = prepare_ties(inputs, params)
    for n in names:
        state[n] = torch.cat(list(ties(inputs.tensor(n), params, prepared))).reshape(base.entries[n].shape)
    for patch in finalize_ties(prepared):
        state[patch.name].view(-1)[patch.indices] = patch.values.to(torch.float32)
    return state


def _core(params, model):
    return model(**{k: getattr(params, k) for k in model.model_fields})


def _solve_hard(inputs, params, objective, progress) -> Solved:
    with SingleThread():  # its choices, and so the bytes, must not depend on the thread count
        core = _core(params, FWParams)
        result = fw_hard(inputs.base, inputs.models, objective, core, progress,
                         initial_state(inputs.base, inputs.models, core))
    return Solved(result.state, _decisions(result))


def _solve_soft(inputs, params, objective, progress) -> Solved:
    task_objectives, merge_objective = objective
    with SingleThread():
        core = _core(params, FWSoftParams)
        result = fw_soft(inputs.base, inputs.models, task_objectives, merge_objective, core, progress,
                         initial_state(inputs.base, inputs.models, core))
    return Solved(result.state, {**_decisions(result), "coefficients": result.coefficients})


@merge_method("fw_hard", params=FWHardRecipeParams, paper=PAPER, solve=_solve_hard, scale_param="lambda",
              scale_grid=LAMBDA_GRID, scale_affine=False, **WIRING)
def fw_hard_method(inputs, params, state):  # pragma: no cover  (the engine calls solve instead)
    """FW-Merging, hard: from a merge of all, each step moves towards the member a linear oracle picks."""
    raise NotImplementedError("FW-Merging solves the whole model at once")


@merge_method("fw_soft", params=FWSoftRecipeParams, paper=PAPER, solve=_solve_soft,
              **{**WIRING, "data": _soft_objectives,
                 "example": {"iterations": 2, "adam_steps": 10, "adam_lr": 0.05, "budget": 16}})
def fw_soft_method(inputs, params, state):  # pragma: no cover
    """FW-Merging, soft: every task picks a member, merged in with layer-wise coefficients learned on entropy."""
    raise NotImplementedError("FW-Merging solves the whole model at once")
