"""Karcher mean: the weighted Fréchet mean of the models on the unit sphere, rescaled by their mean norm.

Each tensor's inputs are normalised to unit vectors; the mean starts at their
normalised Euclidean mean and takes Riemannian gradient steps (log map,
weighted sum, exp map) until the step is below `tol` or `max_iter` is
reached. The base, when the recipe names one, is one more point of the mean,
as in mergekit (where it is one of the inputs).
"""

from __future__ import annotations

from typing import Iterator

import torch
from pydantic import Field

from merging.checkpoints.inputs import TensorInputs
from merging.methods.registry import MethodParams, merge_method


class KarcherParams(MethodParams):
    max_iter: int = Field(10, ge=1, description="gradient steps at most")
    tol: float = Field(1e-5, gt=0.0, description="a step (or angle, or norm) below this ends the iteration")


def karcher_mean(points: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    if len(points) == 1:
        return points[0]
    norms = [torch.linalg.vector_norm(p) for p in points]
    units = [torch.zeros_like(p) if float(n) == 0.0 else p / n for p, n in zip(points, norms)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(points[0])
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    u = [units[i] for i in valid]
    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        mean += ai * ui
    mean_norm = torch.linalg.vector_norm(mean)
    mean = u[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            dot = torch.clamp(torch.dot(mean, ui), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (ui - dot * mean)
        step = torch.linalg.vector_norm(tangent)
        if float(step) < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        norm = torch.linalg.vector_norm(mean)
        if float(norm) > tol:
            mean = mean / norm
    return sum(ai * n for ai, n in zip(alphas, norms)) * mean


@merge_method("karcher", params=KarcherParams, paper="https://arxiv.org/abs/2603.04972", requires_base=False)
def karcher(tensor: TensorInputs, params: KarcherParams, state: None) -> Iterator[torch.Tensor]:
    """Equal-weight Karcher (Riemannian) mean of the models, and of the base if one is given."""
    whole = tensor.whole()
    points = whole.models + ([whole.base] if whole.base is not None else [])
    yield karcher_mean(points, [1.0 / len(points)] * len(points), params.max_iter, params.tol)
