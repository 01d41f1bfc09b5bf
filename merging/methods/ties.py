"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023).

Two trim scopes:
  * `global` — the paper's reference. Each task vector τ_i = θ_i − θ_base,
    flattened over the whole model (d parameters), keeps the entries with
    |τ_i| ≥ t_i, t_i being the k-th smallest |τ_i| with k = d − int(d·density)
    (ties at t_i are kept). The sign of each parameter is elected as
    sign(Σ_i trimmed τ_i), a zero replaced by the sign of the sum of every
    elected sign (the majority). The merged τ is the mean (or sum) of the
    nonzero trimmed entries agreeing with the elected sign; θ = θ_base + λ·τ.
    Per-model `weight`s scale each trimmed τ_i before election.
  * `per_tensor` — mergekit's `ties`: top k = int(density·n) entries of |τ_i|
    within each tensor (ties at the threshold broken by flat index), weighted
    sign election with a zero sum counted positive, and `mean` dividing by the
    sum of agreeing weights.

Both stream. Global thresholds come from two histogram passes over every
tensor (`merging.algorithms.selection`) instead of an N×d sort. The global majority
sign is known only after the last tensor; parameters whose elected sign was
zero are written assuming a positive majority and corrected afterwards
(`finalize`) if the majority turns out negative.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
from pydantic import Field

from merging.checkpoints.inputs import MergeInputs, TensorInputs
from merging.algorithms.consensus import disjoint_merge_weighted, merge_agreeing
from merging.methods.registry import CONSENSUS_GRID, MethodParams, Patch, merge_method
from merging.algorithms.selection import RankSelector


class TiesParams(MethodParams):
    density: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each task vector kept")
    trim_scope: Literal["global", "per_tensor"] = Field("global", description="where the top-k is taken")
    aggregate: Literal["mean", "sum"] = Field("mean", description="how agreeing entries combine")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")

    per_model = ("density",)  # per_tensor scope: each model keeps its own fraction, as in mergekit


@dataclass
class GlobalTiesState:
    thresholds: list[float] | None  # None: density 1, nothing trimmed
    sign_total: int = 0  # Σ over parameters of sign(Σ_i trimmed τ_i)
    # (tensor, flat indices, values if the majority is negative) for zero-sum parameters
    pending: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)


class GlobalThresholds:
    """Global TIES's per-model thresholds, the k-th smallest |τ_i| over the whole model (an exact radix select,
    merging.algorithms.selection), as a map over tensors and an exact reduce in two passes: each tensor maps to one
    histogram per model of its |τ_i|'s float32 bit patterns (high 16 bits; then the low 16 bits of those in the
    bin the first pass settled on), and the histograms are summed. The sums are integers, so the order and the
    place the maps run do not change a bit of the result."""

    passes = 2

    def describe(self, params: TiesParams) -> list[dict]:
        if params.trim_scope != "global":
            return []
        return [{"step": "ties.global_thresholds", "passes": self.passes,
                 "map": "per tensor, per model: a histogram of |τ_i|'s float32 bits (high 16, then low 16 in the "
                        "selected bin)",
                 "reduce": f"histograms summed; per model the value of rank d − int(d·{params.density:g})"}]

    def begin(self, inputs: MergeInputs, params: TiesParams) -> tuple[bool, object]:
        if params.trim_scope != "global":
            return False, None
        d = inputs.total_elems
        rank = d - int(d * params.density)
        if not rank:  # density 1: nothing trimmed
            return False, GlobalTiesState(thresholds=None)
        return True, [RankSelector(rank, d, inputs.device) for _ in inputs.models]

    @staticmethod
    def context(stage: int, selectors: list[RankSelector]) -> list[int | None]:
        """What a map needs of the selectors: the bin each settled on (stage 1)."""
        return [sel.bin for sel in selectors]

    @staticmethod
    def map(stage: int, bins: list[int | None], tensor: TensorInputs) -> list[torch.Tensor]:
        partial = None
        for chunk in tensor.chunks():
            hists = [RankSelector.histogram_of(stage, b, (m - chunk.base).abs_()) for b, m in zip(bins, chunk.models)]
            partial = hists if partial is None else [a.add_(b) for a, b in zip(partial, hists)]
        return partial

    @staticmethod
    def combine(stage: int, a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
        return [x.add_(y) for x, y in zip(a, b)]

    @staticmethod
    def reduce(stage: int, selectors: list[RankSelector], partial: list[torch.Tensor]) -> None:
        for sel, hist in zip(selectors, partial):
            sel.add(stage, hist)

    @staticmethod
    def settle(stage: int, selectors: list[RankSelector]) -> None:
        for sel in selectors:
            sel.settle(stage)

    @staticmethod
    def finish(selectors: list[RankSelector]) -> GlobalTiesState:
        return GlobalTiesState(thresholds=[sel.value for sel in selectors])

    def __call__(self, inputs: MergeInputs, params: TiesParams) -> GlobalTiesState | None:
        mapped, carry = self.begin(inputs, params)
        if not mapped:
            return carry
        for stage in range(self.passes):
            context = self.context(stage, carry)
            for n, name in enumerate(inputs.names):
                self.reduce(stage, carry, self.map(stage, context, inputs.tensor(name)))
                inputs.report(f"ties: thresholds {stage + 1}/{self.passes}", n + 1, len(inputs.names))
            self.settle(stage, carry)
        return self.finish(carry)


class MajoritySign:
    """Global TIES's zero-sum parameters: their elected sign is the majority's, known only after the last tensor;
    they are written as if it were positive and patched here if it is not."""

    describe = "ties.majority_sign: Σ over tensors of each tensor's elected-sign sum; if ≤ 0, zero-sum entries patched"

    def __call__(self, state: GlobalTiesState | None) -> list[Patch]:
        if state is None or state.sign_total > 0:
            return []
        # Majority ≤ 0: the paper keeps negative entries where the elected sign was zero.
        return [Patch(name, idx, values) for name, idx, values in state.pending]

    @staticmethod
    def fresh(state: GlobalTiesState | None) -> GlobalTiesState | None:
        return None if state is None else GlobalTiesState(thresholds=state.thresholds)

    @staticmethod
    def absorb(state: GlobalTiesState | None, part: GlobalTiesState | None) -> None:
        if state is not None and part is not None:
            state.sign_total += part.sign_total  # integers: the order of the sum does not matter
            state.pending.extend(part.pending)


prepare_ties, finalize_ties = GlobalThresholds(), MajoritySign()


def _merge_global(tensor: TensorInputs, params: TiesParams, state: GlobalTiesState) -> Iterator[torch.Tensor]:
    lam = params.lambda_
    for chunk in tensor.chunks():
        taus = []
        total = torch.zeros_like(chunk.base)
        for i, (m, w) in enumerate(zip(chunk.models, tensor.weights)):
            tau = m - chunk.base
            if state.thresholds is not None:
                tau.mul_(tau.abs() >= state.thresholds[i])
            if w != 1.0:
                tau.mul_(w)
            total += tau
            taus.append(tau)
        # float64: a sum of ±1 and 0 is exact however large the chunk
        state.sign_total += int(torch.sign(total).sum(dtype=torch.float64))
        elected = torch.where(total >= 0, 1.0, -1.0)  # zero sums provisionally positive
        merged = disjoint_merge_weighted(taus, tensor.weights, elected, params.aggregate, mean_over="count")
        _note_zero_sums(tensor.name, chunk, taus, total, params, state)
        yield chunk.base + lam * merged


def _note_zero_sums(name, chunk, taus, total, params: TiesParams, state: GlobalTiesState) -> None:
    """Remember the value each zero-sum parameter takes if the majority sign turns out negative."""
    zero = (total == 0).nonzero().reshape(-1)  # rare: exact cancellation, or nothing kept
    if zero.numel() == 0:
        return
    sub = torch.stack([t[zero] for t in taus])
    undecided = (sub != 0).any(0)  # all-zero parameters merge to θ_base either way
    if not bool(undecided.any()):
        return
    idx, sub = zero[undecided], sub[:, undecided]
    negative = torch.zeros(sub.shape[1], dtype=sub.dtype, device=sub.device)
    for row in torch.where(sub < 0, sub, 0.0):  # in model order, as every other sum of the merge
        negative += row
    if params.aggregate == "mean":
        negative = negative / (sub < 0).sum(0).clamp(min=1)
    state.pending.append((name, (idx + chunk.offset).cpu(), (chunk.base[idx] + params.lambda_ * negative).cpu()))


class _ExactTopK:
    """Keeps exactly k entries of one task vector by |τ|, ties at the threshold by flat index.

    `RankSelector` gives the k-th largest |τ| and how many exceed it; the
    remaining places (`quota`) go to entries equal to it, first come first
    served across chunks.
    """

    def __init__(self, selector: RankSelector, k: int):
        self.threshold = selector.value
        self.quota = k - selector.n_greater
        self.keep_all_equal = self.quota == selector.n_equal  # common: no tie to break

    def mask(self, magnitude: torch.Tensor) -> torch.Tensor:
        if self.keep_all_equal:
            return magnitude >= self.threshold
        keep = magnitude > self.threshold
        if self.quota > 0:
            ties_at = (magnitude == self.threshold).nonzero().reshape(-1)[: self.quota]
            keep[ties_at] = True
            self.quota -= ties_at.numel()
        return keep


def _select_top_k(magnitudes, n: int, k: int, device) -> _ExactTopK:
    """Exact top-k selector from a re-iterable of |τ| chunks (two histogram passes)."""
    selector = RankSelector(n - k + 1, n, device)
    for a in magnitudes():
        selector.feed_coarse(a)
    selector.settle_coarse()
    for a in magnitudes():
        selector.feed_fine(a)
    selector.settle_fine()
    return _ExactTopK(selector, k)


def _merge_per_tensor(tensor: TensorInputs, params: TiesParams) -> Iterator[torch.Tensor]:
    n = tensor.numel
    ks = [int(d * n) if d < 1.0 else n for d in tensor.per_model(params, "density")]
    if tensor.single_chunk:
        # The whole tensor is in memory: compute τ and |τ| once per model, select on them directly.
        chunk = next(tensor.chunks())
        weighted = []
        for m, w, k in zip(chunk.models, tensor.weights, ks):
            tau = m - chunk.base
            if k == 0:
                tau.zero_()
            elif k < n:
                magnitude = tau.abs()
                tau.mul_(_select_top_k(lambda: (magnitude,), n, k, tau.device).mask(magnitude))
            weighted.append(tau.mul_(w))
        yield _combine(chunk.base, weighted, tensor.weights, params)
        return
    # one selection pass pair per trimmed model over the streamed chunks, then the merge pass
    selectors = [
        _select_top_k(lambda i=i: ((c.models[i] - c.base).abs_() for c in tensor.chunks()), n, k, tensor.device)
        if 0 < k < n else None
        for i, k in enumerate(ks)
    ]
    for chunk in tensor.chunks():
        weighted = []
        for i, (m, w) in enumerate(zip(chunk.models, tensor.weights)):
            tau = m - chunk.base
            if ks[i] == 0:
                tau.zero_()
            elif selectors[i] is not None:
                tau.mul_(selectors[i].mask(tau.abs()))
            weighted.append(tau.mul_(w))
        yield _combine(chunk.base, weighted, tensor.weights, params)


def _combine(base: torch.Tensor, weighted: list[torch.Tensor], weights: list[float], params: TiesParams) -> torch.Tensor:
    return merge_agreeing(base, weighted, weights, params.aggregate, params.lambda_)


@merge_method(
    "ties",
    params=TiesParams,
    paper="https://arxiv.org/abs/2306.01708",
    prepare=prepare_ties,
    finalize=finalize_ties,
    per_tensor=lambda p: p.trim_scope == "per_tensor",
    example={"density": 0.5, "lambda": 0.8},
    scale_param="lambda",
    scale_grid=CONSENSUS_GRID,
)
def ties(tensor: TensorInputs, params: TiesParams, state: GlobalTiesState | None) -> Iterator[torch.Tensor]:
    """Trim each task vector to its top entries, elect a sign per parameter, average the agreeing ones."""
    if params.trim_scope == "global":
        return _merge_global(tensor, params, state)
    return _merge_per_tensor(tensor, params)
