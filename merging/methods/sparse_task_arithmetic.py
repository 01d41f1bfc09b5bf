"""Model Breadcrumbs and DELLA: task arithmetic (or TIES's sign consensus) over sparsified task vectors.

Each model's task vector τ_i = θ_i − θ_base is sparsified per tensor, scaled
by the model's weight, and combined as mergekit's generalised task arithmetic
does: a plain sum (`breadcrumbs`, `della_linear`) or only the entries agreeing
with the sign of the weighted sum (`breadcrumbs_ties`, `della`); `normalize`
divides by the (agreeing) weights, `lambda` scales the result.

  * Breadcrumbs (Davari & Belilovsky, 2023): drop the `gamma` fraction of
    largest |τ| (outliers) and then the smallest, keeping `density` of them.
  * DELLA (Deep et al., 2024) MagPrune: along each row, keep entry j with
    probability p = density − ε + 2ε·rank_j/(n − 1), rank by |τ| (larger
    magnitudes kept more often); the mask is drawn from the merge's seed,
    per model and tensor, so a recipe rebuilds bit for bit.
With `rescale`, the kept entries are scaled so the task vector keeps its L1
norm (mergekit's rescaling). Ties in |τ| are ranked by flat index.
"""

from __future__ import annotations

from typing import Iterator

import torch
from pydantic import Field

from merging.errors import RecipeError
from merging.checkpoints.inputs import TensorInputs
from merging.algorithms.consensus import merge_agreeing
from merging.methods.registry import CONSENSUS_GRID, MethodParams, merge_method
from merging.algorithms.random_mask import stream_key, uniform


class _SparseParams(MethodParams):
    density: float = Field(1.0, ge=0.0, le=1.0, description="fraction of each task vector kept (per model too)")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")


class BreadcrumbsParams(_SparseParams):
    gamma: float = Field(0.01, ge=0.0, le=1.0, description="fraction of the largest |τ| dropped as outliers")
    normalize: bool = Field(False, description="divide by the sum of the (agreeing) weights")
    rescale: bool = Field(False, description="scale the kept entries to keep the task vector's L1 norm")

    per_model = ("density", "gamma")


class BreadcrumbsTiesParams(BreadcrumbsParams):
    pass


class DellaParams(_SparseParams):
    epsilon: float = Field(0.15, ge=0.0, lt=1.0, description="spread of the keep probability around density")
    normalize: bool = Field(True, description="divide by the sum of the agreeing weights")
    rescale: bool = Field(True, description="scale the kept entries to keep the task vector's L1 norm")

    per_model = ("density", "epsilon")


class DellaLinearParams(DellaParams):
    normalize: bool = Field(False, description="divide by the sum of the weights")


def l1_rescaled(tau: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    kept = tau * mask
    if not rescale:
        return kept
    before, after = float(tau.abs().sum()), float(kept.abs().sum())
    return kept if before < eps or after < eps else kept * (before / after)


def breadcrumbs_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep `density` of the entries, skipping the `gamma` largest |τ| first (fewer when density needs them)."""
    n = tau.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.sort(tau.abs(), stable=True).indices
    mask = torch.zeros_like(tau)
    mask[order[bottom:bottom + keep]] = 1
    return mask


def della_mask(tau: torch.Tensor, shape: tuple[int, ...], density: float, epsilon: float, key: int) -> torch.Tensor:
    """A Bernoulli mask whose keep probability rises linearly with each entry's |τ| rank in its row."""
    rows = tau.reshape(shape) if len(shape) >= 2 else tau.reshape(1, -1)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(tau.dtype)
    width = rows.shape[1]
    position = ranks / (width - 1) if width > 1 else torch.zeros_like(ranks)
    probability = (density - epsilon) + position * 2 * epsilon
    return (uniform(key, 0, tau.numel(), tau.device) < probability.reshape(-1)).to(tau.dtype)


def combine(base: torch.Tensor, taus: list[torch.Tensor], weights: list[float], consensus: bool, normalize: bool,
            lam: float) -> torch.Tensor:
    """mergekit's generalised task arithmetic over already sparsified task vectors."""
    deltas = [t * w for t, w in zip(taus, weights)]
    if consensus:  # TIES's sign election, mergekit's variant (a zero sum counts positive, agreeing weights divide)
        return merge_agreeing(base, deltas, weights, "mean" if normalize else "sum", lam)
    mixed = torch.zeros_like(base)
    for d in deltas:
        mixed += d
    total_weight = sum(weights)
    divisor = 1.0 if abs(total_weight) < 1e-8 else total_weight
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def _breadcrumbs(tensor: TensorInputs, params: BreadcrumbsParams, consensus: bool) -> Iterator[torch.Tensor]:
    whole = tensor.whole()
    taus = []
    for m, d, g in zip(whole.models, tensor.per_model(params, "density"), tensor.per_model(params, "gamma")):
        tau = m - whole.base
        taus.append(tau if d >= 1 else l1_rescaled(tau, breadcrumbs_mask(tau, d, g), params.rescale))
    yield combine(whole.base, taus, tensor.weights, consensus, params.normalize, params.lambda_)


def _della(tensor: TensorInputs, params: DellaParams, consensus: bool) -> Iterator[torch.Tensor]:
    whole = tensor.whole()
    taus = []
    for i, (m, d, e) in enumerate(zip(whole.models, tensor.per_model(params, "density"),
                                      tensor.per_model(params, "epsilon"))):
        tau = m - whole.base
        if d <= 0:
            tau = torch.zeros_like(tau)
        elif d < 1:
            if not (0 < d - e and d + e < 1):
                raise RecipeError(f"della: model {i + 1}: density ± epsilon ({d} ± {e}) must lie inside (0, 1)")
            mask = della_mask(tau, tensor.shape, d, e, stream_key(tensor.seed, "della", i, tensor.name))
            tau = l1_rescaled(tau, mask, params.rescale)
        taus.append(tau)
    yield combine(whole.base, taus, tensor.weights, consensus, params.normalize, params.lambda_)


@merge_method("breadcrumbs", params=BreadcrumbsParams, paper="https://arxiv.org/abs/2312.06795",
              scale_param="lambda", scale_grid=CONSENSUS_GRID)
def breadcrumbs(tensor: TensorInputs, params: BreadcrumbsParams, state: None) -> Iterator[torch.Tensor]:
    """Task arithmetic over task vectors without their outliers and their smallest entries."""
    return _breadcrumbs(tensor, params, consensus=False)


@merge_method("breadcrumbs_ties", params=BreadcrumbsTiesParams, paper="https://arxiv.org/abs/2312.06795",
              scale_param="lambda", scale_grid=CONSENSUS_GRID)
def breadcrumbs_ties(tensor: TensorInputs, params: BreadcrumbsTiesParams, state: None) -> Iterator[torch.Tensor]:
    """Breadcrumbs' sparsification, then TIES's sign consensus."""
    return _breadcrumbs(tensor, params, consensus=True)


@merge_method("della", params=DellaParams, paper="https://arxiv.org/abs/2406.11617", scale_param="lambda",
              scale_grid=CONSENSUS_GRID)
def della(tensor: TensorInputs, params: DellaParams, state: None) -> Iterator[torch.Tensor]:
    """Magnitude-ranked random pruning (MagPrune), L1 rescaling, TIES's sign consensus."""
    return _della(tensor, params, consensus=True)


@merge_method("della_linear", params=DellaLinearParams, paper="https://arxiv.org/abs/2406.11617",
              scale_param="lambda", scale_grid=CONSENSUS_GRID)
def della_linear(tensor: TensorInputs, params: DellaLinearParams, state: None) -> Iterator[torch.Tensor]:
    """MagPrune and L1 rescaling, then a weighted sum of the task vectors."""
    return _della(tensor, params, consensus=False)
