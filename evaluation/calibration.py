"""Calibration data for activation-based merges (MuDSC), from a suite (implements merging.objective.Calibration).

Unlabelled images: the first `samples` of each task's few-shot budget (never
the test split, so a merge is not tuned on what scores it), in task order,
preprocessed as the suite's models expect. The digest covers the exact input
bytes and the architecture's tensor names.
"""

from __future__ import annotations

import hashlib
from functools import cached_property

import torch

from evaluation.suite import Suite


class SuiteCalibration:
    def __init__(self, suite: Suite, tasks: list[str] | None = None, samples: int = 32, batch_size: int = 128):
        self.suite = suite
        self.tasks = list(tasks or suite.tasks)
        self.samples = samples
        self.batch_size = batch_size

    def create_model(self) -> torch.nn.Module:
        return self.suite.create_model()

    @cached_property
    def _inputs(self) -> torch.Tensor:
        images = torch.cat([self.suite.tasks[t].fewshot.images[:self.samples] for t in self.tasks])
        return self.suite.preprocess(images)

    def batches(self) -> list[torch.Tensor]:
        return [self._inputs[i:i + self.batch_size] for i in range(0, len(self._inputs), self.batch_size)]

    @cached_property
    def digest(self) -> str:
        h = hashlib.sha256(b"mergeyard-calibration-v1")
        h.update(self.suite.digest.encode())
        h.update(",".join(self.tasks).encode())
        h.update(self._inputs.contiguous().numpy().tobytes())
        h.update("\0".join(sorted(self.create_model().state_dict())).encode())
        return "sha256:" + h.hexdigest()
