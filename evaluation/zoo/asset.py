"""The committed pre-trained zoo CLIP: a small versioned asset every other zoo step builds from.

Pre-training takes tens of CPU minutes, so it runs once (`mergeyard zoo
pretrain`) and its result is committed in float16 beside a JSON record of its
digest and the exact command that regenerates it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from evaluation.zoo.clip_model import create_clip, vocab_digest
from merging.checkpoints.digest import checkpoint_digest
from merging.errors import MergeyardError

ASSET_DIR = Path(__file__).resolve().parent / "assets"
ASSET_NAME = "zoo-clip-v1"


def asset_paths(directory: Path = ASSET_DIR, name: str = ASSET_NAME) -> tuple[Path, Path]:
    return directory / f"{name}.safetensors", directory / f"{name}.json"


def save_asset(clip: torch.nn.Module, record: dict, directory: Path = ASSET_DIR, name: str = ASSET_NAME) -> dict:
    weights, meta = asset_paths(directory, name)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in clip.state_dict().items()}
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(weights)
    record = {**record, "digest": checkpoint_digest(weights), "vocab_digest": vocab_digest(), "bytes": weights.stat().st_size}
    meta.write_text(json.dumps(record, indent=2) + "\n")
    return record


def load_asset(directory: Path = ASSET_DIR, name: str = ASSET_NAME) -> tuple[torch.nn.Module, dict]:
    weights, meta = asset_paths(directory, name)
    if not weights.is_file():
        raise MergeyardError(f"no pre-trained zoo CLIP at {weights}; run `mergeyard zoo pretrain`")
    record = json.loads(meta.read_text())
    if checkpoint_digest(weights) != record["digest"]:
        raise MergeyardError(f"{weights} does not match the digest recorded in {meta.name}; regenerate it with: "
                             f"{record.get('command', 'mergeyard zoo pretrain')}")
    if record.get("vocab_digest") != vocab_digest():
        raise MergeyardError(f"{weights} was trained on another task vocabulary; regenerate it with: {record.get('command')}")
    clip = create_clip()
    clip.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()})
    return clip.eval(), record
