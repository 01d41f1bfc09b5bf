"""Weighted averaging and task arithmetic: the two linear merges."""

from __future__ import annotations

from typing import Iterator

import torch
from pydantic import Field

from merging.errors import RecipeError
from merging.checkpoints.inputs import TensorInputs
from merging.methods.registry import LAMBDA_GRID, MethodParams, merge_method


class AverageParams(MethodParams):
    normalize: bool = Field(True, description="divide by the sum of weights (a weighted mean)")


@merge_method("average", params=AverageParams, paper="https://arxiv.org/abs/2203.05482", requires_base=False,
              propagates_non_finite=True, example={})
def average(tensor: TensorInputs, params: AverageParams, state: None) -> Iterator[torch.Tensor]:
    """Weighted mean of the models' weights (model soups); the base is not part of it."""
    total = sum(tensor.weights)
    if params.normalize and abs(total) < 1e-12:
        raise RecipeError("average: model weights sum to zero; give weights with a non-zero sum or set normalize: false")
    scale = 1.0 / total if params.normalize else 1.0
    for chunk in tensor.chunks():
        out = torch.zeros_like(chunk.models[0])
        for w, m in zip(tensor.weights, chunk.models):
            out.add_(m, alpha=w * scale)
        yield out


class TaskArithmeticParams(MethodParams):
    lambda_: float = Field(1.0, alias="lambda", description="scale of the summed task vectors (0.3 is TA8's usual)")


@merge_method("task_arithmetic", params=TaskArithmeticParams, paper="https://arxiv.org/abs/2212.04089",
              propagates_non_finite=True, example={"lambda": 0.3}, scale_param="lambda", scale_grid=LAMBDA_GRID)
def task_arithmetic(tensor: TensorInputs, params: TaskArithmeticParams, state: None) -> Iterator[torch.Tensor]:
    """θ = θ_base + λ·Σ w_i (θ_i − θ_base)."""
    lam = params.lambda_
    base_coeff = 1.0 - lam * sum(tensor.weights)
    for chunk in tensor.chunks():
        # Expanded as (1 − λΣw)·θ_base + λΣ w_i θ_i: one pass per model, no task-vector temporaries.
        out = chunk.base * base_coeff
        for w, m in zip(tensor.weights, chunk.models):
            out.add_(m, alpha=lam * w)
        yield out
