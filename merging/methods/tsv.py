"""`tsv`: Task Singular Vectors merging, TSV-M (Gargiulo et al., CVPR 2025).

Each task matrix τ_i of a weight is cut to its top k = r/T singular triplets (r = min(m, n), T tasks: together
they fill the layer's rank), the stacked left and right singular vectors are decorrelated (replaced by the nearest
orthonormal matrices, which removes the interference between tasks' subspaces), and the singular values are kept:

    Δ = U⊥ · diag(σ_1 … σ_T) · V⊥ᵀ,   θ = θ_base + α · Δ

Tensors that are not linear maps (biases, norms, embedding tables) take the mean task vector, as the authors' code
(FusionBench's `TaskSingularVectorMerging`) does. A model's `weight` scales its task vector first.
"""

from __future__ import annotations

from typing import Iterator

import torch
from pydantic import Field

from merging.checkpoints.inputs import TensorInputs
from merging.methods.registry import MethodParams, merge_method
from merging.algorithms.spectral import decomposes, mean_task_vector, task_singular_vectors, weighted_tasks


class TsvParams(MethodParams):
    alpha: float = Field(1.0, description="scale of the merged task vector (the paper's α; 1.0 in its code)")
    rank_fraction: float | None = Field(None, gt=0, le=1, description="each task's share of a layer's rank "
                                        "(default 1/T: the tasks together fill it)")


def tsv_rank(shape: tuple[int, ...], tasks: int, fraction: float | None) -> int:
    """Singular triplets kept per task: int(r · fraction), at least one."""
    return max(1, int(min(shape) * (fraction if fraction is not None else 1.0 / tasks)))


@merge_method("tsv", params=TsvParams, paper="https://arxiv.org/abs/2412.00081", example={},
              scale_param="alpha", scale_grid=(0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 2.0))
def tsv(tensor: TensorInputs, params: TsvParams, state: None) -> Iterator[torch.Tensor]:
    """TSV-M: each task's top singular vectors of every weight matrix, decorrelated, singular values kept."""
    if not decomposes(tensor.name, tensor.shape):
        for base, mean in mean_task_vector(tensor):
            yield base + params.alpha * mean
        return
    count = len(tensor.models)
    delta = task_singular_vectors(weighted_tasks(tensor), count, tsv_rank(tensor.shape, count, params.rank_fraction))
    yield (tensor.base_whole() + params.alpha * delta).reshape(-1)
