"""Sign election and disjoint merging, shared by TIES and DARE-TIES.

Two published variants exist and both are offered, each tested against its
own reference:
  * mergekit's (per tensor): sign of the weighted sum, a zero sum counts as
    positive; the merge divides by the sum of the weights that agree.
  * the TIES paper's (global): see `merging.methods.ties`.
"""

from __future__ import annotations

import torch


def elect_sign_weighted(weighted: list[torch.Tensor]) -> torch.Tensor:
    """+1 where Σ_i w_i·τ_i ≥ 0, −1 elsewhere (mergekit's `sum` consensus)."""
    total = torch.zeros_like(weighted[0])
    for wt in weighted:  # summed in model order: bitwise reproducible whatever the backend
        total += wt
    return torch.where(total >= 0, 1.0, -1.0)


def disjoint_merge_weighted(
    weighted: list[torch.Tensor], weights: list[float], elected: torch.Tensor, aggregate: str,
    mean_over: str = "weights",
) -> torch.Tensor:
    """Σ of the w_i·τ_i whose sign matches `elected`; with `mean`, divided by the agreeing
    weights (mergekit, `mean_over="weights"`) or by how many agree (the TIES paper, `"count"`)."""
    mixed = torch.zeros_like(elected)
    divisor = torch.zeros_like(elected) if aggregate == "mean" else None
    for wt, w in zip(weighted, weights):
        agree = torch.mul(wt, elected) > 0  # elected is ±1; a zero never agrees
        mixed.add_(torch.where(agree, wt, 0.0))
        if divisor is not None:
            divisor.add_(agree, alpha=w if mean_over == "weights" else 1.0)
    if divisor is not None:
        divisor.masked_fill_(divisor == 0, 1.0)
        mixed /= divisor
    return mixed


CACHE_BLOCK = 1 << 18  # elements: a block of every input and temporary stays in this machine's caches


def merge_agreeing(base: torch.Tensor, weighted: list[torch.Tensor], weights: list[float], aggregate: str,
                   lam: float, block: int = CACHE_BLOCK) -> torch.Tensor:
    """base + λ·(mergekit's elected-sign disjoint merge of `weighted`), block by block: the dozen elementwise passes
    over each input then read caches rather than memory (~20% faster on a 2.4M-element tensor). Every element is
    computed as without blocks, bit for bit."""
    flat_base, flats = base.reshape(-1), [w.reshape(-1) for w in weighted]
    out = torch.empty_like(flat_base)
    for start in range(0, flat_base.numel(), block):
        part = [f[start:start + block] for f in flats]
        elected = elect_sign_weighted(part)
        merged = disjoint_merge_weighted(part, weights, elected, aggregate).mul_(lam)  # not add(alpha=): fused, it
        torch.add(flat_base[start:start + block], merged, out=out[start:start + block])  # rounds otherwise
    return out.reshape(base.shape)
