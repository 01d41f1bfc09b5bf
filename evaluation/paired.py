"""How far apart two models really are on a suite: a paired comparison over the same test images.

Two merges of the same fine-tunes agree on most images, so the difference of their average accuracies is far
better resolved than each accuracy alone: its standard error comes from the images on which they disagree.
The suite's average accuracy weighs every task equally, and so does the difference:

    D = (1/T) Σ_t mean_i (b_ti − a_ti),   SE(D) = (1/T) √(Σ_t s_t² / n_t)

with b_ti, a_ti ∈ {0, 1} whether image i of task t was classified right and s_t² the sample variance of the
per-image differences on task t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from evaluation.evaluator import SuiteResult
from merging.errors import MergeyardError


@dataclass(frozen=True)
class PairedDifference:
    difference: float  # average accuracy of b minus that of a (fractions)
    standard_error: float
    discordant: int  # test images one model classifies right and the other wrong
    samples: int

    def __str__(self) -> str:
        return f"{100 * self.difference:+.2f} ± {100 * self.standard_error:.2f}"


def paired_difference(a: SuiteResult, b: SuiteResult) -> PairedDifference:
    """b's average accuracy minus a's, with the standard error of that difference over the shared test images."""
    if a.suite_digest != b.suite_digest:
        raise MergeyardError(f"cannot pair results on different suites ({a.suite} {a.suite_digest[:12]} "
                             f"vs {b.suite} {b.suite_digest[:12]})")
    tasks_b = {t.task: t for t in b.tasks}
    if [t.task for t in a.tasks] != list(tasks_b):
        raise MergeyardError("cannot pair results over different tasks")
    total, variance, discordant, samples = 0.0, 0.0, 0, 0
    for ta in a.tasks:
        tb = tasks_b[ta.task]
        if ta.hits is None or tb.hits is None:
            raise MergeyardError(f"task {ta.task!r} has no per-image results to pair (score it with evaluate_state)")
        diff = tb.hits.double() - ta.hits.double()
        n = len(diff)
        total += float(diff.mean())
        variance += float(diff.var(unbiased=True)) / n if n > 1 else 0.0
        discordant += int((diff != 0).sum())
        samples += n
    count = len(a.tasks)
    return PairedDifference(total / count, math.sqrt(variance) / count, discordant, samples)
