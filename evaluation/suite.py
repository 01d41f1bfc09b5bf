"""Task suites: what a model is scored on.

A suite is tasks, each with a labelled few-shot budget, a test split and a
frozen classification head, plus the architecture of the checkpoints it
scores and how images are fed to them. Its digest covers the data, the heads
and the generator version: two evaluations compare only if their suite
digests match.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable

import torch

from evaluation.zoo.data import GENERATOR_VERSION, Split


@dataclass(frozen=True)
class TaskData:
    name: str
    classes: tuple[str, ...]
    head: torch.Tensor  # classes × embed: frozen, normalised class embeddings
    fewshot: Split
    test: Split


@dataclass(frozen=True, eq=False)
class Suite:
    name: str
    tasks: dict[str, TaskData]
    create_model: Callable[[], torch.nn.Module]  # the architecture of the checkpoints it scores
    preprocess: Callable[[torch.Tensor], torch.Tensor]  # uint8 images → model input
    reference_accuracy: dict[str, float] = field(default_factory=dict)  # each task's own fine-tune: normalises
    version: str = GENERATOR_VERSION
    # logits = logit_scale · cos(image, head row): the scored CLIP's own learned temperature, as TA8's heads
    # carry it (the zero-shot weights are multiplied by logit_scale.exp()); it sets losses and objectives, not
    # which class wins
    logit_scale: float = 100.0

    @cached_property
    def digest(self) -> str:
        h = hashlib.sha256(f"{self.version}/{self.name}/{self.logit_scale!r}".encode())
        for name in sorted(self.tasks):
            t = self.tasks[name]
            h.update(name.encode() + b"\0" + "\0".join(t.classes).encode())
            h.update(t.head.detach().to(torch.float32).contiguous().numpy().tobytes())
            h.update(t.fewshot.digest().encode() + t.test.digest().encode())
        return "sha256:" + h.hexdigest()

    def logits(self, features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Class scores of a batch of image features: the evaluator's and the objectives' one definition."""
        return self.logit_scale * torch.nn.functional.normalize(features, dim=-1) @ head.T

    def subset(self, tasks: list[str]) -> "Suite":
        unknown = sorted(set(tasks) - set(self.tasks))
        if unknown:
            from merging.errors import MergeyardError

            raise MergeyardError(f"suite {self.name!r} has no task {unknown[0]!r}; its tasks: {', '.join(self.tasks)}")
        # replace() carries every other field (architecture, preprocessing, version, logit scale) as it is
        return replace(self, tasks={t: self.tasks[t] for t in tasks},
                       reference_accuracy={t: v for t, v in self.reference_accuracy.items() if t in tasks})
