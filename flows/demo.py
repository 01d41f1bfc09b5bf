"""`mergeyard demo`: a merge on checkpoints it makes itself, with every method.

Until the end-to-end pipeline exists, this is the main job: it writes a base
and a few seeded "fine-tuned" checkpoints (a small transformer-shaped state
dict), merges them with every registered method, and reports digests, timings
and how far each merge moved from the base.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from merging.checkpoint import Checkpoint
from merging.engine import MergeResult, run_merge
from merging.inputs import ProgressFn
from merging.methods import all_methods
from merging.recipe import parse_recipe

DEMO_PARAMS = {
    "average": {},
    "task_arithmetic": {"lambda": 0.3},
    "ties": {"density": 0.2, "lambda": 1.0},
    "dare_linear": {"drop_rate": 0.5, "lambda": 0.3},
    "dare_ties": {"drop_rate": 0.5, "lambda": 0.5},
}


def demo_state_dict(width: int, layers: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"embed.weight": torch.randn(512, width, generator=g) * 0.02}
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "attn.in_proj.weight"] = torch.randn(3 * width, width, generator=g) / width**0.5
        sd[p + "attn.out_proj.weight"] = torch.randn(width, width, generator=g) / width**0.5
        sd[p + "mlp.fc1.weight"] = torch.randn(4 * width, width, generator=g) / width**0.5
        sd[p + "mlp.fc2.weight"] = torch.randn(width, 4 * width, generator=g) / (4 * width) ** 0.5
        sd[p + "ln.weight"] = torch.ones(width)
        sd[p + "ln.bias"] = torch.zeros(width)
    sd["position_ids"] = torch.arange(64)
    return sd


def write_demo_checkpoints(root: Path, n_models: int = 4, width: int = 128, layers: int = 4) -> tuple[Path, list[Path]]:
    """A base and `n_models` fine-tunes: sparse, task-specific updates on top of the base."""
    root.mkdir(parents=True, exist_ok=True)
    base = demo_state_dict(width, layers, seed=0)
    base_path = root / "base.safetensors"
    save_file(base, str(base_path))
    paths = []
    for i in range(n_models):
        g = torch.Generator().manual_seed(1000 + i)
        tuned = {}
        for name, t in base.items():
            if t.is_floating_point():
                update = torch.randn(t.shape, generator=g) * 0.01
                update *= torch.rand(t.shape, generator=g) < 0.3  # each task touches a subset of weights
                tuned[name] = t + update
            else:
                tuned[name] = t
        path = root / f"task{i}.safetensors"
        save_file(tuned, str(path))
        paths.append(path)
    return base_path, paths


@dataclass
class DemoRow:
    method: str
    result: MergeResult
    distance_to_base: float


def distance(a: Path, b: Path) -> float:
    """‖θ_a − θ_b‖ over float tensors, read tensor by tensor."""
    ca, cb = Checkpoint(a), Checkpoint(b)
    total = 0.0
    for name in ca.names:
        if ca.entries[name].is_float:
            total += float(((ca.read(name).float() - cb.read(name).float()) ** 2).sum())
    return total**0.5


def run_demo(home: Path, progress: ProgressFn | None = None) -> list[DemoRow]:
    root = home / "demo"
    base, models = write_demo_checkpoints(root / "checkpoints")
    rows = []
    for spec in all_methods():
        recipe = parse_recipe({
            "method": spec.name,
            "base": str(base),
            "models": [str(p) for p in models],
            "parameters": DEMO_PARAMS.get(spec.name, {}),
        })
        out = root / "merged" / spec.name
        if out.exists():
            shutil.rmtree(out)
        result = run_merge(recipe, out, progress=progress)
        rows.append(DemoRow(spec.name, result, distance(out, base)))
    return rows
