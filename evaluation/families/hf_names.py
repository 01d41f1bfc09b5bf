"""Checkpoint names ↔ module names of a transformers model.

transformers 5 renames modules internally and maps them back on save (ViT's
`encoder.layer.0.attention.attention.query` is the module `layers.0.attention.q_proj`):
checkpoints, and so merges, use the saved names; the module that scores them
uses its own. The map comes from transformers' own conversion (the one
`save_pretrained` applies), matched tensor by tensor. A conversion that fuses
or splits tensors (no one-to-one map) is refused with the model type named.
"""

from __future__ import annotations

import torch

from merging.errors import MergeyardError


def checkpoint_names(model: torch.nn.Module) -> dict[str, str]:
    """checkpoint (saved) name → module state-dict name, for every tensor `save_pretrained` writes."""
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # transformers 4 saves module names as they are
        return {k: k for k in state}
    module_of = {}
    for name, tensor in state.items():  # the first name of tied tensors: the one save_pretrained keeps
        module_of.setdefault((tensor.data_ptr(), tuple(tensor.shape), tensor.dtype, tensor.numel() and 1), name)
    saved = revert_weight_conversion(model, remove_tied_weights_from_state_dict(dict(state), model))
    out = {}
    for name, tensor in saved.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype, tensor.numel() and 1)
        if key not in module_of:
            raise MergeyardError(f"transformers saves {type(model).__name__} ({model.config.model_type}) with tensors "
                                 f"it converts, not renames ({name!r}); mergeyard cannot score it through this family")
        out[name] = module_of[key]
    return out
