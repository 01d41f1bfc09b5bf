"""FW-Merging (Chen et al., ICCV 2025, arXiv 2503.12649): merging as Frank-Wolfe over the candidates.

FW-hard, as the authors' code (`discriminative/merge.py`, `frank_wolfe_merge`) and FusionBench
(`FrankWolfeHardAlgorithm`) run it:

    θ_0 = a merge of every candidate (task arithmetic at λ, or TIES), which joins the pool as one more
          candidate ("initial")
    for t = 0 … T−1:
        g = ∇L(θ_t) on the suite's labelled calibration budget
        a linear oracle picks, per tensor (`layer`) or for the whole model (`task`), the pool member s whose
        cosine with g is lowest: cos(g, θ_s) (`weights`, both codes) or cos(g, θ_s − θ_t) (`direction`)
        θ_{t+1} = θ_t + λ · γ_t · inner(θ_s − θ_t),   γ_t = 2/(t+2) · step_size

`inner` is task arithmetic (the identity) or TIES's trim of the whole step to its top `density` magnitudes (the
authors' `second_merge_method`). Where no member descends (its best score ≥ 0) the authors' layer oracle steps
towards zero, FusionBench's towards the best member anyway; mergeyard can also stay (`no_descent`).

Only θ_t, its gradient, θ_0 and, per tensor, the best member's tensor are resident (with `inner: ties`, the
whole step too, to find its global threshold): memory does not grow with the pool. Candidates are read one at a
time from their memory-mapped files, their norms cached after the first pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from merging.checkpoints.checkpoint import Checkpoint
from merging.errors import MergeyardError
from merging.objective import Objective

Progress = Callable[[str, int, int], None] | None
Target = Literal["candidate", "initial", "zero"]


class FWParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    iterations: int = Field(10, ge=1, description="Frank-Wolfe iterations (both codes: 10)")
    step_size: float = Field(0.1, gt=0, description="γ_t = 2/(t+2) · step_size (the authors' script and FusionBench: 0.1)")
    lam: float = Field(0.3, alias="lambda", gt=0, description="the inner merge's scale: of θ_0's task vectors and "
                       "of each step (the authors' 0.29, FusionBench's 0.3)")
    granularity: Literal["layer", "task"] = Field("layer", description="a selection per tensor (the authors' code), "
                                                  "or one for the whole model (FusionBench's default)")
    oracle: Literal["weights", "direction"] = Field("weights", description="cosine of g with θ_s (both codes), or "
                                                    "with θ_s − θ_t (the linear term's own direction)")
    no_descent: Literal["zero", "best", "stay"] | None = Field(
        None, description="where no member descends: step towards zero (the authors' layer oracle), towards the "
        "best anyway (their task oracle, FusionBench), or not at all; default: the authors' for the granularity")
    inner: Literal["task_arithmetic", "ties"] = Field("task_arithmetic", description="how a step (and a TIES "
                                                      "initial merge) is merged in")
    density: float = Field(0.3, gt=0, le=1, description="TIES: the fraction of the step's (and of each task "
                           "vector's) magnitudes kept (the authors' mask rate 0.7)")
    init: Literal["task_arithmetic", "ties", "base"] = Field(
        "task_arithmetic", description="θ_0: task arithmetic of all at λ (the authors' script, FusionBench), TIES "
        "of all (the authors' config: density 0.3, mean, at λ; they set λ 0.9), or the base")
    initial_candidate: bool = Field(True, description="θ_0 joins the pool (\"initial\" in both codes)")
    scale: float = Field(1.0, gt=0, description="candidates taken as θ_base + scale·(θ_i − θ_base) (mergeyard's)")

    def descent_rule(self) -> str:
        return self.no_descent or ("zero" if self.granularity == "layer" else "best")


@dataclass(frozen=True)
class Selection:
    iteration: int
    tensor: str
    candidate: int | None  # a candidate's position; None for the initial model or zero
    score: float
    step: float  # λ·γ_t actually applied
    target: Target = "candidate"


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
            if s.candidate is not None:
                out[s.candidate] += 1
        return out

    def other_targets(self) -> dict[str, int]:
        """How many (iteration, tensor) steps went towards the initial model, and towards zero."""
        out = {"initial": 0, "zero": 0}
        for s in self.selections:
            if s.target != "candidate":
                out[s.target] += 1
        return out


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.flatten().double(), b.flatten().double()))


def trim_global(updates: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """TIES's trim of one step over the whole model: keep entries with |u| ≥ the k-th smallest |u|,
    k = d − int(d·density) (ties at the threshold kept), as the authors' `topk_values_mask`."""
    if not updates or density >= 1:
        return updates
    flat = torch.cat([u.reshape(-1).abs() for u in updates.values()])
    k = flat.numel() - int(flat.numel() * density)
    if k <= 0:
        return updates
    threshold = flat.kthvalue(k).values
    return {n: u * (u.abs() >= threshold) for n, u in updates.items()}


def initial_merge(base: Checkpoint, candidates: Sequence[Checkpoint], p: FWParams) -> dict[str, torch.Tensor]:
    """θ_0 for `init: base` or `task_arithmetic`: every tensor of the base, its float tensors merged from all
    candidates (TIES, a method's own merge, comes from merging.methods.fw and is handed to fw_hard/fw_soft)."""
    if p.init == "ties":
        raise ValueError("init: ties is TIES of all candidates: merging.methods.fw.initial_state merges it")
    # cloned: a read may share memory with every later read of the same tensor (merging.checkpoints), and θ moves
    state = {n: base.read(n).to(torch.float32).clone() if base.entries[n].is_float else base.read(n)
             for n in base.names}
    if p.init == "task_arithmetic":
        for n in (n for n in base.names if base.entries[n].is_float):
            theta0 = state[n].clone()
            for c in candidates:
                state[n] += p.lam * (c.read(n).to(torch.float32) - theta0)
    return state


class Pool:
    """The members a linear oracle chooses from: the candidates (read when scored), and θ_0 if it joins."""

    def __init__(self, base: Checkpoint, candidates: Sequence[Checkpoint], scale: float,
                 initial: dict[str, torch.Tensor] | None):
        self.base, self.candidates, self.scale, self.initial = base, list(candidates), scale, initial
        self._sq: dict[tuple[int, str], float] = {}

    def __len__(self) -> int:
        return len(self.candidates) + (self.initial is not None)

    def target(self, i: int) -> Target:
        return "candidate" if i < len(self.candidates) else "initial"

    def tensor(self, i: int, name: str) -> torch.Tensor:
        """Member i's tensor: a candidate (as an atom θ_base + scale·τ), or θ_0."""
        if i >= len(self.candidates):
            return self.initial[name]
        c = self.candidates[i].read(name).to(torch.float32)
        if self.scale == 1.0:
            return c
        b = self.base.read(name).to(torch.float32)
        return b + self.scale * (c - b)

    def scored(self, name: str, g: torch.Tensor, theta: torch.Tensor, oracle: str,
               skip: frozenset[int] = frozenset()) -> Iterator[tuple[int, torch.Tensor, float]]:
        """(member, its tensor, its cosine score) for one tensor, one member resident at a time."""
        g_norm, g_dot_t, t_sq = _dot(g, g) ** 0.5, _dot(g, theta), _dot(theta, theta)
        for i in range(len(self)):
            if i in skip:
                continue
            c = self.tensor(i, name)
            if (i, name) not in self._sq:
                self._sq[(i, name)] = _dot(c, c)
            yield i, c, _score(oracle, _dot(g, c), g_dot_t, _dot(theta, c), self._sq[(i, name)], t_sq, g_norm)


def _score(oracle: str, g_dot_c: float, g_dot_t: float, t_dot_c: float, c_sq: float, t_sq: float, g_norm: float) -> float:
    if g_norm == 0.0:
        return 0.0
    if oracle == "weights":
        return g_dot_c / (g_norm * c_sq**0.5) if c_sq > 0 else 0.0
    dist_sq = max(c_sq - 2 * t_dot_c + t_sq, 0.0)
    if dist_sq <= 1e-30:
        return 0.0  # θ_t already sits on this member here
    return (g_dot_c - g_dot_t) / (g_norm * dist_sq**0.5)


def _check_pool(candidates: Sequence[Checkpoint], names: Sequence[str]) -> None:
    if not candidates:
        raise MergeyardError("FW-Merging needs at least one candidate")
    for c in candidates:
        missing = [n for n in names if n not in c.entries]
        if missing:
            raise MergeyardError(f"candidate {c.path} has no tensor {missing[0]!r}: not the objective's architecture")


class _Stepper:
    """Applies θ ← θ + step·inner(target − θ): at once per tensor for task arithmetic, all together for TIES's
    global trim (which needs the whole step's magnitudes)."""

    def __init__(self, state: dict[str, torch.Tensor], p: FWParams, step: float):
        self.state, self.p, self.step, self.pending = state, p, step, {}

    def towards(self, name: str, target: torch.Tensor | None) -> None:
        update = (target if target is not None else 0.0) - self.state[name]
        if self.p.inner == "ties":
            self.pending[name] = update
        else:
            self.state[name] = self.state[name] + self.step * update

    def finish(self) -> None:
        for name, update in trim_global(self.pending, self.p.density).items():
            self.state[name] = self.state[name] + self.step * update


def fw_hard(base: Checkpoint, candidates: Sequence[Checkpoint], objective: Objective, params: FWParams | None = None,
            progress: Progress = None, initial: dict[str, torch.Tensor] | None = None) -> FWResult:
    """Frank-Wolfe merging with hard (one-member) selections from θ_0 = `initial` (default: `initial_merge`).
    Returns θ_T and every selection."""
    p = params or FWParams()
    names = list(objective.names)
    _check_pool(candidates, names)
    state = initial if initial is not None else initial_merge(base, candidates, p)
    pool = Pool(base, candidates, p.scale, {n: state[n].clone() for n in names} if p.initial_candidate else None)
    rule = p.descent_rule()
    result = FWResult(state)
    for t in range(p.iterations):
        loss, grad = objective.loss_and_grad(state)
        result.losses.append(loss)
        stepper = _Stepper(state, p, 2.0 / (t + 2) * p.step_size * p.lam)
        scores = torch.zeros(len(pool), len(names), dtype=torch.float64)
        for j, name in enumerate(names):
            best_i, best_s, best_c = -1, float("inf"), None
            for i, c, s in pool.scored(name, grad[name].to(torch.float32), state[name], p.oracle):
                scores[i, j] = s
                if s < best_s:
                    best_i, best_s, best_c = i, s, c  # the only member tensor kept beyond this step
            if p.granularity == "layer":
                _select(result, stepper, t, name, pool, best_i, best_s, best_c, rule)
            if progress:
                progress(f"FW iteration {t + 1}/{p.iterations}", j + 1, len(names))
        if t == 0:
            result.initial_scores = scores[:len(candidates)].mean(dim=1).tolist()
        if p.granularity == "task":
            totals = scores.sum(dim=1)
            chosen = int(torch.argmin(totals))
            for j, name in enumerate(names):
                _select(result, stepper, t, name, pool, chosen, float(totals[chosen]), pool.tensor(chosen, name), rule,
                        score=float(scores[chosen, j]))
        stepper.finish()
    result.losses.append(objective.loss(state))
    return result


def _select(result: FWResult, stepper: _Stepper, t: int, name: str, pool: Pool, best: int, decisive: float,
            tensor: torch.Tensor, rule: str, score: float | None = None) -> None:
    """Step `name` towards member `best` if it descends (its decisive score < 0), else as the rule says."""
    score = decisive if score is None else score
    if decisive < 0 or rule == "best":
        stepper.towards(name, tensor)
        target = pool.target(best)
        result.selections.append(Selection(t, name, best if target == "candidate" else None, score, stepper.step,
                                           target))
    elif rule == "zero":
        stepper.towards(name, None)
        result.selections.append(Selection(t, name, None, score, stepper.step, "zero"))


class FWSoftParams(FWParams):
    init: Literal["task_arithmetic", "ties", "base"] = Field("base", description="θ_0 (FusionBench's FW-soft: "
                                                             "the base)")
    granularity: Literal["layer", "task"] = Field("task", description="one selection per task for the whole "
                                                  "model (FusionBench), or per tensor")
    initial_candidate: bool = Field(False, description="θ_0 joins the pool (FusionBench's FW-soft: no)")
    merge: Literal["adamerging", "task_arithmetic"] = Field(
        "adamerging", description="how the selections merge in: layer-wise AdaMerging relative to θ_t "
        "(FusionBench), or task arithmetic at λ·γ_t (γ_0 = 1: one iteration is the authors' per-task "
        "selection, each task picking one model, then task arithmetic of the picks)")
    adam_steps: int = Field(500, ge=1, description="AdaMerging's Adam steps per iteration (FusionBench: 500)")
    adam_lr: float = Field(1e-3, gt=0, description="AdaMerging's learning rate (FusionBench: 1e-3)")
    adam_init: float = Field(0.3, description="the coefficients' start in the first iteration (FusionBench: 0.3)")
    adam_init_later: float = Field(1e-8, description="their start in later iterations (FusionBench's ada_coeff)")


@dataclass
class FWSoftResult(FWResult):
    coefficients: list[list[list[float]]] = field(default_factory=list)  # per iteration: selection × tensor α


def fw_soft(base: Checkpoint, candidates: Sequence[Checkpoint], task_objectives: dict[str, Objective],
            merge_objective: Objective, params: FWSoftParams | None = None, progress: Progress = None,
            initial: dict[str, torch.Tensor] | None = None) -> FWSoftResult:
    """FW-Soft, as FusionBench's `FrankWolfeSoftAlgorithm`: each iteration, every task's own linear oracle picks
    a member (a task skips what an earlier task took and takes the next best), and the picks d_k = θ_k − θ_t merge
    in with layer-wise coefficients learned by Adam on `merge_objective` (prediction entropy, unlabelled):

        θ_{t+1} = θ_t + Σ_k α[k, n] d_k,n,   ∂L/∂α[k, n] = ⟨∇_n L(θ'), d_k,n⟩

    (or, `merge: task_arithmetic`, θ_{t+1} = θ_t + λ·γ_t Σ_k d_k). Resident: θ_t and one direction per task.
    """
    p = params or FWSoftParams()
    names = list(merge_objective.names)
    _check_pool(candidates, names)
    state = initial if initial is not None else initial_merge(base, candidates, p)
    pool = Pool(base, candidates, p.scale, {n: state[n].clone() for n in names} if p.initial_candidate else None)
    result = FWSoftResult(state)
    for t in range(p.iterations):
        result.losses.append(merge_objective.loss(state))
        picks = _soft_picks(result, t, pool, task_objectives, state, names, p)
        directions = [{n: pick[n] - state[n] for n in names} for pick in picks]
        if p.inner == "ties":
            directions = [trim_global(d, p.density) for d in directions]
        if p.merge == "task_arithmetic":
            step = p.lam * (2.0 / (t + 2) * p.step_size if t > 0 else 1.0)
            alpha = torch.full((len(picks), len(names)), step)
        else:
            alpha = _learn_coefficients(state, directions, names, merge_objective, p,
                                        p.adam_init if t == 0 else p.adam_init_later, progress, t)
            result.coefficients.append(alpha.tolist())
        for j, n in enumerate(names):
            state[n] = state[n] + sum(alpha[k, j] * d[n] for k, d in enumerate(directions))
        _record_steps(result, t, alpha, p.granularity)
    result.losses.append(merge_objective.loss(state))
    return result


def _soft_picks(result: FWSoftResult, t: int, pool: Pool, task_objectives: dict[str, Objective],
                state: dict[str, torch.Tensor], names: list[str], p: FWSoftParams) -> list[dict[str, torch.Tensor]]:
    """One pick per task (a whole member, or per tensor), each task skipping the members earlier tasks took."""
    picks: list[dict[str, torch.Tensor]] = []
    taken: dict[str, set[int]] = {n: set() for n in names}  # per tensor; for `task` every tensor holds the same
    for task, objective in task_objectives.items():
        _, grad = objective.loss_and_grad(state)
        chosen: dict[str, torch.Tensor] = {}
        if p.granularity == "task":
            totals: dict[int, float] = {}
            for name in names:
                for i, _, s in pool.scored(name, grad[name].to(torch.float32), state[name], p.oracle,
                                           frozenset(taken[name])):
                    totals[i] = totals.get(i, 0.0) + s
            best = min(totals, key=lambda i: (totals[i], i))
            for name in names:
                chosen[name] = pool.tensor(best, name)
                taken[name].add(best)
            _note(result, t, "*", pool, best, totals[best], 0.0)
        else:
            for name in names:
                best, best_s, best_c = -1, float("inf"), None
                for i, c, s in pool.scored(name, grad[name].to(torch.float32), state[name], p.oracle,
                                           frozenset(taken[name])):
                    if s < best_s:
                        best, best_s, best_c = i, s, c
                chosen[name] = best_c
                taken[name].add(best)
                _note(result, t, name, pool, best, best_s, 0.0)
        picks.append(chosen)
        if len(picks) >= len(pool):
            break
    return picks


def _record_steps(result: FWSoftResult, t: int, alpha: torch.Tensor, granularity: str) -> None:
    """Each of iteration t's selections gets the coefficient its pick merged in with (its mean for a whole model)."""
    first = next(i for i, s in enumerate(result.selections) if s.iteration == t)
    for offset, sel in enumerate(result.selections[first:]):
        k, j = (offset, None) if granularity == "task" else divmod(offset, alpha.shape[1])
        value = float(alpha[k].mean()) if j is None else float(alpha[k, j])
        result.selections[first + offset] = replace(sel, step=value)


def _note(result: FWResult, t: int, name: str, pool: Pool, member: int, score: float, step: float) -> None:
    target = pool.target(member)
    result.selections.append(Selection(t, name, member if target == "candidate" else None, score, step, target))


def _learn_coefficients(state: dict[str, torch.Tensor], directions: list[dict[str, torch.Tensor]], names: list[str],
                        objective: Objective, p: FWSoftParams, start: float, progress: Progress,
                        t: int) -> torch.Tensor:
    """Layer-wise AdaMerging relative to θ_t: α (picks × tensors) from `start`, Adam on the objective's gradient
    pulled back through θ' = θ_t + Σ_k α_k d_k (unclamped, as FusionBench)."""
    alpha = torch.full((len(directions), len(names)), start, dtype=torch.float32, requires_grad=True)
    optimiser = torch.optim.Adam([alpha], lr=p.adam_lr)
    for step in range(p.adam_steps):
        with torch.no_grad():
            merged = dict(state)
            for j, n in enumerate(names):
                merged[n] = state[n] + sum(alpha[k, j] * d[n] for k, d in enumerate(directions))
        _, grad = objective.loss_and_grad(merged)
        alpha.grad = torch.tensor([[_dot(grad[n], d[n]) for n in names] for d in directions], dtype=torch.float32)
        optimiser.step()
        if progress:
            progress(f"FW-Soft iteration {t + 1}/{p.iterations}: AdaMerging", step + 1, p.adam_steps)
    return alpha.detach()
