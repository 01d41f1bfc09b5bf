"""The two similarity spaces MuDSC mixes: activations on calibration data, and weights.

Activation similarity: forward hooks read each group's units on the same
calibration inputs in every model; the (K·n)² correlation of units across all
models accumulates batch by batch in float64 (memory is a matrix per group,
never the activations of a model).

Weight similarity: a unit's weight vector is every slice of every tensor that
holds or reads it, with the tensor's other grouped axes moved into the merged
units (so it depends on the other groups' matchings: hence coordinate ascent),
each tensor scaled to unit norm so a bias counts as much as a matrix. Units
compare by cosine, so both spaces lie in [−1, 1] and `alpha` mixes like with like.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from merging.algorithms.mudsc.spec import Group, PermutationSpec
from merging.algorithms.mudsc.transform import Matching, Mover
from merging.algorithms.grad_free import without_grad


class _Moments:
    def __init__(self, units: int):
        self.sum = torch.zeros(units, dtype=torch.float64)
        self.outer = torch.zeros(units, units, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.to(torch.float64)
        self.sum += x.sum(0)
        self.outer += x.T @ x
        self.count += x.shape[0]

    def correlation(self) -> np.ndarray:
        mean = self.sum / self.count
        cov = self.outer / self.count - torch.outer(mean, mean)
        std = cov.diagonal().clamp(min=0).sqrt()
        corr = cov / (torch.outer(std, std) + 1e-12)
        dead = std < 1e-8  # a unit that never varies matches nothing in particular
        corr[dead, :] = 0.0
        corr[:, dead] = 0.0
        return corr.numpy()


@without_grad
def activation_similarity(spec: PermutationSpec, modules: list[torch.nn.Module], batches: Iterable[torch.Tensor],
                          progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Per group with probes: the (K·n × K·n) correlation of its units over the calibration inputs."""
    k = len(modules)
    groups = [g for g in spec.groups if g.probes]
    moments = {g.name: _Moments(k * g.size) for g in groups}
    captured: list[dict[tuple[str, int], torch.Tensor]] = [dict() for _ in range(k)]
    handles = []
    for m, module in enumerate(modules):
        for g in groups:
            for p_index, probe in enumerate(g.probes):
                target = module.get_submodule(probe.module)

                def hook(mod, args, output, m=m, g=g, p_index=p_index, probe=probe):
                    x = args[0] if probe.where == "input" else output
                    captured[m][(g.name, p_index)] = probe.features(x.detach(), modules[m]).to(torch.float32)

                handles.append(target.register_forward_hook(hook))
    try:
        for n_batch, batch in enumerate(batches):
            for m, module in enumerate(modules):
                captured[m].clear()
                module(batch)
            for g in groups:
                for p_index in range(len(g.probes)):
                    feats = [captured[m][(g.name, p_index)] for m in range(k)]
                    moments[g.name].add(torch.cat(feats, dim=1))
            if progress:
                progress(n_batch + 1)
    finally:
        for h in handles:
            h.remove()
    return {name: mom.correlation() for name, mom in moments.items()}


def unit_rows(group: Group, mover: Mover, state: dict[str, torch.Tensor], model: int,
              matchings: dict[str, Matching], skip: frozenset[str]) -> torch.Tensor:
    """units × D: the group's units' weight vectors in one model, other groups' axes in the merged units."""
    if group.weight_features is not None:
        return group.weight_features(lambda name: mover.to_merged(name, state[name].float(), model, matchings,
                                                                  skip=skip))
    parts = []
    for member in group.members:
        x = mover.to_merged(member.tensor, state[member.tensor].float(), model, matchings, skip=skip)
        x = x.movedim(member.axis, 0)
        x = x[member.offset:member.offset + group.size * member.width].reshape(group.size, -1)
        parts.append(x / (x.norm() + 1e-12))
    return torch.cat(parts, dim=1)


def weight_similarity(spec: PermutationSpec, group: Group, states: list[dict[str, torch.Tensor]],
                      matchings: dict[str, Matching], mover: Mover) -> np.ndarray:
    """(K·n × K·n) cosine similarity of the units' weight vectors."""
    # The group's own axes (and those of groups that follow it block-wise) stay in each model's order.
    skip = frozenset([group.name] + [g.name for g in spec.groups if g.parent == group.name])
    rows = torch.cat([unit_rows(group, mover, s, m, matchings, skip) for m, s in enumerate(states)])
    rows = rows / (rows.norm(dim=1, keepdim=True) + 1e-12)
    return (rows.double() @ rows.double().T).numpy()
