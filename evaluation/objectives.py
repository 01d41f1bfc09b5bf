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
    """`minibatch`: each gradient (`loss_and_grad`) reads the next `minibatch` samples of each task's budget, in
    order and wrapping round, as a data loader's batches (FusionBench's AdaMerging: 16); `loss` reads them all."""

    def __init__(self, suite: Suite, tasks: list[str] | None = None, samples_per_task: int = 100, device: str = "cpu",
                 minibatch: int | None = None):
        self.suite = suite
        self.tasks = tasks or list(suite.tasks)
        self.device = torch.device(device)
        self.runner = suite.family.runner(self.device)
        self.names = self.runner.names
        self.budget = {t: min(samples_per_task, self._size(suite.tasks[t])) for t in self.tasks}
        self.batches = {t: self._batch(suite.tasks[t], slice(0, self.budget[t])) for t in self.tasks}
        self.minibatch, self._calls = minibatch, 0

    def _size(self, task) -> int:
        raise NotImplementedError

    def _batch(self, task, rows: slice):
        raise NotImplementedError

    def _task_loss(self, task, out, labels) -> torch.Tensor:
        raise NotImplementedError

    def _next_batches(self) -> dict:
        """The next minibatch of every task (contiguous rows of its budget, wrapping round)."""
        out = {}
        for name in self.tasks:
            n, size = self.budget[name], min(self.minibatch, self.budget[name])
            start = (self._calls * size) % n
            rows = slice(start, min(start + size, n))
            out[name] = self._batch(self.suite.tasks[name], rows)
        self._calls += 1
        return out

    def _total(self, state: Mapping[str, torch.Tensor], batches: dict | None = None) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for name, (batch, labels) in (batches or self.batches).items():
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
        total = self._total(params, self._next_batches() if self.minibatch else None)
        wanted = [n for n in self.names if n in params]
        grads = torch.autograd.grad(total, [params[n] for n in wanted], allow_unused=True)
        found = dict(zip(wanted, grads))
        return float(total.detach()), {n: (found.get(n) if found.get(n) is not None else torch.zeros_like(params[n]))
                                       .detach() for n in self.names if n in params}


class FewShotCrossEntropy(_SuiteObjective):
    """Σ over tasks of the mean loss on the first `samples_per_task` calibration samples."""

    def _size(self, task) -> int:
        return len(task.fewshot)

    def _batch(self, task, rows):
        return self.runner.prepare(task, task.fewshot.inputs(rows)), task.fewshot.labels[rows].to(self.device)

    def _task_loss(self, task, out, labels):
        return task_loss(task.metric, out, labels)


class PredictionEntropy(_SuiteObjective):
    """Σ over tasks of the mean prediction entropy on `samples_per_task` unlabelled evaluation inputs."""

    def _size(self, task) -> int:
        return len(task.test)

    def _batch(self, task, rows):
        return self.runner.prepare(task, task.test.inputs(rows)), None

    def _task_loss(self, task, out, labels):
        return prediction_entropy(task.metric, out)
