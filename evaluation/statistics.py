"""Statistics of a model on a suite's calibration data (implements merging.objective.Statistics), through the
suite's family, so Fisher merging and RegMean run on every family.

    fisher   the empirical diagonal Fisher: the mean over calibration samples of the squared gradient of each
             sample's loss (cross-entropy with its label; a text's token negative log-likelihood for language
             modelling), accumulated tensor by tensor, one sample at a time
    grams    XᵀX of the inputs of every linear layer (forward hooks; the rows a batch pads are left out),
             accumulated batch by batch in float64: memory is one in × in matrix a layer

Both read only the calibration split (never the evaluation split).
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch

from evaluation.metrics import task_loss
from evaluation.suite import Suite
from merging.errors import MergeyardError


class SuiteStatistics:
    def __init__(self, suite: Suite, tasks: list[str] | None = None, budget: int = 64, device: str = "cpu"):
        self.suite = suite
        self.tasks = tuple(tasks or suite.tasks)
        self.budget = budget
        self.device = torch.device(device)
        self.runner = suite.family.runner(self.device)
        h = hashlib.sha256(b"mergeyard-statistics-v1")
        h.update(f"{suite.digest}/{','.join(self.tasks)}/{budget}".encode())
        self.digest = "sha256:" + h.hexdigest()

    # ---- helpers -----------------------------------------------------------------------------------------------

    def _rows(self, task: str) -> int:
        data = self.suite.tasks[task].fewshot
        n = min(self.budget, len(data))
        if n == 0:
            raise MergeyardError(f"suite {self.suite.name!r}: task {task!r} has no calibration data "
                                 "(give `calibration:` or `split:` in the suite file)")
        return n

    def _on_device(self, state: Mapping[str, torch.Tensor], grad: bool) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in state.items():
            if v.is_floating_point():
                out[k] = v.detach().to(self.device, torch.float32).requires_grad_(grad and k in self.runner.names)
            else:
                out[k] = v.to(self.device)
        return out

    def _batches(self, task: str, size: int):
        data = self.suite.tasks[task].fewshot
        n = self._rows(task)
        for start in range(0, n, size):
            rows = slice(start, min(start + size, n))
            yield self.runner.prepare(self.suite.tasks[task], data.inputs(rows)), data.labels[rows].to(self.device)

    # ---- the statistics ----------------------------------------------------------------------------------------

    def fisher(self, state: Mapping[str, torch.Tensor], tasks: list[str]) -> dict[str, torch.Tensor]:
        params = self._on_device(state, grad=True)
        names = [n for n in self.runner.names if n in params]
        total = {n: torch.zeros_like(params[n]) for n in names}
        count = 0
        for task in tasks:
            data = self.suite.tasks[task]
            for batch, labels in self._batches(task, 1):  # one sample a batch: per-sample gradients, no padding
                loss = task_loss(data.metric, self.runner.outputs(data, batch, params), labels)
                grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
                for n, g in zip(names, grads):
                    if g is not None:
                        total[n].add_(g.detach().square())
                count += 1
        return {n: (t / count).cpu() for n, t in total.items()}

    def grams(self, state: Mapping[str, torch.Tensor], tasks: list[str],
              only: set[str] | None = None) -> dict[str, torch.Tensor]:
        weights = self._on_device(state, grad=False)
        layers = {n: m for n, m in self.runner.linear_modules().items() if only is None or n in only}
        total: dict[str, torch.Tensor] = {}
        mask: list[torch.Tensor | None] = [None]

        def hook(name: str):
            def capture(module, args, output):
                x = args[0].detach()
                m = mask[0]
                if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
                    x = x[m.bool()]  # the rows a batch pads are not inputs the layer sees in use
                x = x.reshape(-1, x.shape[-1]).double()
                total[name] = total.get(name, 0) + x.T @ x
            return capture

        handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
        try:
            with torch.no_grad():
                for task in tasks:
                    data = self.suite.tasks[task]
                    for batch, _ in self._batches(task, getattr(self.runner, "gram_batch_size", 1)):
                        mask[0] = batch.get("attention_mask") if isinstance(batch, dict) else None
                        self.runner.outputs(data, batch, weights)
        finally:
            for h in handles:
                h.remove()
        return {n: g.cpu() for n, g in total.items()}

    def linear_layers(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        weights = self._on_device(state, grad=False)
        order: list[str] = []
        handles = [m.register_forward_hook(lambda module, args, output, n=n: order.append(n) if n not in order else None)
                   for n, m in self.runner.linear_modules().items()]
        try:
            task = self.tasks[0]
            batch, _ = next(self._batches(task, 1))
            with torch.no_grad():
                self.runner.outputs(self.suite.tasks[task], batch, weights)
        finally:
            for h in handles:
                h.remove()
        return order
