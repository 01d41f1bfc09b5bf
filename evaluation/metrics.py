"""Per-task metrics, accumulated batch by batch from a family's outputs.

Classification tasks (accuracy, macro_f1, choice_accuracy) record accuracy,
macro-F1 and the mean cross-entropy of their class scores; language-modelling
tasks (perplexity) record exp of the mean token negative log-likelihood and
that mean as their loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from evaluation.families.base import Outputs


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    """Mean over classes of F1 = 2·TP / (2·TP + FP + FN); a class absent from both counts as 0 only if it
    appears in the labels or the predictions (scikit-learn's convention)."""
    scores = []
    for c in range(classes):
        tp = int(((predictions == c) & (labels == c)).sum())
        fp = int(((predictions == c) & (labels != c)).sum())
        fn = int(((predictions != c) & (labels == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


class ClassificationAccumulator:
    def __init__(self):
        self.hits: list[torch.Tensor] = []
        self.predictions: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.loss_sum = 0.0
        self.classes = 0

    def add(self, out: Outputs, labels: torch.Tensor) -> None:
        scores = out.scores
        self.classes = max(self.classes, scores.shape[-1])
        predicted = scores.argmax(-1)
        self.hits.append((predicted == labels).cpu())
        self.predictions.append(predicted.cpu())
        self.labels.append(labels.cpu())
        self.loss_sum += float(F.cross_entropy(scores.float(), labels, reduction="sum"))

    def result(self) -> tuple[dict[str, float], torch.Tensor]:
        hits = torch.cat(self.hits)
        n = len(hits)
        accuracy = int(hits.sum()) / n
        metrics = {"accuracy": accuracy, "loss": self.loss_sum / n,
                   "macro_f1": macro_f1(torch.cat(self.predictions), torch.cat(self.labels), self.classes)}
        return metrics, hits


class PerplexityAccumulator:
    def __init__(self):
        self.nll = 0.0
        self.tokens = 0

    def add(self, out: Outputs, labels: torch.Tensor) -> None:
        self.nll += float(out.nll.sum())
        self.tokens += int(out.tokens.sum())

    def result(self) -> tuple[dict[str, float], None]:
        mean = self.nll / max(self.tokens, 1)
        return {"perplexity": math.exp(min(mean, 700.0)), "loss": mean}, None


def accumulator(metric: str):
    return PerplexityAccumulator() if metric == "perplexity" else ClassificationAccumulator()


def task_loss(metric: str, out: Outputs, labels: torch.Tensor | None) -> torch.Tensor:
    """The differentiable loss an objective sums over tasks: cross-entropy of the class scores, or the mean token
    negative log-likelihood (which needs no labels)."""
    if metric == "perplexity":
        return out.nll.sum() / out.tokens.sum().clamp(min=1)
    return F.cross_entropy(out.scores, labels)


def prediction_entropy(metric: str, out: Outputs) -> torch.Tensor:
    """AdaMerging's unlabelled signal: the mean entropy of the predicted class distribution (for language
    modelling, the token negative log-likelihood, itself label-free)."""
    if metric == "perplexity":
        return out.nll.sum() / out.tokens.sum().clamp(min=1)
    logp = out.scores.log_softmax(-1)
    plogp = torch.where(torch.isfinite(logp), logp.exp() * logp, torch.zeros_like(logp))  # a padded choice adds 0
    return -plogp.sum(-1).mean()
