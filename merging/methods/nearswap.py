"""NearSwap: take the model's value where it is near the base's, keep the base's where they are far apart.

Per element, w = clamp(t / max(|θ_base − θ_model|, 1e-6), 0, 1) and
θ = w·θ_model + (1 − w)·θ_base: differences below `t` swap in the model's value.
"""

from __future__ import annotations

from typing import Iterator

import torch
from pydantic import Field

from merging.errors import RecipeError
from merging.checkpoints.inputs import TensorInputs
from merging.methods.registry import MethodParams, merge_method


class NearSwapParams(MethodParams):
    t: float = Field(ge=0.0, description="the difference under which the model's value is taken whole")


@merge_method("nearswap", params=NearSwapParams,
              paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001")
def nearswap(tensor: TensorInputs, params: NearSwapParams, state: None) -> Iterator[torch.Tensor]:
    """Each element moves to the model's value in proportion to how close the two already are."""
    if len(tensor.models) != 1:
        raise RecipeError(f"nearswap merges the base with exactly one model; the recipe has {len(tensor.models)}")
    for chunk in tensor.chunks():
        a, b = chunk.base, chunk.models[0]
        w = (params.t / (a - b).abs_().clamp_(min=1e-6)).clamp_(0, 1)
        yield w * b + (1 - w) * a
