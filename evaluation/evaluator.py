"""Scoring a checkpoint on a suite: each task's metric, loss and normalised accuracy.

The suite's family turns the checkpoint into outputs (`evaluation.families`);
the metrics are the same for every family (`evaluation.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Mapping

import torch

from evaluation.metrics import accumulator
from evaluation.suite import HIGHER_IS_BETTER, Suite
from merging.checkpoint import Checkpoint

Progress = Callable[[str, int, int], None] | None


@dataclass
class TaskResult:
    task: str
    accuracy: float | None
    loss: float
    samples: int
    normalized_accuracy: float | None = None  # accuracy ÷ the task's own fine-tune's accuracy
    # which test samples were classified right, in the split's order: two models scored on the same samples are
    # compared pairwise (evaluation.paired), which resolves far smaller differences than two accuracies do
    hits: torch.Tensor | None = field(default=None, repr=False, compare=False)
    metric: str = "accuracy"  # the task's declared metric
    metrics: dict[str, float] = field(default_factory=dict)  # every metric measured (accuracy, macro_f1, loss, ...)

    @property
    def value(self) -> float:
        """The declared metric's value."""
        return self.metrics.get(self.metric, self.accuracy)


@dataclass
class SuiteResult:
    suite: str
    suite_digest: str
    tasks: list[TaskResult] = field(default_factory=list)

    @property
    def average_accuracy(self) -> float | None:
        values = [t.accuracy for t in self.tasks if t.accuracy is not None]
        return sum(values) / len(values) if values else None

    @property
    def average_normalized_accuracy(self) -> float | None:
        values = [t.normalized_accuracy for t in self.tasks if t.normalized_accuracy is not None]
        return sum(values) / len(values) if values and len(values) == len(self.tasks) else None

    def rows(self) -> list[tuple[str, str, float]]:
        """(task, metric, value) rows for the registry."""
        out = []
        for t in self.tasks:
            out += [(t.task, metric, value) for metric, value in t.metrics.items()]
            if t.normalized_accuracy is not None:
                out.append((t.task, "normalized_accuracy", t.normalized_accuracy))
        return out

    def as_dict(self) -> dict:
        return {"suite": self.suite, "suite_digest": self.suite_digest, "average_accuracy": self.average_accuracy,
                "average_normalized_accuracy": self.average_normalized_accuracy,
                "tasks": [{f.name: getattr(t, f.name) for f in fields(t) if f.name != "hits"} for t in self.tasks]}


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {name: ckpt.read(name) for name in ckpt.names}


@torch.no_grad()
def evaluate_state(state: Mapping[str, torch.Tensor], suite: Suite, *, device: str = "cpu", batch_size: int = 512,
                   progress: Progress = None, label: str = "checkpoint") -> SuiteResult:
    runner = suite.family.runner(torch.device(device))
    weights = runner.adapt(state, label)
    result = SuiteResult(suite.name, suite.digest)
    total = sum(len(t.test) for t in suite.tasks.values())
    done = 0
    for name, task in suite.tasks.items():
        acc = accumulator(task.metric)
        n = len(task.test)
        step = getattr(runner, "batch_size", None) or batch_size
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            batch = runner.prepare(task, task.test.inputs(rows))
            labels = task.test.labels[rows].to(runner.device)
            acc.add(runner.outputs(task, batch, weights), labels)
            done += rows.stop - rows.start
            if progress:
                progress(f"evaluate {suite.name}", done, total)
        metrics, hits = acc.result()
        accuracy = metrics.get("accuracy")
        if task.metric == "choice_accuracy":
            metrics["choice_accuracy"] = accuracy
        reference = suite.reference_accuracy.get(name)
        normalized = accuracy / reference if reference and accuracy is not None else None
        result.tasks.append(TaskResult(name, accuracy, metrics["loss"], n, normalized, hits=hits, metric=task.metric,
                                       metrics=metrics))
    return result


def evaluate_checkpoint(path: str | Path, suite: Suite, **kwargs) -> SuiteResult:
    kwargs.setdefault("label", str(path))
    return evaluate_state(load_state(path), suite, **kwargs)


def better(metric: str, a: float, b: float) -> bool:
    """Whether value a of `metric` is better than b."""
    return a > b if HIGHER_IS_BETTER.get(metric, True) else a < b
