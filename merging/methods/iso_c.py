"""`iso_c`: isotropic merging in the common subspace (Marczak et al., "No Task Left Behind", ICML 2025).

The task matrices' sum Δ = Σ w_i τ_i of a weight is kept with its singular vectors and its spectrum flattened:
every singular value becomes their mean, so no direction (no task) dominates the merged layer:

    Δ = U Σ Vᵀ  →  σ̄ · U Vᵀ,   θ = θ_base + α · σ̄ U Vᵀ

Tensors that are not linear maps take the mean task vector, as the authors' code does.
"""

from __future__ import annotations

from typing import Iterator

import torch
from pydantic import Field

from merging.checkpoints.inputs import TensorInputs
from merging.methods.registry import MethodParams, merge_method
from merging.algorithms.spectral import decomposes, isotropic, mean_task_vector, summed, weighted_tasks

PAPER = "https://arxiv.org/abs/2502.04959"
ALPHA_GRID = (0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)


class IsoCParams(MethodParams):
    alpha: float = Field(1.0, description="scale of the flattened sum (the paper's α, chosen on validation data)")


@merge_method("iso_c", params=IsoCParams, paper=PAPER, example={}, scale_param="alpha", scale_grid=ALPHA_GRID)
def iso_c(tensor: TensorInputs, params: IsoCParams, state: None) -> Iterator[torch.Tensor]:
    """Iso-C: the summed task matrix with every singular value set to their mean."""
    if not decomposes(tensor.name, tensor.shape):
        for base, mean in mean_task_vector(tensor):
            yield base + params.alpha * mean
        return
    total = summed(weighted_tasks(tensor), len(tensor.models))
    yield (tensor.base_whole() + params.alpha * isotropic(total)).reshape(-1)
