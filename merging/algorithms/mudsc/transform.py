"""Applying matchings to tensors: each model's weights moved into the merged units, then combined.

For a group, `target[m, u]` is the merged unit that unit u of model m becomes.
Along an `out` axis a merged unit is the weighted mean of the units merged into
it; along an `in` axis a consumer reads the merged unit wherever it read one
of its units (its columns are summed there: ZipIt's unmerge). A tensor with no
`out` axis in any group is averaged over the models with their weights. With
a permutation everything is exact: the merge of a model with a permuted copy
of itself is the model again, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merging.algorithms.mudsc.spec import Group, Member, PermutationSpec


@dataclass
class Matching:
    target: torch.Tensor  # K × n, int64: merged unit of each model's unit
    size: int  # merged units (n, or K·n for concatenated outputs)
    value: float = 0.0  # the similarity it achieved (the ascent's objective)

    def coefficients(self, weights: list[float]) -> torch.Tensor:
        """K × n: each unit's share of its merged unit (model weight over the merged unit's total weight)."""
        w = torch.tensor(weights, dtype=torch.float64)[:, None].expand_as(self.target)
        totals = torch.zeros(self.size, dtype=torch.float64).index_add_(0, self.target.reshape(-1), w.reshape(-1))
        return (w / totals[self.target]).to(torch.float32)


def _segments(entries: list[tuple[Group, Member]], length: int, matchings: dict[str, Matching]):
    """Members on one axis, in order, each with its merged offset; they tile the axis exactly."""
    entries = sorted(entries, key=lambda e: e[1].offset)
    out, pos, merged_pos = [], 0, 0
    for g, m in entries:
        if m.offset != pos:
            raise ValueError(f"{m.tensor}: axis {m.axis} is not tiled by its groups (gap at {pos})")
        out.append((g, m, merged_pos))
        pos += g.size * m.width
        merged_pos += matchings[g.name].size * m.width
    if pos != length:
        raise ValueError(f"{entries[0][1].tensor}: axis {entries[0][1].axis} is not tiled by its groups")
    return out, merged_pos


def map_axis(x: torch.Tensor, axis: int, entries: list[tuple[Group, Member]], model: int,
             matchings: dict[str, Matching], coefficients: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Move model `model`'s tensor into the merged units along `axis`. With `coefficients` (out axes) each
    unit is scaled by its share; without, units are summed into their merged unit (in axes, similarity)."""
    segments, _ = _segments(entries, x.shape[axis], matchings)
    pieces = []
    for g, m, _ in segments:
        matching = matchings[g.name]
        t = matching.target[model]
        segment = x.narrow(axis, m.offset, g.size * m.width)
        if coefficients is not None:
            view = [1] * x.dim()
            view[axis] = -1
            segment = segment * coefficients[g.name][model].repeat_interleave(m.width).view(view)
        r = torch.arange(m.width)
        dst = (t[:, None] * m.width + r).reshape(-1)
        if matching.size == g.size and torch.equal(torch.sort(t).values, torch.arange(g.size)):
            # a permutation: gather instead of scatter (exact, and far faster than index_add)
            pieces.append(segment.index_select(axis, torch.argsort(dst)))
            continue
        shape = list(x.shape)
        shape[axis] = matching.size * m.width
        pieces.append(torch.zeros(shape, dtype=x.dtype).index_add_(axis, dst, segment))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=axis)


class Mover:
    """Every grouped axis of every tensor, and how to move a model's tensors into the merged units."""

    def __init__(self, spec: PermutationSpec):
        self.spec = spec
        self.axes: dict[str, dict[int, list[tuple[Group, Member]]]] = {}
        for tensor, entries in spec.members_by_tensor().items():
            for g, m in entries:
                self.axes.setdefault(tensor, {}).setdefault(m.axis, []).append((g, m))

    def out_axis(self, tensor: str) -> int | None:
        outs = {m.axis for entries in self.axes.get(tensor, {}).values() for _, m in entries if m.role == "out"}
        if len(outs) > 1:
            raise ValueError(f"{tensor}: more than one axis holds units' own values")
        return next(iter(outs), None)

    def to_merged(self, name: str, x: torch.Tensor, model: int, matchings: dict[str, Matching],
                  coefficients: dict[str, torch.Tensor] | None = None, skip: frozenset[str] = frozenset()) -> torch.Tensor:
        """Model `model`'s tensor with every grouped axis (but groups in `skip`) in the merged units. With
        `coefficients`, out axes take each unit's share (for merging); without, units are summed (a basis)."""
        for axis, entries in self.axes.get(name, {}).items():
            if any(g.name in skip for g, _ in entries):
                continue
            role = entries[0][1].role
            x = map_axis(x, axis, entries, model, matchings, coefficients if role == "out" else None)
        return x


def merge_states(states: list[dict[str, torch.Tensor]], weights: list[float], spec: PermutationSpec,
                 matchings: dict[str, Matching]) -> dict[str, torch.Tensor]:
    """The merged state: every model moved into the merged units, then summed (out axes carry the weights)."""
    mover = Mover(spec)
    coefficients = {name: m.coefficients(weights) for name, m in matchings.items()}
    total = sum(weights)
    merged: dict[str, torch.Tensor] = {}
    for name, ref in states[0].items():
        if not ref.is_floating_point():
            merged[name] = ref.clone()  # counters (BatchNorm's num_batches_tracked) are not merged
            continue
        has_out = mover.out_axis(name) is not None
        acc = None
        for m, state in enumerate(states):
            x = mover.to_merged(name, state[name].to(torch.float32), m, matchings, coefficients)
            if not has_out:
                x = x * (weights[m] / total)
            acc = x if acc is None else acc + x
        merged[name] = acc
    return merged
