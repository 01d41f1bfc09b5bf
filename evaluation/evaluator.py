"""Scoring a checkpoint on a suite: each task's metric, loss and normalised accuracy.

The suite's family turns the checkpoint into outputs (`evaluation.families`);
the metrics are the same for every family (`evaluation.metrics`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Mapping

import torch

from evaluation.metrics import accumulator
from evaluation.suite import HIGHER_IS_BETTER, Suite
from merging.checkpoints.checkpoint import Checkpoint
from merging.errors import MergeyardError
from merging.objective import Score

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


def _examples(task, split: str):
    """The task's evaluation split (`test`) or its calibration split (`calibration`, what choices are made on)."""
    if split == "test":
        return task.test
    if split == "calibration":
        if len(task.fewshot) == 0:
            raise MergeyardError(f"task {task.name!r} has no calibration split to score on; give it one in the suite "
                                 "(`calibration:` or `split:`)")
        return task.fewshot
    raise ValueError(f"no split {split!r}")


@torch.no_grad()
def evaluate_state(state: Mapping[str, torch.Tensor], suite: Suite, *, device: str = "cpu", batch_size: int = 512,
                   progress: Progress = None, label: str = "checkpoint", split: str = "test",
                   limit: int | None = None) -> SuiteResult:
    """Every task's metrics on its evaluation split (or, `split="calibration"`, on its calibration split), on the
    first `limit` samples of each where a limit is given."""
    runner = suite.family.runner(torch.device(device))
    weights = runner.adapt(state, label)
    result = SuiteResult(suite.name, suite.digest)
    sizes = {name: min(len(_examples(task, split)), limit or len(_examples(task, split)))
             for name, task in suite.tasks.items()}
    total = sum(sizes.values())
    done = 0
    for name, task in suite.tasks.items():
        acc = accumulator(task.metric)
        examples, n = _examples(task, split), sizes[name]
        step = getattr(runner, "batch_size", None) or batch_size
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            batch = runner.prepare(task, examples.inputs(rows))
            labels = examples.labels[rows].to(runner.device)
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


class CalibrationScore:
    """A suite's metric on the first `budget` labelled calibration samples of each task (merging.objective.Scorer):
    what `auto` coefficients are chosen by. The evaluation split is never read."""

    def __init__(self, suite: Suite, budget: int, device: str = "cpu"):
        self.suite, self.budget, self.device = suite, budget, device
        # what the choice depends on, and nothing else: the calibration data, heads and metrics (not the suite's
        # digest, which covers its evaluation split too)
        h = hashlib.sha256(f"calibration-score-v1/{budget}/".encode())
        h.update(json.dumps(suite.family.identity(), sort_keys=True).encode())
        for name, task in suite.tasks.items():
            h.update(f"{name}\0{task.metric}\0{chr(0).join(task.classes)}\0{task.fewshot.digest()}\0".encode())
            h.update(suite.family.head_bytes(task))
        self.digest = "sha256:" + h.hexdigest()

    def score(self, state: Mapping[str, torch.Tensor]) -> Score:
        result = evaluate_state(state, self.suite, device=self.device, split="calibration", limit=self.budget,
                                label="a candidate merge")
        values = {t.task: t.value for t in result.tasks}
        signed = [v if HIGHER_IS_BETTER.get(t.metric, True) else -v for t, v in zip(result.tasks, values.values())]
        return Score(sum(signed) / len(signed), sum(t.loss for t in result.tasks) / len(result.tasks), values)
