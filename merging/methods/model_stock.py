"""Model Stock (Jang et al., ECCV 2024): interpolate the models' average towards the base by their agreement.

With N fine-tunes and the mean cosine c of their pairwise task-vector angles
(per tensor, or along the last axis with `filter_wise`), t = N·c / (1 + (N − 1)·c) and
θ = t·mean(θ_i) + (1 − t)·θ_base; where 1 + (N − 1)·c is ~0 the base is kept.
"""

from __future__ import annotations

from typing import Iterator

import torch
from pydantic import Field

from merging.errors import RecipeError
from merging.checkpoints.inputs import TensorInputs
from merging.methods.registry import MethodParams, merge_method


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(False, description="one ratio per row (filter) instead of per tensor")


@merge_method("model_stock", params=ModelStockParams, paper="https://arxiv.org/abs/2403.19522")
def model_stock(tensor: TensorInputs, params: ModelStockParams, state: None) -> Iterator[torch.Tensor]:
    """The models' average pulled towards the base by how much their task vectors agree."""
    if len(tensor.models) < 2:
        raise RecipeError("model_stock needs at least two fine-tuned models besides the base")
    whole = tensor.whole()
    if params.filter_wise and len(tensor.shape) > 1:
        shape = tensor.shape  # per row of the last axis, as mergekit
    elif params.filter_wise:
        shape = (1, -1)
    else:
        shape = (-1,)
    base = whole.base.reshape(shape)
    models = [m.reshape(shape) for m in whole.models]
    offsets = [m - base for m in models]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(models)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    yield (t * (sum(models) / n) + (1 - t) * base).reshape(-1)
