"""Permutation groups: which axes of which tensors move together when hidden units are re-ordered.

A network computes the same function after its hidden units are permuted,
provided every tensor that produces a unit (its weight rows, bias, norm
parameters) and every tensor that reads it (the next layer's weight columns)
move consistently. A `Group` is one such set of units; a `Member` says where
the units sit along one axis of one tensor:

    role "out": the tensor holds each unit's own values along this axis
                (weight rows producing it, its bias, norm scale and shift, BN statistics);
    role "in":  the tensor reads the unit along this axis (the consumer's weight columns).

A unit may span several consecutive elements (`width`): an attention head's
head_dim rows, a conv channel flattened into H·W inputs of a Linear layer.
Several members may tile one axis (q, k and v segments of a fused projection).

Some groups only admit permutations (`zippable=False`): units normalised
together by a LayerNorm (the transformer residual stream), GroupNorm groups,
attention heads. Others may also be zipped (ZipIt: merged in pairs, within a
model too). A `parent` ties a group's permutation to whole blocks of another
(the dimensions inside attention heads follow the heads). `blocks` > 1 says
the permutation must map blocks to blocks (GroupNorm's groups).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from merging.errors import MergeyardError

Role = Literal["out", "in"]


@dataclass(frozen=True)
class Member:
    tensor: str
    axis: int
    role: Role
    offset: int = 0  # first element of unit 0 along the axis
    width: int = 1  # elements per unit


@dataclass(frozen=True)
class Probe:
    """Where a group's activations are read during calibration: a module's input or output, and how its
    tensor turns into an (observations × units) matrix: `features(tensor, model)`, `model` being the whole
    network under calibration (a probe may apply that model's own weights, as attention maps do)."""

    module: str
    where: Literal["input", "output"]
    features: Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]


@dataclass
class Group:
    name: str
    size: int  # number of units
    members: tuple[Member, ...] = ()
    probes: tuple[Probe, ...] = ()
    zippable: bool = True
    kind: Literal["units", "heads", "concat"] = "units"  # concat: each model keeps its own units (stacked heads)
    blocks: int = 1  # GroupNorm: units fall into `blocks` equal blocks that must move as blocks
    parent: str | None = None  # units come in blocks of size // parent.size that follow the parent's matching
    # Weight features for groups whose units are not rows of one tensor (attention heads: W_q·W_kᵀ and W_o·W_v
    # per head, which do not change when dimensions inside a head are permuted). (state, to_merged) → units × D
    weight_features: Callable | None = None

    @property
    def block_size(self) -> int:
        return self.size // self.blocks


@dataclass
class PermutationSpec:
    architecture: str
    groups: list[Group] = field(default_factory=list)
    # buffers re-estimated on calibration data after merging (BatchNorm running statistics)
    has_batchnorm: bool = False

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def members_by_tensor(self) -> dict[str, list[tuple[Group, Member]]]:
        out: dict[str, list[tuple[Group, Member]]] = {}
        for g in self.groups:
            for m in g.members:
                out.setdefault(m.tensor, []).append((g, m))
        return out

    def check(self, state: dict[str, torch.Tensor]) -> None:
        """Every member must fit its tensor: axes in range, segments inside the axis and not overlapping."""
        for tensor, entries in self.members_by_tensor().items():
            if tensor not in state:
                raise MergeyardError(f"permutation spec ({self.architecture}) names tensor {tensor!r} that the "
                                     "checkpoint lacks: the models are not of this architecture")
            shape = state[tensor].shape
            by_axis: dict[int, list[tuple[int, int]]] = {}
            for g, m in entries:
                if m.axis >= len(shape):
                    raise MergeyardError(f"{tensor}: axis {m.axis} of a {len(shape)}-d tensor in group {g.name}")
                end = m.offset + g.size * m.width
                if end > shape[m.axis]:
                    raise MergeyardError(f"{tensor}: group {g.name} needs {end} elements on axis {m.axis}, "
                                         f"it has {shape[m.axis]}")
                by_axis.setdefault(m.axis, []).append((m.offset, end))
            for axis, spans in by_axis.items():
                spans.sort()
                for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
                    if b0 < a1:
                        raise MergeyardError(f"{tensor}: two groups claim the same elements of axis {axis}")
        for g in self.groups:
            if g.parent is not None:
                parent = self.group(g.parent)
                if g.size % parent.size:
                    raise MergeyardError(f"group {g.name} ({g.size}) does not divide into {parent.size} blocks")
            if g.size % g.blocks:
                raise MergeyardError(f"group {g.name} ({g.size}) does not divide into {g.blocks} blocks")
