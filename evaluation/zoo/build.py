"""`mergeyard zoo build`: the base image tower and one fine-tune per task, with a manifest.

Everything derives from the committed pre-trained CLIP asset and a seed; a
build whose key (generator version, seed, size, asset digest, fine-tune
settings) matches the manifest already there is reused, not redone. The
directory appears whole or not at all (temp + rename).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from evaluation.evaluator import evaluate_state
from evaluation.suites import load_suite
from evaluation.zoo.asset import load_asset
from evaluation.zoo.clip_model import logit_scale
from evaluation.zoo.data import GENERATOR_VERSION
from evaluation.zoo.tasks import TA8_MINI, TASKS
from evaluation.zoo.train import FinetuneSettings, finetune
from merging.checkpoints.digest import checkpoint_digest

Progress = Callable[[str, int, int], None] | None


# The eight targets: AdamW with eps 2e-2 at a 10x larger peak lr. Entries with small gradients then move as
# under SGD (little) while large ones stay Adam-bounded, so a task vector concentrates in few entries, as TIES
# assumes; with the default eps every entry moves ~lr per step and TIES's trim cuts the fine-tune itself
# (bench/zoo_diagnosis.py measures both). The eps was chosen when fine-tunes ran at logit scale 100, where it
# was about the median per-entry gradient at the first step; at the CLIP's own scale (27.5) that median is
# 3-7e-3, so more entries move as under SGD.
FULL = FinetuneSettings(steps=400, lr=3e-3, batch=128, per_class=600, eps=2e-2)
# TA8's own protocol gives each dataset its own budget (epochs from 4 for SVHN to 76 for DTD). Here the
# tasks whose small training set overfits short of 90% on their own test split get more images
# (measured with plain AdamW: 200 images a class plateau at 82-88% however long the fine-tune; 1500 reach 90-91%).
FULL_TARGETS = {
    "digits": replace(FULL, per_class=1500),
    "counts": replace(FULL, per_class=1500),
    "letters": replace(FULL, per_class=2000),
}
# The 14 tasks outside ta8-mini only serve as extra candidates (irrelevant, or related to a target): a
# shorter fine-tune keeps the full build within ten CPU minutes.
FULL_OTHERS = FinetuneSettings(steps=80, lr=5e-4, batch=128, per_class=150)
SMALL = FinetuneSettings(steps=150, lr=5e-4, batch=64, per_class=80)
SMALL_TASKS = TA8_MINI[:4]


def settings_for(task: str, small: bool) -> FinetuneSettings:
    if small:
        return SMALL
    if task in TA8_MINI:
        return FULL_TARGETS.get(task, FULL)
    return FULL_OTHERS


def _save_state(state: dict[str, torch.Tensor], directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return checkpoint_digest(directory / "model.safetensors")


def build_zoo(out_dir: Path, *, small: bool = False, seed: int = 0, progress: Progress = None) -> dict:
    out_dir = Path(out_dir)
    clip, asset = load_asset()
    tasks = SMALL_TASKS if small else tuple(TASKS)
    key = {"generator": GENERATOR_VERSION, "seed": seed, "small": small, "asset": asset["digest"],
           "logit_scale": logit_scale(clip), "finetune": {t: asdict(settings_for(t, small)) for t in tasks},
           "tasks": list(tasks)}
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") == key:
            return manifest
    started = time.perf_counter()
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        base_state = {k: v.detach().clone() for k, v in clip.visual.state_dict().items()}
        manifest = {"key": key, "base": {"path": "base", "digest": _save_state(base_state, tmp / "base")},
                    "zero_shot": {}, "finetuned": {}}
        for task in tasks:
            suite = load_suite(f"zoo:{task}", seed=seed)
            manifest["zero_shot"][task] = evaluate_state(base_state, suite).tasks[0].accuracy
            settings = settings_for(task, small)
            state = finetune(clip, task, settings, seed=seed, progress=progress)
            digest = _save_state(state, tmp / "finetuned" / task)
            accuracy = evaluate_state(state, suite).tasks[0].accuracy
            manifest["finetuned"][task] = {"path": f"finetuned/{task}", "digest": digest, "accuracy": accuracy,
                                           "seed": seed, **asdict(settings)}
        manifest["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def build_extra_finetunes(zoo_dir: Path, tasks: list[str], seeds: list[int], *, progress: Progress = None) -> dict[str, Path]:
    """More fine-tunes of the same tasks from other seeds (FW-Merging's "more relevant candidates"), beside a
    built zoo under `extra/`, each written whole or not at all and reused when present."""
    zoo_dir = Path(zoo_dir)
    manifest = json.loads((zoo_dir / "manifest.json").read_text())
    clip, _ = load_asset()
    out: dict[str, Path] = {}
    for task in tasks:
        settings = FinetuneSettings(**{f.name: manifest["finetuned"][task][f.name] for f in fields(FinetuneSettings)})
        for seed in seeds:
            target = zoo_dir / "extra" / f"{task}-seed{seed}"
            if not (target / "model.safetensors").is_file():
                state = finetune(clip, task, settings, seed=seed, progress=progress)
                tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
                try:
                    _save_state(state, tmp)
                    os.rename(tmp, target)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
            out[f"{task}-seed{seed}"] = target
    return out
