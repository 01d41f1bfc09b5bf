"""The suites mergeyard knows by name.

    ta8-mini   the eight target tasks of the offline zoo (TA8's shape)
    zoo-all    all 22 zoo tasks
    zoo:TASK   one zoo task
    ta8        the real TA8 (CLIP ViT-B/32, eight datasets) from the Hugging Face hub or its cache

Heads are the zoo CLIP's zero-shot heads; normalised accuracy divides by the
accuracy of each task's own fine-tune, read from a built zoo's manifest.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

from evaluation.suite import Suite, TaskData
from evaluation.zoo.asset import load_asset
from evaluation.zoo.clip_model import create_vision_tower, logit_scale, to_input, zero_shot_head
from evaluation.zoo.data import make_split
from evaluation.zoo.tasks import TA8_MINI, TASKS
from merging.errors import MergeyardError

TEST_IMAGES = 480  # per task, spread over its classes
FEWSHOT_IMAGES = 100  # FusionBench's budget per task


def suite_tasks(name: str) -> tuple[str, ...]:
    if name == "ta8-mini":
        return TA8_MINI
    if name == "zoo-all":
        return tuple(TASKS)
    if name.startswith("zoo:") and name[4:] in TASKS:
        return (name[4:],)
    raise MergeyardError(f"unknown suite {name!r}; known: ta8-mini, zoo-all, zoo:TASK (TASK one of {', '.join(TASKS)}), "
                         "ta8 (the real one, from the hub)")


def check_tasks(name: str, tasks: list[str] | None) -> tuple[str, ...]:
    """The tasks of suite `name` asked for (all when `tasks` is empty), known without loading it."""
    if name == "ta8":
        from evaluation.ta8 import TA8

        known = tuple(TA8)
    else:
        known = suite_tasks(name)
    unknown = [t for t in tasks or [] if t not in known]
    if unknown:
        raise MergeyardError(f"suite {name!r} has no task {unknown[0]!r}; its tasks: {', '.join(known)}")
    return tuple(tasks) if tasks else known


@lru_cache(maxsize=8)
def load_suite(name: str, zoo_manifest: str | None = None, seed: int = 0, only: tuple[str, ...] | None = None) -> Suite:
    """The suite `name`; `only` loads just those tasks where loading is costly (ta8 downloads), else subsets."""
    if name == "ta8":
        import os

        from evaluation.ta8 import load_ta8_suite

        cache = os.environ.get("MERGEYARD_HF_CACHE")  # where `hf://` sources are read too
        return load_ta8_suite(Path(cache) if cache else None, list(only) if only else None)
    if only:
        return load_suite(name, zoo_manifest, seed).subset(list(only))
    tasks = suite_tasks(name)
    clip, _ = load_asset()
    data = {}
    for task in tasks:
        n_classes = len(TASKS[task].classes)
        data[task] = TaskData(
            name=task, classes=TASKS[task].classes, head=zero_shot_head(clip, task),
            fewshot=make_split(task, "fewshot", math.ceil(FEWSHOT_IMAGES / n_classes), seed),
            test=make_split(task, "test", math.ceil(TEST_IMAGES / n_classes), seed),
        )
    reference = {}
    if zoo_manifest and Path(zoo_manifest).is_file():
        manifest = json.loads(Path(zoo_manifest).read_text())
        reference = {t: m["accuracy"] for t, m in manifest.get("finetuned", {}).items() if t in tasks}
    return Suite(name, data, create_vision_tower, to_input, reference, logit_scale=logit_scale(clip))
