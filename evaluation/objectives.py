"""Objectives for data-informed merging, on a suite's data (implements merging.objective.Objective).

`FewShotCrossEntropy`: the mean loss over a labelled budget of each task's
calibration split (FusionBench uses 100 samples per task): cross-entropy of the
class scores, or the token negative log-likelihood of a language-modelling
task. `PredictionEntropy`: the mean entropy of the predictions on unlabelled
evaluation inputs (AdaMerging's test-time signal). Both sum the per-task means,
so every task counts equally, and both go through the suite's family, so they
work on every family.
"""

from __future__ import annotations

from typing import Mapping

import torch

from evaluation.metrics import prediction_entropy, task_loss
from evaluation.suite import Suite


class _SuiteObjective:
    def __init__(self, suite: Suite, tasks: list[str] | None = None, samples_per_task: int = 100, device: str = "cpu"):
        self.suite = suite
        self.tasks = tasks or list(suite.tasks)
        self.device = torch.device(device)
        self.runner = suite.family.runner(self.device)
        self.names = self.runner.names
        self.batches = {t: self._batch(suite.tasks[t], samples_per_task) for t in self.tasks}

    def _batch(self, task, n: int):
        raise NotImplementedError

    def _task_loss(self, task, out, labels) -> torch.Tensor:
        raise NotImplementedError

    def _total(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for name, (batch, labels) in self.batches.items():
            task = self.suite.tasks[name]
            total = total + self._task_loss(task, self.runner.outputs(task, batch, state), labels)
        return total

    def _on_device(self, state: Mapping[str, torch.Tensor], grad: bool) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in state.items():
            if v.is_floating_point():
                out[k] = v.detach().to(self.device, torch.float32).requires_grad_(grad and k in self.names)
            else:
                out[k] = v.to(self.device)
        return out

    def loss(self, state: Mapping[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return float(self._total(self._on_device(state, grad=False)))

    def loss_and_grad(self, state: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        params = self._on_device(state, grad=True)
        total = self._total(params)
        wanted = [n for n in self.names if n in params]
        grads = torch.autograd.grad(total, [params[n] for n in wanted], allow_unused=True)
        found = dict(zip(wanted, grads))
        return float(total.detach()), {n: (found.get(n) if found.get(n) is not None else torch.zeros_like(params[n]))
                                       .detach() for n in self.names if n in params}


class FewShotCrossEntropy(_SuiteObjective):
    """Σ over tasks of the mean loss on the first `samples_per_task` calibration samples."""

    def _batch(self, task, n):
        rows = slice(0, min(n, len(task.fewshot)))
        return self.runner.prepare(task, task.fewshot.inputs(rows)), task.fewshot.labels[rows].to(self.device)

    def _task_loss(self, task, out, labels):
        return task_loss(task.metric, out, labels)


class PredictionEntropy(_SuiteObjective):
    """Σ over tasks of the mean prediction entropy on `samples_per_task` unlabelled evaluation inputs."""

    def _batch(self, task, n):
        rows = slice(0, min(n, len(task.test)))
        return self.runner.prepare(task, task.test.inputs(rows)), None

    def _task_loss(self, task, out, labels):
        return prediction_entropy(task.metric, out)
