"""MuDSC (Xu et al., CVPR 2024, arXiv 2403.01753): merging models trained from different initialisations.

Hidden units of independently trained networks are not in corresponding
order, so averaging their weights averages unrelated units. MuDSC matches
units first, under a similarity that mixes both spaces in which two units can
agree:

    S = α · S_weight + (1 − α) · S_activation

and merges only then. `align` matches every model to the first by a linear
assignment per group (Git Re-Basin's weight matching at α = 1, activation
matching at α = 0); `zip` clusters units greedily, within a model too (ZipIt),
where the architecture allows more than a permutation. Weight similarity of a
group depends on the other groups' matchings, so the groups are re-matched in
turn (coordinate ascent) until a sweep changes nothing or stops improving the
summed matched similarity. BatchNorm statistics are re-estimated on the
calibration data afterwards: the merged units' statistics are not the mean of
the originals'.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from merging.errors import MergeyardError
from merging.algorithms.mudsc import matching as M
from merging.algorithms.mudsc.similarity import activation_similarity, weight_similarity
from merging.algorithms.mudsc.spec import Group, PermutationSpec
from merging.algorithms.mudsc.transform import Matching, Mover, merge_states
from merging.algorithms.grad_free import without_grad

Progress = Callable[[str, int, int], None] | None


class MuDSCParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    alpha: float = Field(0.5, ge=0, le=1, description="weight of weight-space similarity (1: weight matching, "
                                                       "0: activation matching)")
    mode: Literal["align", "zip"] = Field("align", description="permute onto the first model, or zip units (ZipIt)")
    within_model: float = Field(1.0, ge=0, le=1, description="zip: how much merging two units of one model counts")
    max_sweeps: int = Field(20, ge=1, description="coordinate-ascent sweeps over the groups at most")
    reset_batchnorm: bool = Field(True, description="re-estimate BatchNorm statistics on the calibration data")


@dataclass
class MuDSCResult:
    state: dict[str, torch.Tensor]
    matchings: dict[str, Matching]
    objective: list[float] = field(default_factory=list)  # summed matched similarity after each sweep
    sweeps: int = 0
    spec: PermutationSpec | None = None

    def summary(self) -> dict:
        """What lineage records: per group, how many of each model's units moved, whether units of one model
        were zipped together, and a digest of the matching itself."""
        groups = {}
        for g in self.spec.groups if self.spec else []:
            t = self.matchings[g.name].target
            k, n = t.shape
            entry = {"kind": g.kind, "units": n, "moved": [int((t[i] != torch.arange(n)).sum()) for i in range(k)],
                     "digest": hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]}
            within = sum(n - len(torch.unique(t[i])) for i in range(k))
            if within:
                entry["within_model_merges"] = int(within)
            groups[g.name] = entry
        return {"groups": groups, "sweeps": self.sweeps, "objective": [round(v, 6) for v in self.objective]}


def _order(spec: PermutationSpec) -> list[Group]:
    """Parents before the groups that follow them block-wise."""
    return [g for g in spec.groups if g.parent is None] + [g for g in spec.groups if g.parent is not None]


def _match(group: Group, sim: np.ndarray, k: int, params: MuDSCParams,
           matchings: dict[str, Matching]) -> Matching:
    n = group.size
    if group.parent is not None:
        target, value = M.align_within(sim, matchings[group.parent].target, k, n)
    elif params.mode == "zip" and group.zippable and group.kind == "units":
        target, value = M.zip_units(sim, k, n, params.within_model)
    else:
        target, value = M.align(sim, k, n, group.blocks)
    return Matching(target, n, value)


def mudsc(states: Sequence[dict[str, torch.Tensor]], spec: PermutationSpec,
          create_model: Callable[[], torch.nn.Module], calibration: Iterable[torch.Tensor] | None,
          params: MuDSCParams | None = None, weights: Sequence[float] | None = None,
          progress: Progress = None, create_merged: Callable[[], torch.nn.Module] | None = None) -> MuDSCResult:
    """Match the models' units under the mixed similarity and merge them. `calibration` yields model inputs
    (needed unless alpha is 1 and there is no BatchNorm); `create_model()` builds the models' architecture,
    `create_merged()` the merged one where it differs (outputs stacked per model)."""
    params = params or MuDSCParams()
    states = [{k: v.detach().to(torch.float32) if v.is_floating_point() else v for k, v in s.items()} for s in states]
    k = len(states)
    if k < 2:
        raise MergeyardError("MuDSC merges at least two models")
    weights = list(weights) if weights is not None else [1.0] * k
    for s in states:
        spec.check(s)
    batches = list(calibration) if calibration is not None else []
    needs_data = params.alpha < 1 or (spec.has_batchnorm and params.reset_batchnorm)
    if needs_data and not batches:
        raise MergeyardError("MuDSC needs calibration data for activation similarity and BatchNorm statistics "
                             "(or alpha: 1 on a model without BatchNorm)")

    activation: dict[str, np.ndarray] = {}
    if params.alpha < 1:
        modules = [_load(create_model, s) for s in states]
        activation = activation_similarity(spec, modules, batches,
                                           (lambda i: progress("MuDSC activations", i, len(batches))) if progress else None)
    matchings = {g.name: Matching(M.concat_target(k, g.size) if g.kind == "concat" else M.identity_target(k, g.size),
                                  k * g.size if g.kind == "concat" else g.size) for g in spec.groups}
    mover = Mover(spec)
    order = [g for g in _order(spec) if g.kind != "concat"]
    result = MuDSCResult({}, matchings, spec=spec)
    best_value, best = -np.inf, dict(matchings)
    for sweep in range(params.max_sweeps):
        changed = False
        value = 0.0  # each group's matched similarity, measured when it was matched (the others as they were)
        for i, g in enumerate(order):
            sim = _mixed(g, spec, states, matchings, mover, activation, params.alpha)
            new = _match(g, sim, k, params, matchings)
            if not torch.equal(new.target, matchings[g.name].target):
                changed = True
            matchings[g.name] = new
            value += new.value
            if progress:
                progress(f"MuDSC sweep {sweep + 1}", i + 1, len(order))
        result.objective.append(value)
        result.sweeps = sweep + 1
        improved = sweep == 0 or value > best_value + 1e-9 * max(1.0, abs(best_value))
        if improved:
            best_value, best = value, dict(matchings)
        # activation similarity does not depend on the other groups: one sweep settles it
        if not changed or not improved or params.alpha == 0:
            break
    result.matchings = best
    result.state = merge_states(states, weights, spec, best)
    if spec.has_batchnorm and params.reset_batchnorm:
        result.state = reset_batchnorm(create_merged or create_model, result.state, batches)
    return result


def _mixed(group: Group, spec: PermutationSpec, states, matchings, mover, activation, alpha: float) -> np.ndarray:
    act = activation.get(group.name)
    if alpha == 0 and act is not None:
        return act
    weight = weight_similarity(spec, group, states, matchings, mover)
    if act is None:
        return weight
    return alpha * weight + (1 - alpha) * act


def _load(create_model: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor]) -> torch.nn.Module:
    module = create_model()
    module.load_state_dict(state)
    return module.eval()


@without_grad
def reset_batchnorm(create_model: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor],
                    batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every BatchNorm's running mean and (unbiased) variance set to those of its inputs over all calibration
    samples, layer by layer in evaluation mode, so each layer's statistics are what it will see at inference
    (the layers before it already re-estimated), whatever the batch sizes."""
    module = _load(create_model, state)
    for bn in [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]:
        total, squares, count = 0.0, 0.0, 0

        def hook(mod, args):
            nonlocal total, squares, count
            x = args[0].double()
            x = x.transpose(0, 1).reshape(x.shape[1], -1)  # channels × (samples · positions)
            total, squares, count = total + x.sum(1), squares + (x * x).sum(1), count + x.shape[1]

        handle = bn.register_forward_pre_hook(hook)
        try:
            for batch in batches:
                module(batch)
        finally:
            handle.remove()
        mean = total / count
        var = (squares - count * mean * mean) / max(count - 1, 1)
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.clamp(min=0).to(bn.running_var.dtype))
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(len(batches))
    out = dict(state)
    for name, value in module.state_dict().items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            out[name] = value.detach().clone()
    return out
