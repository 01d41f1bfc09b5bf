"""`iso_cts`: isotropic merging in common and task-specific subspaces (Marczak et al., ICML 2025).

Iso-C flattens the sum's spectrum, so tasks whose directions the sum barely holds stay underrepresented. Iso-CTS
keeps the sum's top `common_fraction` of a layer's rank r (the common subspace), gives the rest to the tasks
equally (each task's top directions after projecting the common subspace out of τ_i), orthogonalises the lot and
flattens its spectrum:

    U = [U_1 … U_T, U_common] ⊥,  V likewise,   θ = θ_base + α · σ̄ · U Vᵀ

Tensors that are not linear maps take the mean task vector, as the authors' code does.
"""

from __future__ import annotations

from typing import Iterator

import torch
from pydantic import Field

from merging.checkpoints.inputs import TensorInputs
from merging.methods.iso_c import ALPHA_GRID, PAPER
from merging.methods.registry import MethodParams, merge_method
from merging.algorithms.spectral import decomposes, isotropic_common_and_task, mean_task_vector, summed, weighted_tasks


class IsoCtsParams(MethodParams):
    alpha: float = Field(1.0, description="scale of the merged task matrix (the paper's α)")
    common_fraction: float = Field(0.8, ge=0, le=1, description="share of a layer's rank kept for the common "
                                   "subspace (the paper's 0.8); the rest is split between the tasks")


@merge_method("iso_cts", params=IsoCtsParams, paper=PAPER, example={}, scale_param="alpha", scale_grid=ALPHA_GRID)
def iso_cts(tensor: TensorInputs, params: IsoCtsParams, state: None) -> Iterator[torch.Tensor]:
    """Iso-CTS: the sum's common subspace plus each task's own directions, orthogonalised, spectrum flattened."""
    if not decomposes(tensor.name, tensor.shape):
        for base, mean in mean_task_vector(tensor):
            yield base + params.alpha * mean
        return
    task, count = weighted_tasks(tensor), len(tensor.models)
    merged = isotropic_common_and_task(summed(task, count), task, count, params.common_fraction)
    yield (tensor.base_whole() + params.alpha * merged).reshape(-1)
