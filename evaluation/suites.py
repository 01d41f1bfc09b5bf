"""Suites by name or by file: wherever mergeyard takes a suite, it takes either.

    path/to/suite.yaml   a suite file (evaluation.suite_file): the team's own tasks and data
    ta8-mini             the eight target tasks of the offline zoo (TA8's shape)
    zoo-all              all 22 zoo tasks
    zoo:TASK             one zoo task
    ta8                  the real TA8 (CLIP ViT-B/32, eight datasets) from the Hugging Face hub or its cache
    a plugin's name      a suite registered in the entry-point group `mergeyard.suites`

The built-in names are ordinary instances of the suite classes (the zoo's are
image-classification suites with zero-shot heads), registered in `BUILT_IN`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the CLI reads this module's names before it needs torch
    from evaluation.suite import Suite
from merging.errors import MergeyardError

TEST_IMAGES = 480  # per zoo task, spread over its classes
FEWSHOT_IMAGES = 100  # FusionBench's budget per task
ENTRY_POINT_GROUP = "mergeyard.suites"


def is_suite_file(ref: str) -> bool:
    return ref.endswith((".yaml", ".yml")) or os.path.isfile(ref)


def _zoo_suite(name: str, tasks: tuple[str, ...], zoo_manifest: str | None, seed: int) -> Suite:
    from evaluation.families.zero_shot import ZeroShotImageFamily
    from evaluation.suite import Suite, TaskData
    from evaluation.zoo.asset import load_asset
    from evaluation.zoo.clip_model import create_vision_tower, logit_scale, to_input, zero_shot_head
    from evaluation.zoo.data import GENERATOR_VERSION, make_split
    from evaluation.zoo.tasks import TASKS

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
    family = ZeroShotImageFamily(create_vision_tower, to_input, logit_scale(clip), label="zoo-clip-v1")
    return Suite(name, data, family, reference, version=GENERATOR_VERSION)


def _zoo_tasks(name: str) -> tuple[str, ...]:
    from evaluation.zoo.tasks import TA8_MINI, TASKS

    return {"ta8-mini": TA8_MINI, "zoo-all": tuple(TASKS)}.get(name) or (name[4:],)


def _ta8_tasks(name: str) -> tuple[str, ...]:
    from evaluation.ta8 import TA8

    return tuple(TA8)


def _ta8_suite(name: str, tasks: tuple[str, ...], zoo_manifest: str | None, seed: int) -> Suite:
    from evaluation.ta8 import load_ta8_suite

    cache = os.environ.get("MERGEYARD_HF_CACHE")  # where `hf://` sources are read too
    return load_ta8_suite(Path(cache) if cache else None, list(tasks))


@dataclass(frozen=True)
class BuiltIn:
    """A named suite: its tasks (known without loading it) and how to load some of them."""

    tasks: Callable[[str], tuple[str, ...]]
    load: Callable[[str, tuple[str, ...], str | None, int], Suite]
    describe: str
    loads_subsets: bool = False  # loading only some tasks is cheaper than loading all (TA8 downloads)


BUILT_IN: dict[str, BuiltIn] = {
    "ta8-mini": BuiltIn(_zoo_tasks, _zoo_suite, "the eight target tasks of the offline zoo"),
    "zoo-all": BuiltIn(_zoo_tasks, _zoo_suite, "all 22 zoo tasks"),
    "zoo:": BuiltIn(_zoo_tasks, _zoo_suite, "one zoo task (zoo:TASK)"),
    "ta8": BuiltIn(_ta8_tasks, _ta8_suite, "the real TA8 from the hub cache", loads_subsets=True),
}


def built_in_names() -> str:
    """The built-in suites' names as a user types them (`zoo:TASK` for the one-task family)."""
    return ", ".join(f"{n}TASK" if n.endswith(":") else n for n in BUILT_IN)


def _built_in(name: str) -> BuiltIn | None:
    if name in BUILT_IN and not name.endswith(":"):
        return BUILT_IN[name]
    if name.startswith("zoo:"):
        from evaluation.zoo.tasks import TASKS

        return BUILT_IN["zoo:"] if name[4:] in TASKS else None
    return None


def _plugin(name: str):
    return next((ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name), None)


def _unknown(name: str) -> MergeyardError:
    from evaluation.zoo.tasks import TASKS

    plugins = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return MergeyardError(f"unknown suite {name!r}: not a suite file (.yaml) nor a known name; known: "
                          f"{built_in_names()} (TASK one of {', '.join(TASKS)})"
                          + (f", {', '.join(plugins)}" if plugins else ""))


def suite_tasks(name: str) -> tuple[str, ...]:
    """The tasks of a named suite (not a file), without loading it."""
    built_in = _built_in(name)
    if built_in is not None:
        return built_in.tasks(name)
    if _plugin(name) is not None:
        return tuple(_load_plugin(name).tasks)
    raise _unknown(name)


def check_tasks(ref: str, tasks: list[str] | None, **file_options) -> tuple[str, ...]:
    """The tasks of suite `ref` asked for (all when `tasks` is empty); a suite file is read (and so checked)."""
    known = tuple(load_suite(ref, **file_options).tasks) if is_suite_file(ref) else suite_tasks(ref)
    unknown = [t for t in tasks or [] if t not in known]
    if unknown:
        raise MergeyardError(f"suite {ref!r} has no task {unknown[0]!r}; its tasks: {', '.join(known)}")
    return tuple(tasks) if tasks else known


@lru_cache(maxsize=4)
def _load_plugin(name: str) -> Suite:
    factory = _plugin(name)
    try:
        suite = factory.load()()
    except MergeyardError:
        raise
    except Exception as exc:  # a broken plugin must not look like a mergeyard bug
        raise MergeyardError(f"the plugin suite {name!r} ({factory.value}) failed to load: {exc}") from None
    from evaluation.suite import Suite

    if not isinstance(suite, Suite):
        raise MergeyardError(f"the plugin suite {name!r} ({factory.value}) returned {type(suite).__name__}, not a Suite")
    return suite


@lru_cache(maxsize=8)
def _load_named(name: str, zoo_manifest: str | None, seed: int, only: tuple[str, ...] | None) -> Suite:
    built_in = _built_in(name)
    if built_in is None:
        if _plugin(name) is None:
            raise _unknown(name)
        suite = _load_plugin(name)
        return suite.subset(list(only)) if only else suite
    if only and built_in.loads_subsets:
        return built_in.load(name, tuple(check_tasks(name, list(only))), zoo_manifest, seed)
    if only:
        return _load_named(name, zoo_manifest, seed, None).subset(list(only))
    return built_in.load(name, built_in.tasks(name), zoo_manifest, seed)


def load_suite(ref: str, zoo_manifest: str | None = None, seed: int = 0, only: tuple[str, ...] | None = None, *,
               resolve=None, hf_cache: Path | None = None) -> Suite:
    """The suite `ref` names (a file or a name); `only` keeps those tasks. Files are read afresh each time (their
    data may have changed); named suites are built once per process."""
    if is_suite_file(ref):
        from evaluation.suite_file import load_suite_file

        suite = load_suite_file(ref, resolve=resolve, hf_cache=hf_cache)
        return suite.subset(list(only)) if only else suite
    return _load_named(ref, zoo_manifest, seed, tuple(only) if only else None)


load_suite.cache_clear = _load_named.cache_clear  # type: ignore[attr-defined]  (tests rebuild suites)
