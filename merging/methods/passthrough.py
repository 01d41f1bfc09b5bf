"""Passthrough: one model's tensors as they are (optionally scaled), or a model stacked from layer slices.

With `slices:` in the recipe the one input is the stacked model of
`merging.recipes.slices` (a frankenmerge that changes the layer count); `scale`
(a value, a gradient over the output's layers, or filters) multiplies tensors,
as mergekit's per-input `scale` does.
"""

from __future__ import annotations

from typing import Iterator

import torch
from pydantic import Field

from merging.checkpoints.inputs import TensorInputs
from merging.methods.registry import MethodParams, merge_method


class PassthroughParams(MethodParams):
    scale: float | None = Field(None, description="multiply the tensors by this (none: copy the bytes' values)")


@merge_method("passthrough", params=PassthroughParams, paper="https://github.com/arcee-ai/mergekit#passthrough",
              requires_base=False, stacks_slices=True, propagates_non_finite=True)
def passthrough(tensor: TensorInputs, params: PassthroughParams, state: None) -> Iterator[torch.Tensor]:
    """The one model's tensors (or the stacked slices'), scaled if asked."""
    for chunk in tensor.chunks():
        yield chunk.models[0] if params.scale is None else chunk.models[0] * params.scale
