"""Deterministic splits of the procedural tasks.

Every image is a function of (generator version, seed, task, split, index):
the same arguments give the same bytes on any machine, so a suite digest over
them identifies the data exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from evaluation.zoo.tasks import TASKS

GENERATOR_VERSION = "zoo-v1"
SPLITS = {"pretrain": 0, "train": 1, "fewshot": 2, "test": 3}


@dataclass(frozen=True)
class Split:
    task: str
    name: str
    images: torch.Tensor  # N×32×32×3 uint8
    labels: torch.Tensor  # N int64

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, rows: slice) -> torch.Tensor:
        return self.images[rows]

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(f"{GENERATOR_VERSION}/{self.task}/{self.name}".encode())
        h.update(self.images.numpy().tobytes())
        h.update(self.labels.numpy().astype("<i8").tobytes())
        return h.hexdigest()


@lru_cache(maxsize=256)
def make_split(task: str, split: str, per_class: int, seed: int = 0) -> Split:
    """`per_class` images of every class; `pretrain` draws the pre-training domain, the rest the task domain."""
    spec = TASKS[task]
    task_index = list(TASKS).index(task)
    rng = np.random.default_rng([seed, task_index, SPLITS[split], per_class])
    domain = "pretrain" if split == "pretrain" else "task"
    labels = np.repeat(np.arange(len(spec.classes)), per_class)
    rng.shuffle(labels)
    images = np.stack([spec.render(rng, int(c), domain) for c in labels])
    return Split(task, split, torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
