"""MuDSC: matching hidden units of models trained from different initialisations, then merging them.

    spec = permutation_spec(module, example_input)       # groups derived from the architecture
    result = mudsc([state_a, state_b], spec, create_model, calibration_batches, MuDSCParams(alpha=0.5))
    result.state                                         # the merged state dict

See `algorithm` for the method, `spec` for permutation groups, `vit` and `trace` for the architectures.
"""

from __future__ import annotations

import torch

from merging.algorithms.mudsc.algorithm import MuDSCParams, MuDSCResult, mudsc, reset_batchnorm
from merging.algorithms.mudsc.spec import Group, Member, PermutationSpec, Probe
from merging.algorithms.mudsc.transform import Matching, merge_states


def permutation_spec(module: torch.nn.Module, example: torch.Tensor | None = None,
                     outputs: str = "shared") -> PermutationSpec:
    """The permutation groups of `module`: its own `permutation_spec(outputs)` if it has one, an open_clip
    VisionTransformer by its structure, anything else by tracing it with torch.fx on `example` (an input batch)."""
    from merging.algorithms.mudsc.vit import is_vision_transformer, vit_spec

    if callable(getattr(module, "permutation_spec", None)):  # a module that knows its own groups
        return module.permutation_spec(outputs)
    if is_vision_transformer(module):
        return vit_spec(module, outputs="aligned" if outputs == "concat" else outputs)
    from merging.errors import MergeyardError
    from merging.algorithms.mudsc.trace import traced_spec

    if example is None:
        raise MergeyardError("deriving permutation groups by tracing needs an example input batch")
    return traced_spec(module, example, outputs)


__all__ = ["Group", "Matching", "Member", "MuDSCParams", "MuDSCResult", "PermutationSpec", "Probe", "merge_states",
           "mudsc", "permutation_spec", "reset_batchnorm"]
