"""Calibration data for activation-based merges (MuDSC), from a suite (implements merging.objective.Calibration).

Unlabelled inputs: the first `samples` of each task's calibration split (never
the evaluation split, so a merge is not tuned on what scores it), in task
order, prepared as the suite's family feeds its model. The digest covers the
suite, the tasks, the exact inputs and the architecture's tensor names.
"""

from __future__ import annotations

import hashlib
from functools import cached_property

import torch

from evaluation.suite import Suite


def _input_bytes(batch) -> bytes:
    if isinstance(batch, torch.Tensor):
        return batch.detach().cpu().contiguous().numpy().tobytes()
    if isinstance(batch, dict):
        return b"".join(k.encode() + _input_bytes(v) for k, v in sorted(batch.items()))
    return repr(batch).encode()


class SuiteCalibration:
    def __init__(self, suite: Suite, tasks: list[str] | None = None, samples: int = 32, batch_size: int = 128):
        self.suite = suite
        self.tasks = list(tasks or suite.tasks)
        self.samples = samples
        self.batch_size = batch_size

    def create_model(self) -> torch.nn.Module:
        return self.suite.family.create_model()

    @cached_property
    def _batches(self) -> list:
        runner = self.suite.family.runner(torch.device("cpu"))
        out = []
        for name in self.tasks:
            task = self.suite.tasks[name]
            n = min(self.samples, len(task.fewshot))
            for start in range(0, n, self.batch_size):
                out.append(runner.prepare(task, task.fewshot.inputs(slice(start, min(start + self.batch_size, n)))))
        if out and all(isinstance(b, torch.Tensor) for b in out):  # one stream of inputs, re-cut into batches
            inputs = torch.cat(out)
            return [inputs[i:i + self.batch_size] for i in range(0, len(inputs), self.batch_size)]
        return out

    def batches(self) -> list:
        return self._batches

    @cached_property
    def digest(self) -> str:
        h = hashlib.sha256(b"mergeyard-calibration-v1")
        h.update(self.suite.digest.encode())
        h.update(",".join(self.tasks).encode())
        for batch in self._batches:
            h.update(_input_bytes(batch))
        h.update("\0".join(sorted(self.create_model().state_dict())).encode())
        return "sha256:" + h.hexdigest()
