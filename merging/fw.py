"""FW-Merging (Chen et al., 2025, arXiv 2503.12649): merging as Frank-Wolfe over the candidates' span.

Each iteration takes the gradient g of the objective at the current merge θ_t,
asks a linear minimisation oracle (LMO) which candidate best descends it, and
steps towards that candidate:

    γ_t = 2 / (t + 2) · step_size
    θ_{t+1} = θ_t + γ_t · λ · inner(θ_sel − θ_t)

`inner` is the identity (task arithmetic) or TIES's trim of the step to its
largest-magnitude `density` fraction per tensor. With `granularity: layer`
each tensor picks its own candidate (no move where even the best score is
non-negative); with `task` one candidate is picked for the whole model by the
summed per-tensor score.

The oracle's score of candidate i on tensor n is a cosine:
  `direction` (default): cos(g_n, θ_i,n − θ_t,n), the FW linear term itself,
      whose sign says whether moving towards θ_i descends;
  `weights`: cos(g_n, θ_i,n), what the authors' code computes.
Both come from one streamed pass over each candidate per iteration: ⟨g, θ_i⟩
and ⟨θ_t, θ_i⟩ are read off the memory-mapped tensor, and ‖θ_i,n‖² is cached
after the first pass (the candidates never change). Only θ_t, g, the tensor
being read and, per tensor, the best candidate's tensor are resident, so
memory does not grow with the number of candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from merging.checkpoint import Checkpoint
from merging.errors import MergeyardError
from merging.objective import Objective

Progress = Callable[[str, int, int], None] | None


class FWParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    iterations: int = Field(10, ge=1, description="Frank-Wolfe iterations (paper: 10)")
    step_size: float = Field(0.1, gt=0, description="γ_t = 2/(t+2) · step_size")
    lam: float = Field(0.3, alias="lambda", gt=0, description="scale of each step towards the selection (λ)")
    granularity: Literal["layer", "task"] = Field("layer", description="a selection per tensor, or one per iteration")
    oracle: Literal["direction", "weights"] = Field("direction", description="cosine of g with θ_i − θ_t, or with θ_i")
    inner: Literal["task_arithmetic", "ties"] = Field("task_arithmetic", description="how a step is merged in")
    density: float = Field(0.2, gt=0, le=1, description="TIES inner merge: fraction of each step kept")
    init: Literal["base", "task_arithmetic"] = Field("base", description="θ_0: the base, or task arithmetic of all")
    scale: float = Field(1.0, gt=0, description="atoms θ_base + scale·(θ_i − θ_base); at N·λ the hull holds task arithmetic")


@dataclass(frozen=True)
class Selection:
    iteration: int
    tensor: str
    candidate: int
    score: float
    step: float  # γ_t · λ actually applied


@dataclass
class FWResult:
    state: dict[str, torch.Tensor]
    selections: list[Selection] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # objective at θ_0 .. θ_{T-1}, then the final one
    initial_scores: list[float] = field(default_factory=list)  # per candidate, mean per-tensor score at θ_0

    def counts(self, n_candidates: int) -> list[int]:
        """How many (iteration, tensor) selections each candidate won."""
        out = [0] * n_candidates
        for s in self.selections:
            out[s.candidate] += 1
        return out


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.flatten().double(), b.flatten().double()))


def _trim(update: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim of one step: keep the int(density·n) largest magnitudes (at least one)."""
    k = max(1, int(density * update.numel()))
    if k >= update.numel():
        return update
    flat = update.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return (flat * keep).view_as(update)


class _CandidateNorms:
    """‖θ_i,n‖² per candidate and tensor, filled on the first pass and reused after."""

    def __init__(self):
        self.sq: dict[tuple[int, str], float] = {}

    def get(self, i: int, name: str, tensor: torch.Tensor) -> float:
        key = (i, name)
        if key not in self.sq:
            self.sq[key] = _dot(tensor, tensor)
        return self.sq[key]


def _score(oracle: str, g_dot_c: float, g_dot_t: float, t_dot_c: float, c_sq: float, t_sq: float, g_norm: float) -> float:
    if g_norm == 0.0:
        return 0.0
    if oracle == "weights":
        return g_dot_c / (g_norm * c_sq**0.5) if c_sq > 0 else 0.0
    dist_sq = max(c_sq - 2 * t_dot_c + t_sq, 0.0)
    if dist_sq <= 1e-30:
        return 0.0  # θ_t already sits on this candidate here
    return (g_dot_c - g_dot_t) / (g_norm * dist_sq**0.5)


def _atom(cand: Checkpoint, name: str, base: Checkpoint, scale: float) -> torch.Tensor:
    """A vertex of the constraint set: the candidate itself, or its task vector scaled from the base."""
    c = cand.read(name).to(torch.float32)
    if scale == 1.0:
        return c
    b = base.read(name).to(torch.float32)
    return b + scale * (c - b)


def _scored(name: str, g: torch.Tensor, theta: torch.Tensor, candidates: Sequence[Checkpoint], norms: "_CandidateNorms",
            oracle: str, base: Checkpoint, scale: float):
    """(candidate index, its atom tensor, its oracle score) for one tensor, reading one candidate at a time."""
    g_norm, g_dot_t, t_sq = _dot(g, g) ** 0.5, _dot(g, theta), _dot(theta, theta)
    for i, cand in enumerate(candidates):
        c = _atom(cand, name, base, scale)
        yield i, c, _score(oracle, _dot(g, c), g_dot_t, _dot(theta, c), norms.get(i, name, c), t_sq, g_norm)


def fw_hard(base: Checkpoint, candidates: Sequence[Checkpoint], objective: Objective, params: FWParams | None = None,
            progress: Progress = None) -> FWResult:
    """Frank-Wolfe merging with hard (one-candidate) selections. Returns θ_T and every selection."""
    params = params or FWParams()
    if not candidates:
        raise MergeyardError("FW-Merging needs at least one candidate")
    names = [n for n in objective.names]
    for c in candidates:
        missing = [n for n in names if n not in c.entries]
        if missing:
            raise MergeyardError(f"candidate {c.path} has no tensor {missing[0]!r}: not the objective's architecture")
    state = {n: base.read(n).to(torch.float32) if base.entries[n].is_float else base.read(n) for n in base.names}
    if params.init == "task_arithmetic":
        for n in names:
            theta0 = state[n].clone()
            for c in candidates:
                state[n] += params.lam * (c.read(n).to(torch.float32) - theta0)
    norms = _CandidateNorms()
    result = FWResult(state)
    for t in range(params.iterations):
        loss, grad = objective.loss_and_grad(state)
        result.losses.append(loss)
        step = 2.0 / (t + 2) * params.step_size * params.lam
        scores = torch.zeros(len(candidates), len(names), dtype=torch.float64)
        best_tensor: dict[str, torch.Tensor] = {}
        for j, name in enumerate(names):
            best_i, best_s = -1, float("inf")
            for i, c, s in _scored(name, grad[name].to(torch.float32), state[name], candidates, norms, params.oracle,
                                   base, params.scale):
                scores[i, j] = s
                if s < best_s:
                    best_i, best_s = i, s
                    if params.granularity == "layer":
                        best_tensor[name] = c  # the only candidate tensor kept beyond this loop step
            if params.granularity == "layer" and best_s < 0:
                _apply(state, name, best_tensor.pop(name), step, params)
                result.selections.append(Selection(t, name, best_i, best_s, step))
            best_tensor.pop(name, None)
            if progress:
                progress(f"FW iteration {t + 1}/{params.iterations}", j + 1, len(names))
        if t == 0:
            result.initial_scores = scores.mean(dim=1).tolist()
        if params.granularity == "task":
            totals = scores.sum(dim=1)
            chosen = int(torch.argmin(totals))
            if float(totals[chosen]) < 0:
                for j, name in enumerate(names):
                    _apply(state, name, _atom(candidates[chosen], name, base, params.scale), step, params)
                    result.selections.append(Selection(t, name, chosen, float(scores[chosen, j]), step))
    result.losses.append(objective.loss(state))
    return result


def _apply(state: dict[str, torch.Tensor], name: str, selected: torch.Tensor, step: float, params: FWParams) -> None:
    update = selected - state[name]
    if params.inner == "ties":
        update = _trim(update, params.density)
    state[name] = state[name] + step * update


class FWSoftParams(FWParams):
    adam_steps: int = Field(20, ge=1, description="Adam steps on the layer-wise coefficients per iteration")
    adam_lr: float = Field(1e-2, gt=0, description="Adam's learning rate on the coefficients")


@dataclass
class FWSoftResult(FWResult):
    coefficients: list[dict[int, list[float]]] = field(default_factory=list)  # per iteration: candidate → per tensor α


def fw_soft(base: Checkpoint, candidates: Sequence[Checkpoint], task_objectives: dict[str, Objective],
            merge_objective: Objective, params: FWSoftParams | None = None, progress: Progress = None) -> FWSoftResult:
    """FW-Soft: each iteration, one selection per task (the LMO on that task's loss), merged with layer-wise
    AdaMerging coefficients α[s, n] learned by Adam on `merge_objective` (prediction entropy, unlabelled):

        θ' = θ_t + Σ_s α[s, n] (θ_s,n − θ_t,n),   θ_{t+1} = θ_t + γ_t (θ' − θ_t)

    ∂L/∂α[s, n] = ⟨∇_n L(θ'), θ_s,n − θ_t,n⟩, so the coefficients train on the objective's tensor gradients.
    Resident: θ_t and the selected directions (at most one per task, not one per candidate).
    """
    params = params or FWSoftParams()
    names = list(merge_objective.names)
    state = {n: base.read(n).to(torch.float32) if base.entries[n].is_float else base.read(n) for n in base.names}
    result = FWSoftResult(state)
    norms = _CandidateNorms()
    for t in range(params.iterations):
        result.losses.append(merge_objective.loss(state))
        chosen: list[int] = []
        for task, objective in task_objectives.items():
            _, grad = objective.loss_and_grad(state)
            totals = torch.zeros(len(candidates), dtype=torch.float64)
            for name in names:
                for i, _, score in _scored(name, grad[name].to(torch.float32), state[name], candidates, norms,
                                           params.oracle, base, params.scale):
                    totals[i] += score
            best = int(torch.argmin(totals))
            if float(totals[best]) < 0 and best not in chosen:
                chosen.append(best)
        if not chosen:
            continue
        directions = {i: {n: _atom(candidates[i], n, base, params.scale) - state[n] for n in names} for i in chosen}
        alpha = torch.full((len(chosen), len(names)), params.lam, dtype=torch.float32, requires_grad=True)
        optimiser = torch.optim.Adam([alpha], lr=params.adam_lr)
        for step in range(params.adam_steps):
            with torch.no_grad():
                merged = dict(state)
                for j, n in enumerate(names):
                    merged[n] = state[n] + sum(alpha[k, j] * directions[i][n] for k, i in enumerate(chosen))
            _, grad = merge_objective.loss_and_grad(merged)
            alpha.grad = torch.tensor([[_dot(grad[n], directions[i][n]) for n in names] for i in chosen],
                                      dtype=torch.float32)
            optimiser.step()
            if progress:
                progress(f"FW-Soft iteration {t + 1}/{params.iterations}", step + 1, params.adam_steps)
        gamma = 2.0 / (t + 2) * params.step_size
        coeffs = alpha.detach()
        for j, n in enumerate(names):
            state[n] = state[n] + gamma * sum(coeffs[k, j] * directions[i][n] for k, i in enumerate(chosen))
        for k, i in enumerate(chosen):
            result.selections.append(Selection(t, "*", i, float(coeffs[k].mean()), gamma))
        result.coefficients.append({i: coeffs[k].tolist() for k, i in enumerate(chosen)})
    result.losses.append(merge_objective.loss(state))
    return result
