"""Scoring a checkpoint on a suite: accuracy, loss and normalised accuracy per task."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from evaluation.suite import Suite
from merging.checkpoint import Checkpoint
from merging.errors import MergeyardError

Progress = Callable[[str, int, int], None] | None


@dataclass
class TaskResult:
    task: str
    accuracy: float
    loss: float
    samples: int
    normalized_accuracy: float | None = None  # accuracy ÷ the task's own fine-tune's accuracy
    # which test images were classified right, in the split's order: two models scored on the same images are
    # compared pairwise (evaluation.paired), which resolves far smaller differences than two accuracies do
    hits: torch.Tensor | None = field(default=None, repr=False, compare=False)


@dataclass
class SuiteResult:
    suite: str
    suite_digest: str
    tasks: list[TaskResult] = field(default_factory=list)

    @property
    def average_accuracy(self) -> float:
        return sum(t.accuracy for t in self.tasks) / len(self.tasks)

    @property
    def average_normalized_accuracy(self) -> float | None:
        values = [t.normalized_accuracy for t in self.tasks if t.normalized_accuracy is not None]
        return sum(values) / len(values) if len(values) == len(self.tasks) else None

    def rows(self) -> list[tuple[str, str, float]]:
        """(task, metric, value) rows for the registry."""
        out = []
        for t in self.tasks:
            out += [(t.task, "accuracy", t.accuracy), (t.task, "loss", t.loss)]
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
                   progress: Progress = None) -> SuiteResult:
    model = suite.create_model()
    expected, given = set(model.state_dict()), set(state)
    if expected != given:
        missing = sorted(expected - given)[:3]
        extra = sorted(given - expected)[:3]
        raise MergeyardError(f"checkpoint does not fit suite {suite.name!r}'s architecture "
                             f"(missing {missing}, unexpected {extra})")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.to(device).eval()
    result = SuiteResult(suite.name, suite.digest)
    total = sum(len(t.test.labels) for t in suite.tasks.values())
    done = 0
    for name, task in suite.tasks.items():
        head = task.head.to(device)
        hits, loss_sum = [], 0.0
        for start in range(0, len(task.test.labels), batch_size):
            images = suite.preprocess(task.test.images[start:start + batch_size]).to(device)
            labels = task.test.labels[start:start + batch_size].to(device)
            out = suite.logits(model(images), head)
            hits.append((out.argmax(-1) == labels).cpu())
            loss_sum += float(F.cross_entropy(out, labels, reduction="sum"))
            done += len(labels)
            if progress:
                progress(f"evaluate {suite.name}", done, total)
        n = len(task.test.labels)
        task_hits = torch.cat(hits)
        accuracy = int(task_hits.sum()) / n
        reference = suite.reference_accuracy.get(name)
        result.tasks.append(TaskResult(name, accuracy, loss_sum / n, n, accuracy / reference if reference else None,
                                       hits=task_hits))
    return result


def evaluate_checkpoint(path: str | Path, suite: Suite, **kwargs) -> SuiteResult:
    return evaluate_state(load_state(path), suite, **kwargs)
