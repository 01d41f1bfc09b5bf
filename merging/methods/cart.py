"""`cart`: centred task arithmetic with low-rank task vectors (Choi et al., "Revisiting Weight Averaging for
Model Merging", 2024).

Weight averaging is task arithmetic around the average θ̄ = θ_base + (1/T) Σ w_i τ_i: the centred task vectors
c_i = w_i τ_i − (1/T) Σ w_j τ_j sum to zero. CART keeps each centred task matrix's top `rank_ratio` of its rank
(most task knowledge lies there, most interference does not) and adds them back to the average:

    θ = θ̄ + λ · Σ_i LowRank_k(c_i),   k = max(1, int(rank_ratio · min(m, n)))

Tensors that are not linear maps keep the average (their centred vectors, summed, are zero), as the authors' code
does for everything outside the attention and MLP weights. The paper's 8-task ViT-B/32 setting is λ 2.0 with rank
ratio 0.12 (1.5 / 0.16 for 14 tasks, 1.9 / 0.32 for 20).
"""

from __future__ import annotations

from typing import Iterator

import torch
from pydantic import Field

from merging.checkpoints.inputs import TensorInputs
from merging.methods.registry import MethodParams, merge_method
from merging.algorithms.spectral import decomposes, low_rank, mean_task_vector, summed, weighted_tasks


class CartParams(MethodParams):
    lambda_: float = Field(2.0, alias="lambda", description="scale of the summed low-rank centred task vectors "
                           "(the paper's prior: 2.0 for 8 tasks)")
    rank_ratio: float = Field(0.12, gt=0, le=1, description="fraction of a layer's rank each centred task keeps")


@merge_method("cart", params=CartParams, paper="https://arxiv.org/abs/2412.12153", example={},
              scale_param="lambda", scale_grid=(0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0))
def cart(tensor: TensorInputs, params: CartParams, state: None) -> Iterator[torch.Tensor]:
    """CART: the average plus λ times each centred task vector's low-rank part."""
    if not decomposes(tensor.name, tensor.shape):
        for base, mean in mean_task_vector(tensor):
            yield base + mean
        return
    task, count = weighted_tasks(tensor), len(tensor.models)
    centre = summed(task, count) / count
    rank = max(1, int(params.rank_ratio * min(tensor.shape)))
    total = torch.zeros_like(centre)
    for i in range(count):
        total += low_rank(task(i) - centre, rank)
    yield (tensor.base_whole() + centre + params.lambda_ * total).reshape(-1)
