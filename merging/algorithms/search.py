"""`auto` coefficients: a method's scale (λ, α) chosen on a suite's calibration split, and recorded.

    method: tsv
    parameters: {alpha: auto}
    search: {suite: suite.yaml, tasks: [sentiment, topic], budget: 64, grid: [0.6, 0.8, 1.0, 1.2]}

Every value of the grid (the method's own, `MergeMethod.scale_grid`, unless `search.grid` names one) is merged in
memory and scored on the first `budget` labelled calibration samples of each task — never the evaluation split,
so an evaluation or a gate on the merged model stays independent of the choice. The best mean metric wins (the
lower mean loss breaks a tie, then the earlier value). The merge is then written with the chosen number; the run
records the recipe with that number in place of `auto` (so `reproduce` needs no data) and, in its details, every
value tried with its scores, the chosen one and the digest of the data that chose it.

A method whose output is affine in its scale (θ(s) = A + s·B: task arithmetic, TIES, DARE, the SVD family)
is merged twice, at the grid's ends, and every other value interpolated; any other is merged once per value.
"""

from __future__ import annotations

from typing import Callable, Mapping

from merging.objective import Scorer

State = Mapping[str, "torch.Tensor"]
Progress = Callable[[str, int, int], None] | None


def _interpolated(low: float, high: float, at_low: State, at_high: State) -> Callable[[float], dict]:
    """θ(v) = θ(low) + (v − low)/(high − low) · (θ(high) − θ(low)) for an affine merge."""
    slope = {n: (t - at_low[n]) / (high - low) for n, t in at_high.items() if t.is_floating_point()}

    def at(value: float) -> dict:
        return {n: (t + (value - low) * slope[n]) if n in slope else t for n, t in at_low.items()}

    return at


def search_scale(grid: tuple[float, ...], merged_at: Callable[[float], State], scorer: Scorer, affine: bool,
                 progress: Progress = None) -> tuple[float, list[dict]]:
    """(the chosen value, [{value, score, loss, tasks} for each value tried, in grid order])."""
    at = merged_at
    if affine and len(set(grid)) > 1:
        low, high = min(grid), max(grid)
        at = _interpolated(low, high, merged_at(low), merged_at(high))
    tried = []
    for i, value in enumerate(grid):
        score = scorer.score(at(value))
        tried.append({"value": value, "score": score.value, "loss": score.loss, "tasks": score.tasks})
        if progress:
            progress("auto: scoring the grid on calibration data", i + 1, len(grid))
    best = max(range(len(tried)), key=lambda i: (tried[i]["score"], -tried[i]["loss"], -i))
    return tried[best]["value"], tried
