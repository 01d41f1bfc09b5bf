"""Task suites: what a model is scored on.

A suite is tasks, each with an evaluation split, a calibration split (the
few-shot data data-informed merges learn from, never the evaluation split),
a head and a metric, plus the model family that turns a checkpoint into
predictions for them. Its digest covers the family's identity, the data, the
heads and the metrics: two evaluations compare only if their suite digests
match, and an edited data file is a new suite.

Built-in suites (the offline zoo, TA8) and suite files are instances of the
same classes; see `evaluation.suites` and `evaluation.suite_file`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from evaluation.families.base import Family

# Metrics a task may declare; `loss` is recorded for every task beside its metric.
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "choice_accuracy": True, "perplexity": False, "loss": False}
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "choice_accuracy")


class Examples(Protocol):
    """One split of a task: labels, and raw inputs by row range (what the family prepares for its model)."""

    labels: torch.Tensor  # N int64 (-1 where a task has no labels: language modelling)

    def __len__(self) -> int: ...

    def inputs(self, rows: slice) -> Any: ...

    def digest(self) -> str: ...


@dataclass(frozen=True)
class TaskData:
    name: str
    classes: tuple[str, ...]
    head: Any  # the family's: a zero-shot class-embedding matrix, a fine-tune's head tensors, or None
    fewshot: Examples  # calibration: labelled for cross-entropy objectives, unlabelled for entropy and MuDSC
    test: Examples
    metric: str = "accuracy"


@dataclass(frozen=True, eq=False)
class Suite:
    name: str
    tasks: dict[str, TaskData]
    family: "Family"
    reference_accuracy: dict[str, float] = field(default_factory=dict)  # each task's own fine-tune: normalises
    version: str = "suite-v2"
    source: str | None = None  # the suite file it was read from, if any

    @cached_property
    def digest(self) -> str:
        h = hashlib.sha256(f"{self.version}/{self.name}/".encode())
        h.update(json.dumps(self.family.identity(), sort_keys=True).encode())
        for name in sorted(self.tasks):
            t = self.tasks[name]
            h.update(name.encode() + b"\0" + "\0".join(t.classes).encode() + b"\0" + t.metric.encode())
            h.update(self.family.head_bytes(t))
            h.update(t.fewshot.digest().encode() + t.test.digest().encode())
        return "sha256:" + h.hexdigest()

    def subset(self, tasks: list[str]) -> "Suite":
        unknown = sorted(set(tasks) - set(self.tasks))
        if unknown:
            from merging.errors import MergeyardError

            raise MergeyardError(f"suite {self.name!r} has no task {unknown[0]!r}; its tasks: {', '.join(self.tasks)}")
        # replace() carries every other field (family, version, source) as it is
        return replace(self, tasks={t: self.tasks[t] for t in tasks},
                       reference_accuracy={t: v for t, v in self.reference_accuracy.items() if t in tasks})

    def for_model(self, directories: str | Path | list[Path] | None) -> "Suite":
        """The suite with its family reading config and tokenizer from `directories` where the suite names no
        `model:` (the evaluated model's own directory, then its bases' in lineage: the first that holds what the
        family needs). The digest does not change."""
        if isinstance(directories, (str, Path)):
            directories = [Path(directories)]
        family = self.family.with_model_dirs(list(directories)) if directories else self.family
        if family is self.family:
            return self
        bound = replace(self, family=family)
        bound.__dict__["digest"] = self.digest
        return bound
