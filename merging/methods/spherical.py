"""Interpolation on the sphere: slerp, nuslerp and multislerp, as mergekit 0.1.5 defines them.

  * `slerp` (base + one model, `t`): spherical interpolation of each row (the
    leading axis; a 1-D tensor's rows are its elements) from the base (t = 0)
    to the model (t = 1); rows closer than `dot_threshold` are interpolated
    linearly. Rows are whole in every chunk, so it streams.
  * `nuslerp` (two models, their `weight`s): t = w₂ / (w₁ + w₂); with a base,
    the task vectors are interpolated and added to it; by default over the
    flattened tensor, else along rows (`nuslerp_row_wise`: along columns).
  * `multislerp` (any number, `weight`s): the weighted mean on the unit
    sphere by one tangent-space step, rescaled by the weighted mean norm.
"""

from __future__ import annotations

from typing import Iterator

import torch
from pydantic import Field

from merging.errors import RecipeError
from merging.checkpoints.inputs import TensorInputs
from merging.methods.registry import MethodParams, merge_method


class SlerpParams(MethodParams):
    t: float = Field(description="0 is the base, 1 the model; a gradient over layers, as mergekit's `t: [0, 0.5, 1]`")
    dot_threshold: float = Field(0.9995, gt=0.0, le=1.0, description="|cos| above which rows are lerped")


def _one_model(tensor: TensorInputs, method: str) -> None:
    if len(tensor.models) != 1:
        raise RecipeError(f"{method} merges the base with exactly one model; the recipe has {len(tensor.models)}")


def slerp_rows(t: float, a: torch.Tensor, b: torch.Tensor, threshold: float, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise slerp of two (rows × width) matrices."""
    na = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    nb = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    na = torch.where(na > eps, na, 1.0)
    nb = torch.where(nb > eps, nb, 1.0)
    dot = ((a / na) * (b / nb)).sum(dim=1, keepdim=True).clamp(-1, 1)
    linear = dot.abs() > threshold
    theta = torch.acos(torch.where(linear, 0.0, dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    cb = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return ca * a + cb * b


@merge_method("slerp", params=SlerpParams, paper="https://en.wikipedia.org/wiki/Slerp")
def slerp(tensor: TensorInputs, params: SlerpParams, state: None) -> Iterator[torch.Tensor]:
    """Spherical interpolation of each row from the base (t = 0) to the one model (t = 1)."""
    _one_model(tensor, "slerp")
    rows_of = tensor.shape[0] if tensor.shape else 1
    width = tensor.numel // rows_of if rows_of else 0
    for chunk in tensor.chunks():
        a, b = chunk.base, chunk.models[0]
        if width == 0:
            yield a
            continue
        yield slerp_rows(params.t, a.reshape(-1, width), b.reshape(-1, width), params.dot_threshold).reshape(-1)


class NuSlerpParams(MethodParams):
    nuslerp_flatten: bool = Field(True, description="interpolate the flattened tensor as one vector")
    nuslerp_row_wise: bool = Field(False, description="without flatten: along columns instead of rows")


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Slerp along the last axis, linear where the two are colinear."""
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, out)


@merge_method("nuslerp", params=NuSlerpParams, paper="https://github.com/arcee-ai/mergekit#nuslerp",
              requires_base=False)
def nuslerp(tensor: TensorInputs, params: NuSlerpParams, state: None) -> Iterator[torch.Tensor]:
    """Slerp of two models (of their task vectors when a base is given) at t = w₂ / (w₁ + w₂)."""
    if len(tensor.models) != 2:
        raise RecipeError(f"nuslerp interpolates exactly two models; the recipe has {len(tensor.models)}")
    total = sum(tensor.weights)
    t = 0.5 if abs(total) < 1e-6 else tensor.weights[1] / total
    whole = tensor.whole()
    shape = tensor.shape or (1,)
    v0, v1 = (m.reshape(shape) for m in whole.models)
    base = whole.base.reshape(shape) if whole.base is not None else None
    if base is not None:
        v0, v1 = v0 - base, v1 - base
    if params.nuslerp_flatten:
        out = nuslerp_vectors(t, v0.reshape(-1), v1.reshape(-1))
    elif params.nuslerp_row_wise:
        out = nuslerp_vectors(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        out = nuslerp_vectors(t, v0, v1)
    out = out.reshape(-1)
    yield out + whole.base if base is not None else out


class MultiSlerpParams(MethodParams):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0.0, description="guards the norms")


@merge_method("multislerp", params=MultiSlerpParams, paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
              requires_base=False)
def multislerp(tensor: TensorInputs, params: MultiSlerpParams, state: None) -> Iterator[torch.Tensor]:
    """Weighted mean of the models (their task vectors, with a base) on the sphere, by one tangent step."""
    whole = tensor.whole()
    if len(whole.models) == 1:
        yield whole.models[0]
        return
    points = torch.stack(whole.models)
    if whole.base is not None:
        points = points - whole.base
    w = torch.tensor(tensor.weights, dtype=points.dtype, device=points.device)
    if params.normalize_weights:
        w = w / w.sum()
    norms = torch.norm(points, dim=-1, keepdim=True)
    units = points / (norms + params.eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < params.eps:
        if len(whole.models) != 2:
            raise RecipeError(f"multislerp: tensor {tensor.name!r}: the weighted directions cancel out (antipodal "
                              "inputs with balancing weights); use other weights")
        out = points[0] * w[0] + points[1] * w[1]
    else:
        mean = mean / mean_norm
        tangent = units - (units * mean).sum(-1, keepdim=True) * mean
        step = (tangent * w.view(-1, 1)).sum(0)
        step_norm = torch.norm(step) + params.eps
        out = (mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)) * (norms.squeeze(-1) * w).sum()
    yield out + whole.base if whole.base is not None else out
