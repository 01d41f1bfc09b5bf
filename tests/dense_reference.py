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


# ---- the SVD family (TSV-M, Iso-C, Iso-CTS, CART), in float64, from the papers' formulas ----------------------

EPS32 = torch.finfo(torch.float32).eps


def is_linear_weight(name, shape):
    """What the papers decompose: a layer's 2-D weight matrix; embedding tables are lookups, not layers."""
    return len(shape) == 2 and not any(h in name for h in ("embed", "wte", "wpe"))


def in_range(s, shape):
    """The directions that carry the matrix: σ above numpy's matrix_rank tolerance at float32."""
    return s > s.max() * max(shape) * EPS32


def polar_on_range(a):
    """Nearest matrix with orthonormal columns (rows), over the range of `a`: Σ_{σ_j > tol} u_j v_jᵀ."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    out = torch.zeros_like(a)
    for j in range(s.numel()):
        if in_range(s, a.shape)[j]:
            out += torch.outer(u[:, j], vh[j])
    return out


def _task_vectors(base, models, weights, name):
    return [w * (m[name].double() - base[name].double()) for m, w in zip(models, weights)]


def _spectral(base, models, weights, scale, matrix_rule, other_rule):
    out = {}
    for name in float_names(base):
        taus = _task_vectors(base, models, weights, name)
        b = base[name].double()
        if is_linear_weight(name, b.shape):
            out[name] = b + scale * matrix_rule(taus)
        else:
            out[name] = other_rule(b, taus)
    return out


def tsv(base, models, weights, alpha, fraction=None):
    """TSV-M: per task the top k = ⌊r·fraction⌋ (≥ 1; fraction 1/T by default) singular triplets, the stacked
    U and V replaced by their polar factors, Σ kept."""
    def matrix(taus):
        r = min(taus[0].shape)
        k = max(1, int(r * (fraction if fraction is not None else 1 / len(taus))))
        us, ss, vs = [], [], []
        for tau in taus:
            u, s, vh = torch.linalg.svd(tau, full_matrices=False)
            us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k])
        u_cat, v_cat = torch.cat(us, 1), torch.cat(vs, 0)
        return polar_on_range(u_cat) @ torch.diag(torch.cat(ss)) @ polar_on_range(v_cat)
    return _spectral(base, models, weights, alpha, matrix, lambda b, taus: b + alpha * loop_sum(taus) / len(taus))


def iso_c(base, models, weights, alpha):
    """Iso-C: Σ τ_i = U S Vᵀ → mean(S) · U Vᵀ."""
    def matrix(taus):
        u, s, vh = torch.linalg.svd(loop_sum(taus), full_matrices=False)
        keep = in_range(s, u.shape[:1] + vh.shape[1:])
        return s.mean() * (u[:, keep] @ vh[keep])
    return _spectral(base, models, weights, alpha, matrix, lambda b, taus: b + alpha * loop_sum(taus) / len(taus))


def iso_cts(base, models, weights, alpha, common_fraction=0.8):
    """Iso-CTS: the sum's top directions (common) plus each task's top directions after removing them."""
    def matrix(taus):
        total = loop_sum(taus)
        r, n_tasks = min(total.shape), len(taus)
        common = int(r * common_fraction)
        per_task = min(round((r - common) / n_tasks), r // n_tasks)
        common = r - per_task * n_tasks
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        us, ss, vs = [], [], []
        for tau in taus:
            projected = tau - u[:, :common] @ u[:, :common].T @ tau
            ui, si, vhi = torch.linalg.svd(projected, full_matrices=False)
            us.append(ui[:, :per_task]), ss.append(si[:per_task]), vs.append(vhi[:per_task])
        u_all = torch.cat(us + [u[:, :common]], 1)
        v_all = torch.cat(vs + [vh[:common]], 0)
        sigma = torch.cat(ss + [s[:common]]).mean()
        return sigma * polar_on_range(u_all) @ polar_on_range(v_all)
    return _spectral(base, models, weights, alpha, matrix, lambda b, taus: b + alpha * loop_sum(taus) / len(taus))


def cart(base, models, weights, lam, rank_ratio):
    """CART: θ̄ = θ_base + mean τ; θ = θ̄ + λ Σ_i LowRank_k(τ_i − mean τ) on weight matrices, θ̄ elsewhere."""
    out = {}
    for name in float_names(base):
        taus = _task_vectors(base, models, weights, name)
        centre = loop_sum(taus) / len(taus)
        b = base[name].double()
        if not is_linear_weight(name, b.shape):
            out[name] = b + centre
            continue
        k = max(1, int(rank_ratio * min(b.shape)))
        total = torch.zeros_like(b)
        for tau in taus:
            u, s, vh = torch.linalg.svd(tau - centre, full_matrices=False)
            total = total + u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        out[name] = b + centre + lam * total
    return out
