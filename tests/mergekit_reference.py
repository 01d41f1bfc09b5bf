"""Slow float64 references of the mergekit-family methods, written from the papers' and mergekit's formulas in
numpy, element and row loops where that is clearer, independently of merging/methods."""

from __future__ import annotations

import math

import numpy as np

from dense_reference import uniform_at


def np64(t):
    return t.double().numpy()


def slerp(a, b, t, threshold=0.9995, eps=1e-8):
    """Row by row (the leading axis; each element of a 1-D tensor is a row)."""
    shape = a.shape
    rows = shape[0] if shape else 1
    A, B = a.reshape(rows, -1), b.reshape(rows, -1)
    out = np.empty_like(A)
    for r in range(rows):
        x, y = A[r], B[r]
        nx, ny = np.sqrt((x * x).sum()), np.sqrt((y * y).sum())
        nx, ny = (nx if nx > eps else 1.0), (ny if ny > eps else 1.0)
        dot = min(1.0, max(-1.0, float(((x / nx) * (y / ny)).sum())))
        if abs(dot) > threshold:
            out[r] = (1 - t) * x + t * y
        else:
            th = math.acos(dot)
            out[r] = math.sin((1 - t) * th) / math.sin(th) * x + math.sin(t * th) / math.sin(th) * y
    return out.reshape(shape)


def _slerp_vec(t, v0, v1, eps=1e-8):
    u0 = v0 / max(np.linalg.norm(v0), 1e-7)
    u1 = v1 / max(np.linalg.norm(v1), 1e-7)
    cos = min(1.0, max(-1.0, float(u0 @ u1)))
    if 1 - cos * cos <= eps * eps:
        return (1 - t) * v0 + t * v1
    th = math.acos(cos)
    return (math.sin((1 - t) * th) * v0 + math.sin(t * th) * v1) / math.sin(th)


def nuslerp(models, weights, base=None, flatten=True, row_wise=False):
    t = 0.5 if abs(sum(weights)) < 1e-6 else weights[1] / sum(weights)
    v0, v1 = models
    if base is not None:
        v0, v1 = v0 - base, v1 - base
    shape = v0.shape
    if flatten:
        out = _slerp_vec(t, v0.reshape(-1), v1.reshape(-1)).reshape(shape)
    else:
        a, b = (np.moveaxis(v0, 0, -1), np.moveaxis(v1, 0, -1)) if row_wise else (v0, v1)
        lead = a.shape[:-1]
        A, B = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        out = np.stack([_slerp_vec(t, x, y) for x, y in zip(A, B)]).reshape(*lead, a.shape[-1])
        out = np.moveaxis(out, -1, 0) if row_wise else out
    return out + base if base is not None else out


def multislerp(models, weights, base=None, eps=1e-8):
    pts = [m - base if base is not None else m for m in models]
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    flat = [p.reshape(-1) for p in pts]
    norms = [np.linalg.norm(p) for p in flat]
    units = [p / (n + eps) for p, n in zip(flat, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / np.linalg.norm(mean)
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
    tn = np.linalg.norm(tangent) + eps
    out = (mean * math.cos(tn) + tangent * math.sin(tn) / tn) * sum(wi * n for wi, n in zip(w, norms))
    out = out.reshape(models[0].shape)
    return out + base if base is not None else out


def karcher_residual(result, points):
    """|Σ α_i log_μ(u_i)| at μ = result / |result|: zero at the Karcher mean (its first-order condition)."""
    mu = result.reshape(-1) / np.linalg.norm(result)
    total = np.zeros_like(mu)
    for p in points:
        u = p.reshape(-1) / np.linalg.norm(p)
        c = min(1.0, max(-1.0, float(mu @ u)))
        th = math.acos(c)
        if th > 1e-12:
            total += (th / math.sin(th)) * (u - c * mu) / len(points)
    return float(np.linalg.norm(total))


def model_stock(base, models, filter_wise=False):
    n = len(models)
    shape = base.shape
    if filter_wise:
        rows = base.reshape(1, -1) if base.ndim <= 1 else base
        mats = [m.reshape(rows.shape) for m in models]
        lead = rows.shape[:-1]
        B = rows.reshape(-1, rows.shape[-1])
        M = [m.reshape(-1, rows.shape[-1]) for m in mats]
        out = np.empty_like(B)
        for r in range(B.shape[0]):
            out[r] = _stock_one(B[r], [m[r] for m in M], n)
        return out.reshape(*lead, rows.shape[-1]).reshape(shape)
    return _stock_one(base.reshape(-1), [m.reshape(-1) for m in models], n).reshape(shape)


def _stock_one(b, ms, n):
    offs = [m - b for m in ms]
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            cos.append(max(-1.0, min(1.0, float(offs[i] @ offs[j]) / max(np.linalg.norm(offs[i]) * np.linalg.norm(offs[j]), 1e-6))))
    c = sum(cos) / len(cos)
    den = 1 + (n - 1) * c
    t = 0.0 if abs(den) < 1e-6 else n * c / den
    return t * (sum(ms) / n) + (1 - t) * b


def nearswap(base, model, t):
    out = np.empty_like(base.reshape(-1))
    for i, (a, b) in enumerate(zip(base.reshape(-1), model.reshape(-1))):
        w = min(1.0, max(0.0, t / max(abs(a - b), 1e-6)))
        out[i] = w * b + (1 - w) * a
    return out.reshape(base.shape)


def _consensus_sum(base, deltas, weights, normalize, lam, consensus):
    if consensus:
        total = sum(deltas)
        major = np.where(total >= 0, 1.0, -1.0)
        mixed = sum(np.where(np.sign(d) == major, d, 0.0) for d in deltas)
        div = sum(np.where(np.sign(d) == major, w, 0.0) for d, w in zip(deltas, weights))
        div = np.where(div == 0, 1.0, div)
    else:
        mixed = sum(deltas)
        div = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / div
    return base + lam * mixed


def sce(base, models, topk):
    taus = np.stack([(m - base).reshape(-1) for m in models])
    if topk < 1:
        var = taus.var(axis=0)
        k = int(np.count_nonzero(var) * topk)
        keep = np.zeros_like(var)
        keep[np.argsort(-var, kind="stable")[:k]] = 1
        taus = taus * keep
    major = np.where(taus.sum(0) >= 0, 1.0, -1.0)
    erase = (np.sign(taus) == major).astype(np.float64)
    c = (taus ** 2).mean(axis=1)
    c = np.full_like(c, 1 / len(c)) if abs(c.sum()) < 1e-6 else c / c.sum()
    kept = c[:, None] * erase
    return base + ((taus * kept).sum(0) / np.maximum(kept.sum(0), 1e-6)).reshape(base.shape)


def _l1(tau, mask, rescale):
    kept = tau * mask
    if not rescale:
        return kept
    a, b = np.abs(tau).sum(), np.abs(kept).sum()
    return kept if a < 1e-7 or b < 1e-7 else kept * (a / b)


def breadcrumbs(base, models, weights, densities, gammas, consensus, normalize=False, rescale=False, lam=1.0):
    deltas = []
    for m, w, d, g in zip(models, weights, densities, gammas):
        tau = (m - base).reshape(-1)
        if d < 1:
            n = tau.size
            keep, top = int(d * n), int(g * n)
            bottom = max(0, n - keep - top)
            order = np.argsort(np.abs(tau), kind="stable")
            mask = np.zeros(n)
            mask[order[bottom:bottom + keep]] = 1
            tau = _l1(tau, mask, rescale)
        deltas.append(tau * w)
    return _consensus_sum(base.reshape(-1), deltas, weights, normalize, lam, consensus).reshape(base.shape)


def della(base, models, weights, densities, epsilons, keys, consensus, normalize, rescale=True, lam=1.0):
    """keys[i] is model i's stream key for this tensor; rank r of n in a row keeps with d − ε + 2ε·r/(n − 1)."""
    deltas = []
    for i, (m, w, d, e) in enumerate(zip(models, weights, densities, epsilons)):
        tau = m - base
        rows = tau.reshape(1, -1) if tau.ndim < 2 else tau.reshape(tau.shape[0], tau.shape[1], -1)
        if tau.ndim >= 2:  # ranks along the second axis, as mergekit's argsort(dim=1)
            rows = np.moveaxis(rows, 1, -1).reshape(-1, tau.shape[1])
        probs = np.empty_like(rows)
        for r in range(rows.shape[0]):
            order = np.argsort(np.abs(rows[r]), kind="stable")
            rank = np.empty(rows.shape[1])
            rank[order] = np.arange(rows.shape[1])
            probs[r] = (d - e) + (rank / max(rows.shape[1] - 1, 1)) * 2 * e
        if tau.ndim >= 2:
            rest = tau.reshape(tau.shape[0], tau.shape[1], -1).shape[2]
            probs = np.moveaxis(probs.reshape(tau.shape[0], rest, tau.shape[1]), -1, 1).reshape(tau.shape)
        flat_probs = probs.reshape(-1)
        mask = np.array([uniform_at(keys[i], j) < flat_probs[j] for j in range(flat_probs.size)], dtype=np.float64)
        deltas.append(_l1(tau.reshape(-1), mask, rescale) * w)
    return _consensus_sum(base.reshape(-1), deltas, weights, normalize, lam, consensus).reshape(base.shape)
