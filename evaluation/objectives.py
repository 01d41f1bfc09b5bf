"""Objectives for data-informed merging, on a suite's data (implements merging.objective.Objective).

`FewShotCrossEntropy`: mean cross-entropy over a labelled budget per task
(FusionBench uses 100 samples per task). `PredictionEntropy`: mean entropy of
the predictions on unlabelled test images (AdaMerging's test-time signal).
Both sum the per-task means, so every task counts equally.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch.func import functional_call

from evaluation.suite import Suite


class _SuiteObjective:
    def __init__(self, suite: Suite, tasks: list[str] | None = None, samples_per_task: int = 100, device: str = "cpu"):
        self.suite = suite
        self.tasks = tasks or list(suite.tasks)
        self.device = torch.device(device)
        self.module = suite.create_model().to(self.device).eval()
        self.names = tuple(k for k, v in self.module.state_dict().items() if v.is_floating_point())
        self.batches = {t: self._batch(t, samples_per_task) for t in self.tasks}

    def _batch(self, task: str, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _task_loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _total(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for task, (images, labels, head) in self.batches.items():
            features = functional_call(self.module, dict(state), (images,))
            out = self.suite.logits(features, head)
            total = total + self._task_loss(out, labels)
        return total

    def loss(self, state: Mapping[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return float(self._total({k: v.to(self.device, torch.float32) for k, v in state.items()}))

    def loss_and_grad(self, state: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        params = {k: v.detach().to(self.device, torch.float32).requires_grad_(k in self.names) for k, v in state.items()}
        total = self._total(params)
        grads = torch.autograd.grad(total, [params[n] for n in self.names], allow_unused=True)
        return float(total.detach()), {n: (g if g is not None else torch.zeros_like(params[n])).detach()
                              for n, g in zip(self.names, grads)}


class FewShotCrossEntropy(_SuiteObjective):
    """Σ over tasks of the mean cross-entropy on the first `samples_per_task` few-shot samples."""

    def _batch(self, task, n):
        data = self.suite.tasks[task]
        return (self.suite.preprocess(data.fewshot.images[:n]).to(self.device), data.fewshot.labels[:n].to(self.device),
                data.head.to(self.device))

    def _task_loss(self, out, labels):
        return F.cross_entropy(out, labels)


class PredictionEntropy(_SuiteObjective):
    """Σ over tasks of the mean prediction entropy on `samples_per_task` unlabelled test images."""

    def _batch(self, task, n):
        data = self.suite.tasks[task]
        return self.suite.preprocess(data.test.images[:n]).to(self.device), None, data.head.to(self.device)

    def _task_loss(self, out, labels):
        p = out.softmax(-1)
        return -(p * out.log_softmax(-1)).sum(-1).mean()
