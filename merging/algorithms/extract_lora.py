"""A model's difference from its base as a PEFT LoRA adapter: a truncated SVD of every linear weight's change.

For each 2-D weight W of the model that differs from the base's W₀, ΔW = W − W₀ = U S Vᵀ; the adapter keeps the
top r singular directions, B = U_r S_r (out × r) and A = V_rᵀ (r × in), with lora_alpha = r so PEFT's scaling is
1 and B@A is the best rank-r approximation of ΔW (Eckart–Young): its error is √(Σ_{i>r} s_i²), which is what the
report gives per weight. Large weights use a randomized SVD (see `_low_rank`) and report the error measured. Embeddings and 1-D tensors (norms, biases) are not linear layers' weights; where they
differ from the base the report names them, since the adapter cannot carry them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from merging.runtime.atomic import atomic_directory
from merging.checkpoints.checkpoint import Checkpoint
from merging.errors import CheckpointError, MergeyardError
from merging.checkpoints.lora import CONFIG_NAME, WEIGHTS_NAME
from merging.checkpoints.names import is_embedding



@dataclass
class Extracted:
    """What `extract_lora` wrote and how close it is."""

    rank: int
    modules: dict[str, dict] = field(default_factory=dict)  # module → {error, relative_error, norm}
    left_out: dict[str, float] = field(default_factory=dict)  # tensor that differs but is not adapted → max |Δ|

    @property
    def worst_relative_error(self) -> float:
        return max((m["relative_error"] for m in self.modules.values()), default=0.0)


def _is_linear_weight(name: str, model: Checkpoint, base: Checkpoint) -> bool:
    entry = model.entries[name]
    return (name.endswith(".weight") and len(entry.shape) == 2 and entry.is_float and name in base.entries
            and base.entries[name].shape == entry.shape and not is_embedding(name))


def _low_rank(delta: torch.Tensor, rank: int, exact_up_to: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """B (out × rank), A (rank × in) with B@A ≈ ΔW, the Frobenius error of that and ‖ΔW‖.

    Up to `exact_up_to` on the short side: the exact SVD in float64, whose error is √(Σ_{i>r} s_i²). Larger
    weights (an LLM's 4096 × 11008) take a randomized range finder (`torch.svd_lowrank`, r + 8 directions, four
    power iterations) in float32 — minutes instead of hours for a 7B model — and the error is measured, not
    assumed: ‖ΔW − B@A‖."""
    rows, cols = delta.shape
    keep = min(rank, rows, cols)
    b = torch.zeros(rows, rank, dtype=torch.float64)
    a = torch.zeros(rank, cols, dtype=torch.float64)
    if min(rows, cols) <= exact_up_to or 4 * rank >= min(rows, cols):
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        b[:, :keep] = u[:, :keep] * s[:keep]
        a[:keep] = vh[:keep]
        return b.float(), a.float(), float(s[keep:].pow(2).sum().sqrt()), float(s.pow(2).sum().sqrt())
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the same adapter from the same weights, every time
    try:
        u, s, v = torch.svd_lowrank(delta.float(), q=min(keep + 8, rows, cols), niter=4)
    finally:
        torch.random.set_rng_state(generator_state)
    b[:, :keep] = (u[:, :keep] * s[:keep]).double()
    a[:keep] = v[:, :keep].T.double()
    b, a = b.float(), a.float()
    return b, a, float(torch.linalg.matrix_norm(delta - b @ a)), float(torch.linalg.matrix_norm(delta))


def extract_lora(model: Checkpoint, base: Checkpoint, rank: int, out: Path, *, base_name: str | None = None,
                 overwrite: bool = False, progress: Callable[[str, int, int], None] | None = None,
                 exact_up_to: int = 1024) -> Extracted:
    """Write the PEFT adapter (adapter_config.json, adapter_model.safetensors) of `model` over `base` to `out`."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    if rank < 1:
        raise MergeyardError(f"--rank must be at least 1 (got {rank})")
    if Path(out).exists() and not overwrite:
        raise MergeyardError(f"{out} exists; choose another directory or pass --overwrite")
    missing = [n for n in model.names if model.entries[n].is_float and n not in base.entries]
    if missing:
        raise CheckpointError(f"{model.path}: {len(missing)} tensors are not in the base {base.path} (first: "
                              f"{missing[0]!r}); is this the model's base?")
    result = Extracted(rank)
    tensors: dict[str, torch.Tensor] = {}
    names = model.names
    for i, name in enumerate(names):
        if progress:
            progress("extract", i + 1, len(names))
        if not model.entries[name].is_float:
            continue
        delta = model.read(name).float() - base.read(name).float()
        if delta.shape != base.entries[name].shape or not bool(delta.any()):
            continue
        if not _is_linear_weight(name, model, base):
            result.left_out[name] = float(delta.abs().max())
            continue
        b, a, error, norm = _low_rank(delta, rank, exact_up_to)
        module = name.removesuffix(".weight")
        result.modules[module] = {"error": error, "norm": norm, "relative_error": error / norm if norm else 0.0}
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    if not tensors:
        raise MergeyardError(f"{model.path}: no linear weight differs from the base; there is nothing to extract")
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(result.modules), lora_dropout=0.0, bias="none",
                        base_model_name_or_path=base_name or str(base.path))
    with atomic_directory(Path(out), replace=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        if not (tmp / CONFIG_NAME).is_file():  # peft's own writer names it; be sure of the name we read back
            raise MergeyardError(f"peft wrote no {CONFIG_NAME}")
        (tmp / "extraction.json").write_text(json.dumps({"rank": rank, "modules": result.modules,
                                                          "left_out": result.left_out}, indent=1))
    return result
