"""LoRA adapters as merge inputs: the task vector scaling·B@A of each weight, formed tensor by tensor.

What a registry stores for a PEFT adapter (`mergeyard ingest ADAPTER --base BASE`) is one safetensors file
holding, for every base weight W the adapter changes:

    W.lora_A        (r × in)    the down projection, in the orientation of W as stored
    W.lora_B        (out × r)   the up projection
    W.lora_scaling  ([1] fp32)  PEFT's alpha / r (or alpha / √r with rsLoRA, per-module patterns applied)

so the digest covers every number that decides the adapted weights, and PEFT's naming (`base_model.model.`,
the adapter name, fan-in-fan-out layers) is resolved once at ingest. While merging, an adapter is read as its
base with W + scaling·B@A in place of W, row range by row range: the full fine-tuned model never exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from merging.checkpoints.checkpoint import Checkpoint
from merging.errors import CheckpointError

CONFIG_NAME = "adapter_config.json"
ADAPTER_ARCHITECTURE = "peft-lora"  # what the registry records as an ingested adapter's architecture
WEIGHTS_NAME = "adapter_model.safetensors"
A, B, SCALING = ".lora_A", ".lora_B", ".lora_scaling"
SUFFIXES = (A, B, SCALING)
_PEFT_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def is_peft_adapter(path: Path) -> bool:
    """A PEFT adapter directory (`save_pretrained`'s layout)."""
    path = path if hasattr(path, "is_dir") else Path(path)  # a UPath on object storage stays one
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def is_adapter(ckpt: Checkpoint) -> bool:
    """A checkpoint in mergeyard's stored adapter form."""
    return bool(ckpt.entries) and all(n.endswith(SUFFIXES) for n in ckpt.entries)


def targets(ckpt: Checkpoint) -> list[str]:
    """The base weights an adapter (stored form) changes."""
    return sorted(n[: -len(A)] for n in ckpt.entries if n.endswith(A))


def _pattern_value(patterns: dict, module: str, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): a key matches a module whose name ends in it at a dot
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_peft(path: Path) -> dict[str, torch.Tensor]:
    """A PEFT LoRA adapter directory in the stored form (tensors by name); a one-line error for what it cannot be."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / CONFIG_NAME}: not a readable adapter config ({exc})") from None
    kind = str(config.get("peft_type", "")).upper()
    refusals = [
        (kind != "LORA", f"a {kind or 'untyped'} adapter (only LoRA adapters are merged)"),
        (bool(config.get("use_dora")), "DoRA (use_dora: true) rescales whole weights, not a low-rank task vector"),
        (bool(config.get("modules_to_save")), "modules_to_save (full copies of modules) alongside the LoRA"),
        (config.get("bias", "none") != "none", f"bias: {config.get('bias')!r} (trained biases) alongside the LoRA"),
    ]
    for refused, why in refusals:
        if refused:
            raise CheckpointError(f"{path}: {why}; mergeyard cannot merge it")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        other = sorted(p.name for p in path.glob("adapter_model.*"))
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME}" + (f" (found {', '.join(other)}: pickled adapters are "
                                                              "refused; save it with safe_serialization)" if other else ""))
    raw = Checkpoint(weights)
    pairs: dict[str, dict[str, str]] = {}
    for name in raw.names:
        if "lora_embedding_" in name or "lora_magnitude" in name:
            raise CheckpointError(f"{path}: tensor {name!r} (LoRA on an embedding, or DoRA) is not merged; "
                                  "adapt linear layers only")
        match = _PEFT_NAME.match(name)
        if match is None:
            raise CheckpointError(f"{path}: tensor {name!r} is not a LoRA A or B matrix")
        pairs.setdefault(match["module"], {})[match["which"]] = name
    if not pairs:
        raise CheckpointError(f"{path}: the adapter holds no LoRA matrices")
    out: dict[str, torch.Tensor] = {}
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for module, names in sorted(pairs.items()):
        if set(names) != {"A", "B"}:
            raise CheckpointError(f"{path}: module {module!r} has lora_{next(iter(names))} but not its partner")
        a, b = raw.read(names["A"]), raw.read(names["B"])
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{path}: module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                                  "are not a rank-r pair (conv LoRA is not merged)")
        rank = a.shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
        scaling = alpha / (rank ** 0.5) if config.get("use_rslora") else alpha / rank
        if fan_in_fan_out:  # the weight is stored transposed (GPT-2's Conv1D): ΔW as stored = (B@A)ᵀ = Aᵀ Bᵀ
            a, b = b.T, a.T
        target = module + ".weight"
        out[target + A] = a.contiguous()
        out[target + B] = b.contiguous()
        out[target + SCALING] = torch.tensor([scaling], dtype=torch.float32)
    return out


def check_against_base(adapter: Checkpoint, base: Checkpoint, label: str, base_label: str) -> None:
    """Every weight the adapter changes is a 2-D float tensor of the base with the shape B@A has."""
    for target in targets(adapter):
        rows, rank = adapter.entries[target + B].shape
        cols = adapter.entries[target + A].shape[1]
        entry = base.entries.get(target)
        if entry is None:
            raise CheckpointError(f"{label}: adapts {target!r}, which {base_label} does not have; is this the "
                                  "adapter's base?")
        if tuple(entry.shape) != (rows, cols) or not entry.is_float:
            raise CheckpointError(f"{label}: adapts {target!r} as {rows}×{cols}, but {base_label} holds it as "
                                  f"{'×'.join(map(str, entry.shape))} {entry.dtype}; is this the adapter's base?")


class LoraView(Checkpoint):
    """A base checkpoint with an adapter's task vector added to the weights it targets, read as the base is."""

    def __init__(self, adapter: Checkpoint, base: Checkpoint, label: str | None = None, base_label: str | None = None):
        check_against_base(adapter, base, label or str(adapter.path), base_label or str(base.path))
        self._base, self._adapter = base, adapter
        self._target = {t: t for t in targets(adapter)}  # a (renamed) weight → its name in the adapter
        # adapters are small (r·(in+out) per weight): held in memory, in float32 as the merge computes
        self._deltas = {t: (adapter.read(t + A).float(), adapter.read(t + B).float(), float(adapter.read(t + SCALING)[0]))
                        for t in targets(adapter)}
        self._adopt(adapter.path)

    def _adopt(self, path: Path) -> None:
        base = self._base
        self.path, self.files, self.metadata = path, base.files, base.metadata
        self.entries, self._file_of, self._source, self._handles = base.entries, base._file_of, base._source, base._handles

    def renamed(self, mapping: dict[str, str]) -> "LoraView":
        view = object.__new__(LoraView)
        view._base, view._adapter = self._base.renamed(mapping), self._adapter
        view._deltas = {new: self._deltas[old] for new, old in mapping.items() if old in self._deltas}
        view._target = {new: self._target[old] for new, old in mapping.items() if old in self._target}
        view._adopt(self.path)
        return view

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        stored = self._base.read(name, rows)
        delta = self._deltas.get(name)
        if delta is None:
            return stored
        a, b, scaling = delta
        if rows is not None:
            b = b[rows]
        # as PEFT's merge: W + (B@A)·scaling, added in float32 and stored back in the weight's dtype
        return (stored.float() + (b @ a) * scaling).to(stored.dtype)

    def locate(self, name: str) -> list[tuple[Path, int, int, str]]:
        """The base's bytes, and the adapter's A, B and scaling where it adapts this weight."""
        out = self._base.locate(name)
        if name in self._target:
            out += [r for suffix in (A, B, SCALING) for r in self._adapter.locate(self._target[name] + suffix)]
        return out

    def iter_raw(self, name: str, block_bytes: int = 64 << 20):
        raise CheckpointError(f"{self.path}: an adapter applied to its base has no stored bytes; its digest is the "
                              "adapter's own")
