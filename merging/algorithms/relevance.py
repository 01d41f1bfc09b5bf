"""How relevant each candidate is to a target, read tensor by tensor from memory-mapped files.

`gradient_alignment`: the cosine between −∇L(θ₀) and each candidate's task
vector τᵢ = θᵢ − θ₀, per tensor. A positive value means stepping towards the
candidate lowers the target loss there; this is FW-Merging's linear oracle
evaluated at θ₀, so these scores are also its first selection.

`task_vector_cosine`: a data-free score for suites without data, the cosine
between each candidate's task vector and a reference model's (e.g. a model
fine-tuned on the target) over the whole model.

Only one tensor of one candidate is resident at a time next to the gradient and
the reference tensor, so memory does not grow with the number of candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from merging.checkpoints.checkpoint import Checkpoint
from merging.errors import MergeyardError


@dataclass(frozen=True)
class AlignmentScores:
    """Per-candidate, per-tensor cosines; `summary` is their mean over tensors (in [-1, 1])."""

    names: tuple[str, ...]
    per_tensor: torch.Tensor  # candidates × tensors, float64

    @property
    def summary(self) -> list[float]:
        return self.per_tensor.mean(dim=1).tolist() if self.names else [0.0] * self.per_tensor.shape[0]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(torch.linalg.vector_norm(a, dtype=torch.float64)), float(torch.linalg.vector_norm(b, dtype=torch.float64))
    if na == 0.0 or nb == 0.0:
        return 0.0  # no gradient or no change here: no evidence either way
    return float(torch.dot(a.flatten().double(), b.flatten().double())) / (na * nb)


def _check_names(names: Sequence[str], ckpt: Checkpoint, what: str) -> None:
    missing = [n for n in names if n not in ckpt.entries]
    if missing:
        raise MergeyardError(f"{what} {ckpt.path} has no tensor {missing[0]!r} ({len(missing)} missing): "
                             "is it the architecture the suite scores?")


def gradient_alignment(gradient: Mapping[str, torch.Tensor], reference: Checkpoint,
                       candidates: Sequence[Checkpoint]) -> AlignmentScores:
    """cos(−g_t, θᵢ,t − θ₀,t) for every candidate i and every tensor t the gradient names."""
    names = tuple(sorted(n for n, g in gradient.items() if g.is_floating_point()))
    _check_names(names, reference, "reference")
    for c in candidates:
        _check_names(names, c, "candidate")
    table = torch.zeros(len(candidates), len(names), dtype=torch.float64)
    for j, name in enumerate(names):
        descent = -gradient[name].to(torch.float32)
        theta0 = reference.read(name).to(torch.float32)
        if theta0.shape != descent.shape:
            raise MergeyardError(f"tensor {name!r}: gradient shape {tuple(descent.shape)} != checkpoint {tuple(theta0.shape)}")
        for i, cand in enumerate(candidates):
            table[i, j] = _cosine(descent, cand.read(name).to(torch.float32) - theta0)
    return AlignmentScores(names, table)


def task_vector_cosine(base: Checkpoint, target: Checkpoint, candidates: Sequence[Checkpoint]) -> list[float]:
    """cos(τᵢ, τ_target) over all float tensors of the base, accumulated tensor by tensor."""
    names = [n for n, e in base.entries.items() if e.is_float]
    for c in [target, *candidates]:
        _check_names(names, c, "model")
    dots = torch.zeros(len(candidates), dtype=torch.float64)
    sq = torch.zeros(len(candidates), dtype=torch.float64)
    target_sq = 0.0
    for name in names:
        theta0 = base.read(name).to(torch.float32)
        ref = (target.read(name).to(torch.float32) - theta0).flatten().double()
        target_sq += float(ref @ ref)
        for i, cand in enumerate(candidates):
            tau = (cand.read(name).to(torch.float32) - theta0).flatten().double()
            dots[i] += float(tau @ ref)
            sq[i] += float(tau @ tau)
    denom = sq.sqrt() * target_sq**0.5
    return [float(d / n) if n > 0 else 0.0 for d, n in zip(dots, denom)]
