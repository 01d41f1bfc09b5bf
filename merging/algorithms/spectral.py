"""The linear algebra of the SVD merge methods (TSV-M, Iso-C, Iso-CTS, CART), one weight matrix at a time.

Every function takes the task matrices through `task(i)` (τ_i of one 2-D weight, float32) and reads them one at a
time, so a method holds factors of rank ≤ min(m, n) per task, not the N inputs. Which tensors are decomposed is
`decomposes`: 2-D weights that are linear maps; 1-D tensors (biases, norms) and embedding tables follow each
method's rule for the rest (an average of the task vectors, or nothing beyond the centre).

Two choices where the papers' code is silent:
  * An "orthogonalised" stack of singular vectors (TSV-M, Iso-CTS) is the nearest matrix with orthonormal
    columns (rows), the polar factor P·Qᵀ of the stack's SVD, taken over the stack's range only: directions
    whose singular value is below the rank tolerance are left out. Where the stack has full rank this is the
    authors' U_u·V_uᵀ exactly; where it does not (identical or linearly dependent tasks) their factor holds an
    arbitrary basis of the null space, which depends on the LAPACK build, and ours holds nothing there.
  * Iso-C's flattened spectrum: the mean of all min(m, n) singular values (as the authors), given to the
    directions of the range; a rank-deficient sum has no unique isotropic completion beyond it.

Each SVD runs in one thread: LAPACK's rounding depends on the thread count, and the bytes must be the same in
every process that merges or reproduces the model.
"""

from __future__ import annotations

from typing import Callable

import torch

from merging.runtime.determinism import SingleThread
from merging.checkpoints.inputs import TensorInputs
from merging.checkpoints.names import is_embedding

Task = Callable[[int], "torch.Tensor"]
EPS32 = 2.0**-23  # float32 machine epsilon (not torch.finfo: `mergeyard methods` must not import torch)


def decomposes(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the SVD methods decompose this tensor: a 2-D weight that is a linear map, not an embedding table."""
    return len(shape) == 2 and min(shape) > 0 and not is_embedding(name)


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with SingleThread():
        return torch.linalg.svd(matrix, full_matrices=False)


def _range(s: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Which singular values count (numpy's matrix_rank tolerance at float32: σ > σ_max · max(m, n) · ε)."""
    if s.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    return s > s.max() * max(shape) * EPS32


def orthonormal(stack: torch.Tensor) -> torch.Tensor:
    """The polar factor of `stack` over its range: orthonormal columns (or rows, for a wide stack) closest to it."""
    u, s, vh = svd(stack)
    keep = _range(s, tuple(stack.shape))
    with SingleThread():
        return u[:, keep] @ vh[keep]


def low_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation (Eckart–Young): the top singular directions kept."""
    u, s, vh = svd(matrix)
    k = min(rank, s.numel())
    with SingleThread():
        return (u[:, :k] * s[:k]) @ vh[:k]


def task_singular_vectors(task: Task, count: int, rank: int) -> torch.Tensor:
    """TSV-M: each task's top `rank` singular triplets, the stacked left and right vectors orthogonalised, and the
    singular values kept: U⊥ · diag(σ₁ … σ_T) · V⊥ᵀ."""
    us, ss, vhs = [], [], []
    for i in range(count):
        u, s, vh = svd(task(i))
        k = min(rank, s.numel())
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    u, vh = orthonormal(torch.cat(us, 1)), orthonormal(torch.cat(vhs, 0))
    with SingleThread():
        return (u * torch.cat(ss)) @ vh


def isotropic(total: torch.Tensor) -> torch.Tensor:
    """Iso-C: the summed task matrix with its spectrum flattened to the mean singular value, σ̄ · U Vᵀ."""
    u, s, vh = svd(total)
    keep = _range(s, tuple(total.shape))
    with SingleThread():
        return s.mean() * (u[:, keep] @ vh[keep])


def split_spectrum(r: int, count: int, common_fraction: float) -> tuple[int, int]:
    """Iso-CTS's budget of r = min(m, n) directions: (common, per task), the task-specific part a multiple of the
    task count as the authors round it, never more than r."""
    common = int(r * common_fraction)
    per_task = min(round((r - common) / count), r // count)
    return r - per_task * count, per_task


def isotropic_common_and_task(total: torch.Tensor, task: Task, count: int, common_fraction: float) -> torch.Tensor:
    """Iso-CTS: the top directions of the sum (the common subspace) plus each task's top directions outside it,
    orthogonalised together, all at the mean of their singular values."""
    common, per_task = split_spectrum(min(total.shape), count, common_fraction)
    u, s, vh = svd(total)
    uc, sc, vhc = u[:, :common], s[:common], vh[:common]
    us, ss, vhs = [], [], []
    for i in range(count):
        t = task(i)
        with SingleThread():
            specific = t - uc @ (uc.T @ t)
        u_i, s_i, vh_i = svd(specific)
        us.append(u_i[:, :per_task])
        ss.append(s_i[:per_task])
        vhs.append(vh_i[:per_task])
    u = orthonormal(torch.cat(us + [uc], 1))
    vh = orthonormal(torch.cat(vhs + [vhc], 0))
    with SingleThread():
        return torch.cat(ss + [sc]).mean() * (u @ vh)


# ---- what the methods read: a tensor's weighted task vectors, one model at a time ------------------------------


def weighted_tasks(tensor: TensorInputs) -> Task:
    """τ_i = w_i · (θ_i − θ_base) of one whole tensor, read when asked for (one model's tensor at a time)."""
    base = tensor.base_whole()

    def task(i: int) -> torch.Tensor:
        return (tensor.model_whole(i) - base) * tensor.weights[i]

    return task


def summed(task: Task, count: int) -> torch.Tensor:
    total = task(0)
    for i in range(1, count):
        total += task(i)
    return total


def mean_task_vector(tensor: TensorInputs):
    """Chunks of the weighted task vectors' mean, (1/N) Σ w_i τ_i: what TSV-M, Iso-C/CTS and CART give the tensors
    they do not decompose."""
    n = len(tensor.models)
    for chunk in tensor.chunks():
        out = torch.zeros_like(chunk.base)
        for w, m in zip(tensor.weights, chunk.models):
            out.add_(m - chunk.base, alpha=w / n)
        yield chunk.base, out

