"""Layer slices: a model stacked from layer ranges of several models (mergekit's `passthrough` frankenmerges).

    slices:
      - {model: ./orca-mini, layer_range: [0, 24]}
      - {model: ./platypus, layer_range: [20, 40]}

The output's layers are the slices' layers in order, renumbered from 0 (44
here). Tensors outside the layers come, as in mergekit, from the first
slice's model when they precede the layers (embeddings: a name holding
`embed`, `wte` or `wpe`) and from the last slice's model otherwise (the final
norm, the head). The output config's layer count is the new one.
"""

from __future__ import annotations

import json
from pathlib import Path

from merging.checkpoints.checkpoint import Checkpoint
from merging.errors import CheckpointError, RecipeError
from merging.checkpoints.names import LAYER_NAME, is_embedding, layer_index

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_count(ckpt: Checkpoint) -> int:
    return max((i for i in (layer_index(n) for n in ckpt.names) if i is not None), default=-1) + 1


def stack(sources: list[tuple[Checkpoint, tuple[int, int], str]]) -> Checkpoint:
    """One checkpoint view of `sources` (checkpoint, [start, end) layer range, label), layers renumbered."""
    mapping: dict[str, tuple[Checkpoint, str]] = {}
    out_layer = 0
    for ckpt, (start, end), label in sources:
        count = layer_count(ckpt)
        if not 0 <= start < end <= count:
            raise RecipeError(f"slice of {label}: layer_range [{start}, {end}] is outside its {count} layers")
        by_layer: dict[int, list[str]] = {}
        for name in ckpt.names:
            i = layer_index(name)
            if i is not None:
                by_layer.setdefault(i, []).append(name)
        for layer in range(start, end):
            for name in by_layer.get(layer, []):
                new = LAYER_NAME.sub(lambda m: f"{m.group(1)}{out_layer}{m.group(3)}", name, count=1)
                mapping[new] = (ckpt, name)
            out_layer += 1
    first, last = sources[0][0], sources[-1][0]
    for name in first.names:
        if layer_index(name) is None and is_embedding(name):
            mapping[name] = (first, name)
    for name in last.names:
        if layer_index(name) is None and not is_embedding(name):
            mapping[name] = (last, name)
    return Checkpoint.joined(mapping)


def stacked_config(config_file: Path, layers: int) -> str:
    """The config of the slices' first model with the new layer count."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_file}: cannot read the config to update its layer count ({exc})") from None
    keys = [k for k in LAYER_COUNT_KEYS if k in config]
    if not keys:
        raise CheckpointError(f"{config_file}: names no layer count ({', '.join(LAYER_COUNT_KEYS)}); a stacked model's "
                              "config must be updated")
    for key in keys:
        config[key] = layers
    return json.dumps(config, indent=2, sort_keys=True) + "\n"
