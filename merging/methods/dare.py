"""DARE: drop and rescale task vectors (Yu et al., ICML 2024), linear or with TIES signs.

Each entry of each task vector is dropped with probability `drop_rate` and the
survivors are scaled by 1/(1 − drop_rate), which keeps the task vector's
expectation. The masks come from `merging.algorithms.random_mask`, keyed by (seed, model
position in the recipe, tensor name), so a recipe rebuilds bit for bit.
`dare_linear` then adds the weighted task vectors; `dare_ties` elects signs as
mergekit's `dare_ties` does (weighted sum, zero counts positive).
"""

from __future__ import annotations

from typing import Iterator, Literal

import torch
from pydantic import Field

from merging.checkpoints.inputs import TensorInputs
from merging.algorithms.consensus import merge_agreeing
from merging.methods.registry import CONSENSUS_GRID, LAMBDA_GRID, MethodParams, merge_method
from merging.algorithms.random_mask import stream_key, uniform


class DareParams(MethodParams):
    drop_rate: float = Field(0.9, ge=0.0, lt=1.0, description="probability of dropping each task-vector entry")
    rescale: bool = Field(True, description="scale survivors by 1/(1 − drop_rate)")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")

    per_model = ("drop_rate",)


class DareTiesParams(DareParams):
    aggregate: Literal["mean", "sum"] = Field("sum", description="how agreeing entries combine")


def dare_task_vectors(tensor: TensorInputs, chunk, params: DareParams) -> list[torch.Tensor]:
    """w_i · DARE(τ_i) for one chunk."""
    out = []
    for i, (m, w, p) in enumerate(zip(chunk.models, tensor.weights, tensor.per_model(params, "drop_rate"))):
        scale = 1.0 / (1.0 - p) if params.rescale else 1.0
        tau = m - chunk.base
        if p > 0:
            u = uniform(stream_key(tensor.seed, i, tensor.name), chunk.offset, tau.numel(), tau.device)
            tau.mul_(u >= p)
        out.append(tau.mul_(w * scale))
    return out


@merge_method("dare_linear", params=DareParams, paper="https://arxiv.org/abs/2311.03099", propagates_non_finite=True,
              example={"drop_rate": 0.5, "lambda": 0.3}, scale_param="lambda", scale_grid=LAMBDA_GRID)
def dare_linear(tensor: TensorInputs, params: DareParams, state: None) -> Iterator[torch.Tensor]:
    """θ = θ_base + λ·Σ w_i DARE(τ_i)."""
    for chunk in tensor.chunks():
        merged = torch.zeros_like(chunk.base)
        for wt in dare_task_vectors(tensor, chunk, params):
            merged += wt
        yield chunk.base + params.lambda_ * merged


@merge_method("dare_ties", params=DareTiesParams, paper="https://arxiv.org/abs/2311.03099",
              example={"drop_rate": 0.5, "lambda": 0.5}, scale_param="lambda", scale_grid=CONSENSUS_GRID)
def dare_ties(tensor: TensorInputs, params: DareTiesParams, state: None) -> Iterator[torch.Tensor]:
    """DARE's random drop, then TIES's sign election and disjoint merge."""
    for chunk in tensor.chunks():
        weighted = dare_task_vectors(tensor, chunk, params)
        yield merge_agreeing(chunk.base, weighted, tensor.weights, params.aggregate, params.lambda_)
