"""SCE (FuseLLM/FuseChat, Wan et al. 2024): select, calculate, erase.

Select: keep the `select_topk` fraction of elements (of those that vary at
all) with the highest variance across the task vectors. Calculate: each
model's coefficient is its task vector's mean square over the tensor,
normalised to sum to one. Erase: drop the entries whose sign disagrees with
the sign of their sum. θ = θ_base + Σ c_i m_i τ_i / Σ c_i m_i.
Ties in variance at the cut are broken by flat index.
"""

from __future__ import annotations

from typing import Iterator

import torch
from pydantic import Field

from merging.checkpoints.inputs import TensorInputs
from merging.methods.registry import MethodParams, merge_method


class SceParams(MethodParams):
    select_topk: float = Field(1.0, ge=0.0, le=1.0, description="fraction of the varying elements kept")


def sce_select(taus: torch.Tensor, fraction: float) -> torch.Tensor:
    """0/1 mask of the elements with the top variance across models."""
    if fraction >= 1:
        return torch.ones_like(taus[0])
    var = torch.var(taus, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * fraction)
    mask = torch.zeros_like(var)
    if k > 0:
        order = torch.sort(var, descending=True, stable=True).indices
        mask[order[:k]] = 1
    return mask


@merge_method("sce", params=SceParams, paper="https://arxiv.org/abs/2408.07990")
def sce(tensor: TensorInputs, params: SceParams, state: None) -> Iterator[torch.Tensor]:
    """Top-variance selection, mean-square coefficients, sign-disagreement erasure."""
    whole = tensor.whole()
    taus = torch.stack([m - whole.base for m in whole.models])
    taus = taus * sce_select(taus, params.select_topk)
    majority = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    erase = (taus.sign() == majority).to(taus.dtype)
    coeff = taus.square().mean(dim=1)
    total = float(coeff.sum())
    coeff = torch.full_like(coeff, 1.0 / len(coeff)) if abs(total) < 1e-6 else coeff / total
    kept = coeff.unsqueeze(-1) * erase
    yield whole.base + (taus * kept).sum(0) / kept.sum(0).clamp(min=1e-6)
