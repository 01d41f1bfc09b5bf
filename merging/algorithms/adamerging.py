"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by minimising the entropy of the merged
model's predictions on unlabelled data.

    θ(λ) = θ_base + Σ_k λ_{k,l} τ_{k,l}         l = the tensor's layer (`layer`), or one λ_k for all (`task`)

The loss comes from an objective (merging.objective; the flows build prediction entropy on the suite's
unlabelled inputs). Its gradient in λ is the chain rule through θ: ∂L/∂λ_{k,l} = Σ_{n ∈ l} ⟨∂L/∂θ_n, τ_{k,n}⟩,
so one backward pass of the model gives every coefficient's gradient. λ starts at `init` (the paper's 0.3),
Adam steps it, and it stays in [0, 1] as in the paper's code. `on: ties` is AdaMerging++: the task vectors are
first trimmed to their `density` largest magnitudes per tensor and kept where they agree with the elected
sign, as TIES does. Task vectors are held in memory (AdaMerging evaluates the merge at every step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from merging.checkpoints.checkpoint import Checkpoint
from merging.errors import RecipeError
from merging.algorithms.consensus import elect_sign_weighted

Progress = Callable[[str, int, int], None] | None


class AdaMergingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    granularity: Literal["task", "layer"] = Field("layer", description="one coefficient per task, or per task and tensor")
    on: Literal["task_arithmetic", "ties"] = Field("task_arithmetic", description="plain task vectors, or TIES's "
                                                   "trimmed and sign-elected ones (AdaMerging++)")
    density: float = Field(0.2, gt=0, le=1, description="with on: ties, the fraction of each task vector kept")
    init: float = Field(0.3, ge=0, le=1, description="every coefficient's starting value (the paper's 0.3)")
    steps: int = Field(100, ge=0, description="Adam steps")
    lr: float = Field(1e-2, gt=0, description="Adam's learning rate")
    coefficients: list[list[float]] | None = Field(
        None, description="learned coefficients (tasks × layers): given, nothing is learned (what reproduce uses)")


@dataclass
class AdaMergingResult:
    state: dict[str, torch.Tensor]
    coefficients: list[list[float]]
    losses: list[float] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)


def task_vectors(base: Checkpoint, models: Sequence[Checkpoint], names: list[str], on: str,
                 density: float) -> list[dict[str, torch.Tensor]]:
    taus = [{n: m.read(n).to(torch.float32) - base.read(n).to(torch.float32) for n in names} for m in models]
    if on == "task_arithmetic":
        return taus
    for n in names:  # TIES per tensor: keep each τ's top-k magnitudes, then only where it agrees with the sign
        trimmed = []
        for tau in taus:
            t = tau[n].flatten()
            k = max(1, int(density * t.numel()))
            keep = torch.zeros_like(t, dtype=torch.bool)
            keep[t.abs().topk(min(k, t.numel())).indices] = True
            trimmed.append(torch.where(keep, t, 0.0))
        elected = elect_sign_weighted(trimmed)
        for tau, t in zip(taus, trimmed):
            tau[n] = torch.where(t * elected > 0, t, 0.0).view_as(tau[n])
    return taus


def layer_of(name: str) -> str:
    """A tensor's layer for layer-wise coefficients: each tensor is its own (AdaMerging's per-parameter λ)."""
    return name


def merged(base: dict[str, torch.Tensor], taus: list[dict[str, torch.Tensor]], lam: torch.Tensor,
           column: dict[str, int]) -> dict[str, torch.Tensor]:
    out = dict(base)
    for n, j in column.items():
        value = base[n].clone()
        for k, tau in enumerate(taus):
            value = value + lam[k, j] * tau[n]
        out[n] = value
    return out


def coefficient_gradient(grad: dict[str, torch.Tensor], taus: list[dict[str, torch.Tensor]], column: dict[str, int],
                         shape: tuple[int, int]) -> torch.Tensor:
    """∂L/∂λ_{k,j} = Σ over the tensors n of column j of ⟨∂L/∂θ_n, τ_{k,n}⟩."""
    out = torch.zeros(shape, dtype=torch.float64)
    for n, j in column.items():
        if n not in grad:
            continue
        g = grad[n].flatten().double()
        for k, tau in enumerate(taus):
            out[k, j] += torch.dot(g, tau[n].flatten().double())
    return out


def adamerging(base: Checkpoint, models: Sequence[Checkpoint], objective, params: AdaMergingParams,
               names: list[str], progress: Progress = None) -> AdaMergingResult:
    """Learn (or, with `coefficients`, apply) the coefficients and return the merge."""
    taus = task_vectors(base, models, names, params.on, params.density)
    layers = [layer_of(n) for n in names] if params.granularity == "layer" else ["all"]
    column = {n: (layers.index(layer_of(n)) if params.granularity == "layer" else 0) for n in names}
    base_state = {n: base.read(n) if not base.entries[n].is_float else base.read(n).to(torch.float32)
                  for n in base.names}
    shape = (len(models), len(layers))
    losses: list[float] = []
    if params.coefficients is not None:
        lam = torch.tensor(params.coefficients, dtype=torch.float64)
        if tuple(lam.shape) != shape:
            raise RecipeError(f"adamerging: coefficients are {list(lam.shape)}, this merge needs {list(shape)} "
                              f"({len(models)} models × {len(layers)} {'tensors' if len(layers) > 1 else 'coefficient'})")
    else:
        lam = torch.full(shape, params.init, dtype=torch.float64)
        moment, second = torch.zeros_like(lam), torch.zeros_like(lam)
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for step in range(1, params.steps + 1):
            loss, grad = objective.loss_and_grad(merged(base_state, taus, lam.float(), column))
            losses.append(loss)
            g = coefficient_gradient(grad, taus, column, shape)
            moment = beta1 * moment + (1 - beta1) * g
            second = beta2 * second + (1 - beta2) * g * g
            update = (moment / (1 - beta1 ** step)) / ((second / (1 - beta2 ** step)).sqrt() + eps)
            lam = (lam - params.lr * update).clamp(0.0, 1.0)
            if progress:
                progress("AdaMerging: learning coefficients", step, params.steps)
        # recorded to float32 precision: what the record holds is exactly what is applied, now and on reproduce
        lam = lam.float().double()
        losses.append(objective.loss(merged(base_state, taus, lam.float(), column)))
    state = merged(base_state, taus, lam.float(), column)
    return AdaMergingResult({n: state[n] for n in names}, lam.tolist(), losses, layers)
