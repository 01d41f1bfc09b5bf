"""Matching units by a similarity matrix: permutations (alignment), block-structured permutations, zips.

A matching of one group over K models is a `target` matrix (K × n): unit u
of model m becomes merged unit target[m, u]. Alignment (Git Re-Basin style)
matches every model to model 0 with a linear assignment; zipping (ZipIt
style) clusters the K·n units greedily by similarity, within a model too,
into n merged units.
"""

from __future__ import annotations

import numpy as np
import torch


def identity_target(k: int, n: int) -> torch.Tensor:
    return torch.arange(n).repeat(k, 1)


def concat_target(k: int, n: int) -> torch.Tensor:
    """Every model keeps its own units: model m's unit u is merged unit m·n + u."""
    return torch.arange(k * n).view(k, n)


def assign(similarity: np.ndarray) -> tuple[np.ndarray, float]:
    """cols[i]: the column matched to row i, maximising the summed similarity; and that sum."""
    from scipy.optimize import linear_sum_assignment  # here: scipy takes 0.3 s to import

    rows, cols = linear_sum_assignment(similarity, maximize=True)
    out = np.empty(similarity.shape[0], dtype=np.int64)
    out[rows] = cols
    return out, float(similarity[rows, cols].sum())


def _to_target(cols: np.ndarray) -> torch.Tensor:
    """Reference unit i matched model unit cols[i] → target[cols[i]] = i."""
    target = np.empty_like(cols)
    target[cols] = np.arange(len(cols))
    return torch.from_numpy(target)


def align(similarity: np.ndarray, k: int, n: int, blocks: int = 1) -> tuple[torch.Tensor, float]:
    """Match each model m ≥ 1 to model 0 on the (K·n)² similarity; blocks > 1: blocks map to blocks."""
    target = identity_target(k, n)
    total = 0.0
    for m in range(1, k):
        s = similarity[:n, m * n:(m + 1) * n]
        cols, value = assign(s) if blocks == 1 else block_assign(s, blocks)
        target[m] = _to_target(cols)
        total += value
    return target, total


def block_assign(similarity: np.ndarray, blocks: int) -> tuple[np.ndarray, float]:
    """A permutation that maps whole blocks to blocks (GroupNorm groups) and permutes freely inside them:
    each block pair is worth its best inner matching, the blocks are matched on those values."""
    n = similarity.shape[0]
    size = n // blocks
    inner: dict[tuple[int, int], np.ndarray] = {}
    value = np.zeros((blocks, blocks))
    for g in range(blocks):
        for h in range(blocks):
            cols, v = assign(similarity[g * size:(g + 1) * size, h * size:(h + 1) * size])
            inner[(g, h)], value[g, h] = cols, v
    outer, total = assign(value)
    cols = np.empty(n, dtype=np.int64)
    for g, h in enumerate(outer):
        cols[g * size:(g + 1) * size] = h * size + inner[(g, h)]
    return cols, total


def align_within(similarity: np.ndarray, parent: torch.Tensor, k: int, n: int) -> tuple[torch.Tensor, float]:
    """Units in blocks that follow a parent's matching (dimensions inside attention heads): the block of
    model m matched to reference block i is aligned inside by its own assignment."""
    blocks = parent.shape[1]
    size = n // blocks
    target = identity_target(k, n)
    total = 0.0
    for m in range(1, k):
        for j in range(blocks):
            i = int(parent[m, j])
            s = similarity[i * size:(i + 1) * size, m * n + j * size:m * n + (j + 1) * size]
            cols, value = assign(s)
            total += value
            # reference unit i·size + r matched model unit j·size + cols[r]
            target[m, j * size + cols] = torch.arange(i * size, (i + 1) * size)
    return target, total


def zip_units(similarity: np.ndarray, k: int, n: int, within_model: float = 1.0) -> tuple[torch.Tensor, float]:
    """ZipIt's greedy zip: repeatedly merge the most similar pair of clusters (average linkage) until n remain,
    a cluster holding at most K units; pairs inside one model count `within_model` times their similarity."""
    total_units = k * n
    s = similarity.astype(np.float64).copy()
    model_of = np.repeat(np.arange(k), n)
    same = model_of[:, None] == model_of[None, :]
    s[same] *= within_model
    np.fill_diagonal(s, -np.inf)
    if k == 2:
        return _zip_pairs(s, similarity, n)
    size = np.ones(total_units, dtype=np.int64)
    alive = np.ones(total_units, dtype=bool)
    members: list[list[int]] = [[u] for u in range(total_units)]
    value = 0.0
    clusters = total_units
    cap = k
    while clusters > n:
        allowed = alive[:, None] & alive[None, :] & (size[:, None] + size[None, :] <= cap)
        masked = np.where(allowed, s, -np.inf)
        flat = int(np.argmax(masked))
        a, b = divmod(flat, total_units)
        if not np.isfinite(masked[a, b]):
            cap += 1  # only oversized merges remain (sizes that do not add up to K): allow one more unit
            continue
        value += float(similarity[a, b]) if k == 2 else float(masked[a, b])
        # average linkage: the merged cluster's similarity is the size-weighted mean of its parts'
        s[a] = (size[a] * s[a] + size[b] * s[b]) / (size[a] + size[b])
        s[:, a] = s[a]
        s[a, a] = -np.inf
        alive[b] = False
        s[b, :] = -np.inf
        s[:, b] = -np.inf
        size[a] += size[b]
        members[a] += members[b]
        clusters -= 1
    groups = sorted((sorted(members[c]) for c in range(total_units) if alive[c]), key=lambda g: g[0])
    target = torch.empty(k, n, dtype=torch.long)
    for c, group in enumerate(groups):
        for unit in group:
            target[unit // n, unit % n] = c
    return target, value


def _zip_pairs(scaled: np.ndarray, similarity: np.ndarray, n: int) -> tuple[torch.Tensor, float]:
    """Two models: clusters are pairs, so the greedy zip takes pairs in order of similarity (ties by index)."""
    rows, cols = np.triu_indices(2 * n, k=1)
    order = np.lexsort((cols, rows, -scaled[rows, cols]))
    used = np.zeros(2 * n, dtype=bool)
    pairs, value = [], 0.0
    for idx in order:
        a, b = rows[idx], cols[idx]
        if used[a] or used[b]:
            continue
        used[a] = used[b] = True
        pairs.append((a, b))
        value += float(similarity[a, b])
        if len(pairs) == n:
            break
    target = torch.empty(2, n, dtype=torch.long)
    for c, (a, b) in enumerate(sorted(pairs)):
        target[a // n, a % n] = c
        target[b // n, b % n] = c
    return target, value
