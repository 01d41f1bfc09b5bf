"""Conventions of tensor names across checkpoint families: which layer a tensor belongs to, and which tensors are
embedding tables."""

from __future__ import annotations

import re
from typing import Iterable

# The layer index inside a tensor name: `model.layers.3.`, `encoder.layer.3.`, `h.3.` (GPT-2),
# `blocks.3.` / `resblocks.3.` (ViT, open_clip).
# Groups: the prefix up to the index, the index, the dot after it (merging.recipes.slices renumbers with them).
LAYER_NAME = re.compile(r"((?:^|\.)(?:layers|layer|h|blocks|resblocks)\.)(\d+)(\.)")

# Lookup tables, not linear maps: token, position and type embeddings (`word_embeddings`, `embed_tokens`,
# GPT-2's `wte`/`wpe`, open_clip's `positional_embedding`). A LoRA cannot adapt them and the SVD methods
# average them instead of decomposing them.
EMBEDDING_HINTS = ("embed", "wte", "wpe")


def is_embedding(name: str) -> bool:
    return any(h in name for h in EMBEDDING_HINTS)


def layer_index(name: str) -> int | None:
    match = LAYER_NAME.search(name)
    return int(match.group(2)) if match else None


def layer_positions(names: Iterable[str]) -> dict[str, float]:
    """t of every tensor: its layer's index over (layers − 1), 0 outside the layers; 1 when there is one layer."""
    names = list(names)
    indices = {n: layer_index(n) for n in names}
    count = max((i for i in indices.values() if i is not None), default=-1) + 1
    return {n: 0.0 if i is None else (i / (count - 1) if count > 1 else 1.0) for n, i in indices.items()}
