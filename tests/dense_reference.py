"""Slow, dense reference implementations written from the papers' formulas.

They hold every model in memory, flatten the whole model for global TIES,
sort instead of selecting, and use Python loops where the engine vectorises.
Nothing here imports mergeyard's merge code.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def float_names(sd):
    return sorted(n for n, t in sd.items() if t.is_floating_point())


def flat(sd, names):
    return torch.cat([sd[n].float().reshape(-1) for n in names])


def unflat(vec, like, names):
    out, pos = {}, 0
    for n in names:
        k = like[n].numel()
        out[n] = vec[pos:pos + k].reshape(like[n].shape)
        pos += k
    return out


def loop_sum(tensors):
    total = torch.zeros_like(tensors[0])
    for t in tensors:
        total = total + t
    return total


def average(models, weights):
    names = float_names(models[0])
    total = sum(weights)
    return {n: loop_sum([m[n].float() * (w / total) for m, w in zip(models, weights)]) for n in names}


def task_arithmetic(base, models, weights, lam):
    names = float_names(base)
    return {n: base[n].float() + lam * loop_sum([w * (m[n].float() - base[n].float()) for m, w in zip(models, weights)])
            for n in names}


def ties_global(base, models, weights, density, aggregate="mean", lam=1.0):
    """TIES as in the paper's reference code, over the whole flattened model."""
    names = float_names(base)
    b = flat(base, names)
    d = b.numel()
    trimmed = []
    for m, w in zip(models, weights):
        tau = flat(m, names) - b
        k = d - int(d * density)  # k-th smallest |τ| is the threshold; ties at it are kept
        if k > 0:
            threshold = torch.sort(tau.abs()).values[k - 1]
            tau = tau * (tau.abs() >= threshold)
        trimmed.append(tau * w)
    elected = torch.sign(loop_sum(trimmed))
    majority = torch.sign(elected.double().sum())
    elected[elected == 0] = majority
    selected = [torch.where(elected > 0, t > 0, t < 0) * t for t in trimmed]
    merged = loop_sum(selected)
    if aggregate == "mean":
        counts = loop_sum([(s != 0).float() for s in selected])
        merged = merged / counts.clamp(min=1)
    return unflat(b + lam * merged, base, names)


def mergekit_consensus(weighted, weights, aggregate):
    """mergekit's `sum` consensus: majority sign of the weighted sum (zero counts positive), disjoint merge."""
    total = loop_sum(weighted)
    majority = torch.where(total >= 0, 1.0, -1.0)
    agree = [torch.sign(t) == majority for t in weighted]
    mixed = loop_sum([t * a for t, a in zip(weighted, agree)])
    if aggregate == "mean":
        divisor = loop_sum([a * w for a, w in zip(agree, weights)])
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return mixed


def ties_per_tensor(base, models, weights, density, aggregate="mean", lam=1.0):
    """mergekit's `ties`: exact top-k per tensor (stable order breaks ties), weighted sign election."""
    out = {}
    for n in float_names(base):
        b = base[n].float().reshape(-1)
        weighted = []
        for m, w in zip(models, weights):
            tau = m[n].float().reshape(-1) - b
            if density < 1:
                k = int(density * tau.numel())
                order = torch.argsort(tau.abs(), descending=True, stable=True)
                mask = torch.zeros_like(tau)
                mask[order[:k]] = 1
                tau = tau * mask
            weighted.append(tau * w)
        out[n] = (b + lam * mergekit_consensus(weighted, weights, aggregate)).reshape(base[n].shape)
    return out


def mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def uniform_at(key: int, index: int) -> float:
    """The documented counter-based uniform, element by element in Python integers."""
    h = mix32((index & M32) ^ key)
    h = mix32(h ^ (index >> 32) ^ mix32(key ^ 0x9E3779B9))
    return (h >> 8) / float(1 << 24)


def dare(base, models, weights, drop_rate, keys, lam=1.0, ties=False, aggregate="sum", rescale=True):
    """DARE with the mask taken from `uniform_at`; keys[i][name] is model i's stream key for a tensor."""
    out = {}
    for n in float_names(base):
        b = base[n].float().reshape(-1)
        weighted = []
        for i, (m, w) in enumerate(zip(models, weights)):
            tau = m[n].float().reshape(-1) - b
            keep = torch.tensor([uniform_at(keys[i][n], j) >= drop_rate for j in range(tau.numel())])
            scale = 1 / (1 - drop_rate) if rescale else 1.0
            weighted.append(tau * keep * (w * scale))
        mixed = mergekit_consensus(weighted, weights, aggregate) if ties else loop_sum(weighted)
        out[n] = (b + lam * mixed).reshape(base[n].shape)
    return out
