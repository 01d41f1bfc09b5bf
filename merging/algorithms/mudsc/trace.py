"""Permutation groups of plain MLPs and CNNs, derived by tracing the module with torch.fx.

Walking the traced graph, every Linear or Conv2d output starts a group of
units; element-wise layers (activations, dropout, pooling), BatchNorm,
GroupNorm and LayerNorm over the channel pass it on (their parameters join it
as `out` members); `flatten` turns a conv channel into H·W consecutive inputs
of the next Linear (a unit of width H·W); the next Linear or Conv2d reads the
group (`in` members). A residual `x + f(x)` makes both operands one group
(one permutation per residual stream); an operand tied to the network's input
pins the stream in place. The network's output stays in place (`outputs=
"shared"`, models of one task) or keeps each model's outputs side by side
(`outputs="concat"`: heads of models trained on different classes, stacked).

Anything else (concatenation, attention, reshapes other than flatten) is
refused with the name of the node, rather than guessed.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from merging.errors import MergeyardError
from merging.algorithms.mudsc.spec import Group, Member, PermutationSpec, Probe

ELEMENTWISE_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Identity, nn.Dropout,
                       nn.ReLU6, nn.Hardswish, nn.Mish, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
ELEMENTWISE_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu, torch.sigmoid, torch.tanh,
                         torch.nn.functional.silu, torch.nn.functional.dropout, torch.nn.functional.max_pool2d,
                         torch.nn.functional.avg_pool2d, torch.nn.functional.adaptive_avg_pool2d}
ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
ADD = {operator.add, torch.add, operator.iadd}
FLATTEN_METHODS = {"flatten", "view", "reshape"}


class _Streams:
    """Union-find over group ids; a stream tied to the input (or anything fixed) is pinned."""

    def __init__(self):
        self.parent: list[int] = []
        self.pinned: list[bool] = []
        self.sizes: list[int] = []

    def new(self, size: int, pinned: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.pinned.append(pinned)
        self.sizes.append(size)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            if self.sizes[a] != self.sizes[b]:
                raise MergeyardError("a residual connection adds streams of different widths")
            self.parent[b] = a
            self.pinned[a] = self.pinned[a] or self.pinned[b]
        return a


def _channels_features(width: int):
    def features(x: torch.Tensor, _module) -> torch.Tensor:
        if x.dim() == 2 and width > 1:  # flattened conv map: (B, C·HW) → (B·HW, C)
            b = x.shape[0]
            return x.view(b, -1, width).transpose(1, 2).reshape(-1, x.shape[1] // width)
        if x.dim() > 2:  # (B, C, H, W) → (B·H·W, C)
            return x.transpose(1, -1).reshape(-1, x.shape[1])
        return x

    return features


def traced_spec(module: nn.Module, example: torch.Tensor, outputs: str = "shared") -> PermutationSpec:
    if outputs not in ("shared", "concat"):
        raise MergeyardError(f"outputs {outputs!r}: use shared or concat")
    try:
        graph = torch.fx.symbolic_trace(module)
    except Exception as exc:  # noqa: BLE001  (fx raises many kinds; the message is what matters)
        raise MergeyardError(f"MuDSC cannot trace {type(module).__name__} with torch.fx ({exc}); "
                             "give it a permutation spec of its own") from None
    ShapeProp(graph).propagate(example)
    streams = _Streams()
    # node → (stream id or None for "pinned input channels", unit width along the channel axis)
    where: dict[torch.fx.Node, tuple[int | None, int]] = {}
    members: dict[int, list[Member]] = {}
    probes: dict[int, list[Probe]] = {}
    norm_blocks: dict[int, int] = {}
    unzippable: set[int] = set()
    has_bn = False
    concat_stream: int | None = None
    modules = dict(graph.named_modules())

    def stream_of(node) -> tuple[int | None, int]:
        if node not in where:
            raise MergeyardError(f"MuDSC: cannot follow units through node {node.name!r} ({node.op} {node.target})")
        return where[node]

    def add(stream: int | None, member: Member) -> None:
        if stream is not None:
            members.setdefault(stream, []).append(member)

    def reads(node, stream: int | None, width: int, consumer: str) -> None:
        if stream is not None:
            probes.setdefault(stream, []).append(Probe(consumer, "input", _channels_features(width)))

    for node in graph.graph.nodes:
        if node.op == "placeholder":
            where[node] = (None, 1)
        elif node.op == "call_module":
            mod = modules[node.target]
            name = node.target
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                s_in, width = stream_of(node.args[0])
                if isinstance(mod, nn.Conv2d) and mod.groups != 1:
                    if mod.groups == mod.in_channels == mod.out_channels:  # depthwise: channels stay the stream
                        add(s_in, Member(f"{name}.weight", 0, "out"))
                        if mod.bias is not None:
                            add(s_in, Member(f"{name}.bias", 0, "out"))
                        where[node] = (s_in, 1)
                        continue
                    raise MergeyardError(f"{name}: grouped convolutions (groups={mod.groups}) are not supported")
                add(s_in, Member(f"{name}.weight", 1, "in", width=width))
                reads(node.args[0], s_in, width, name)
                out = streams.new(mod.weight.shape[0])
                add(out, Member(f"{name}.weight", 0, "out"))
                if mod.bias is not None:
                    add(out, Member(f"{name}.bias", 0, "out"))
                where[node] = (out, 1)
            elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                s, width = stream_of(node.args[0])
                if isinstance(mod, nn.LayerNorm):
                    shape = tuple(node.args[0].meta["tensor_meta"].shape)
                    if len(shape) != 2 or tuple(mod.normalized_shape) != shape[1:]:
                        raise MergeyardError(f"{name}: LayerNorm is supported over the features of (batch, features) only")
                    if s is not None:
                        unzippable.add(s)  # it normalises across the units: only a permutation commutes with it
                if isinstance(mod, nn.GroupNorm) and s is not None:
                    norm_blocks[s] = mod.num_groups
                    unzippable.add(s)
                params = ["weight", "bias"] + (["running_mean", "running_var"] if isinstance(mod, nn.modules.batchnorm._BatchNorm) else [])
                has_bn = has_bn or isinstance(mod, nn.modules.batchnorm._BatchNorm)
                for p in params:
                    if getattr(mod, p, None) is not None:
                        add(s, Member(f"{name}.{p}", 0, "out"))
                where[node] = (s, width)
            elif isinstance(mod, ELEMENTWISE_MODULES):
                where[node] = stream_of(node.args[0])
            elif isinstance(mod, nn.Flatten):
                where[node] = _flatten(node, stream_of(node.args[0]))
            else:
                raise MergeyardError(f"MuDSC: no rule for module {name!r} ({type(mod).__name__}); supported: Linear, "
                                     "Conv2d, BatchNorm, GroupNorm, LayerNorm, activations, pooling, Flatten")
        elif node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS:
            where[node] = stream_of(node.args[0])
        elif node.op == "call_function" and node.target is torch.flatten:
            where[node] = _flatten(node, stream_of(node.args[0]))
        elif node.op == "call_method" and node.target in ELEMENTWISE_METHODS:
            where[node] = stream_of(node.args[0])
        elif node.op == "call_method" and node.target in FLATTEN_METHODS:
            where[node] = _flatten(node, stream_of(node.args[0]))
        elif (node.op == "call_function" and node.target in ADD) or (node.op == "call_method" and node.target == "add"):
            tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
            if len(tensors) == 1:  # x + constant
                where[node] = stream_of(tensors[0])
                continue
            (sa, wa), (sb, wb) = stream_of(tensors[0]), stream_of(tensors[1])
            if wa != wb:
                raise MergeyardError(f"{node.name}: adds tensors whose units differ in width")
            if sa is None or sb is None:  # tied to the input: that stream cannot move
                for s in (sa, sb):
                    if s is not None:
                        streams.pinned[streams.find(s)] = True
                where[node] = (sa if sa is not None else sb, wa)
            else:
                where[node] = (streams.union(sa, sb), wa)
        elif node.op == "output":
            s, _ = stream_of(node.args[0])
            if s is not None:
                out_stream = streams.find(s)
                if outputs == "shared":
                    streams.pinned[out_stream] = True
                else:
                    concat_stream = out_stream
        elif node.op == "get_attr":
            raise MergeyardError(f"MuDSC: the module uses a raw parameter ({node.target}) outside a layer")
        else:
            raise MergeyardError(f"MuDSC: no rule for {node.op} {getattr(node.target, '__name__', node.target)} "
                                 f"(node {node.name!r})")

    groups: dict[int, Group] = {}
    for s_id in sorted(set(members) | set(probes)):
        root = streams.find(s_id)
        if streams.pinned[root] and root != concat_stream:
            continue  # tied to the input or the shared output: these units stay where they are
        g = groups.setdefault(root, Group(f"units{len(groups)}", streams.sizes[root]))
        g.members += tuple(members.get(s_id, ()))
        g.probes += tuple(probes.get(s_id, ()))
        g.zippable = g.zippable and s_id not in unzippable
        g.blocks = norm_blocks.get(s_id, g.blocks)
    if concat_stream is not None and concat_stream in groups:
        g = groups[concat_stream]
        g.name, g.kind, g.zippable, g.probes = "outputs", "concat", False, ()
    return PermutationSpec(type(module).__name__, [g for g in groups.values() if g.members], has_batchnorm=has_bn)


def _flatten(node, source: tuple[int | None, int]) -> tuple[int | None, int]:
    """Flattening (B, C, H, W) to (B, C·H·W): each channel becomes H·W consecutive features."""
    stream, width = source
    before = node.args[0].meta["tensor_meta"].shape
    after = node.meta["tensor_meta"].shape
    if len(before) == 2 and tuple(before) == tuple(after):
        return source
    if len(before) == 4 and len(after) == 2 and after[1] == before[1] * before[2] * before[3]:
        return stream, width * before[2] * before[3]
    raise MergeyardError(f"MuDSC: cannot follow units through reshape {node.name!r} ({tuple(before)} → {tuple(after)})")
