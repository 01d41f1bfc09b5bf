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

import math
from typing import Callable, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from merging.objective import Scorer, ScoreRequest

AUTO = "auto"
State = Mapping[str, "torch.Tensor"]
Progress = Callable[[str, int, int], None] | None


class SearchSpec(BaseModel):
    """A recipe's `search:` block: the data `auto` parameters are chosen on, and the values tried."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str | None = Field(None, description="a suite name or file (a pipeline fills in its own)")
    tasks: tuple[str, ...] | None = Field(None, description="a subset of the suite's tasks")
    budget: int = Field(100, gt=0, description="labelled calibration samples per task")
    grid: tuple[float, ...] | None = Field(None, min_length=1, description="values tried (default: the method's)")

    @field_validator("grid")
    @classmethod
    def _finite(cls, grid: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if grid is not None and not all(math.isfinite(v) for v in grid):
            raise ValueError("every grid value must be a finite number")
        return grid

    def request(self) -> ScoreRequest:
        assert self.suite is not None
        return ScoreRequest(self.suite, self.tasks, self.budget)


def with_search_suite(recipe: dict, suite: str, tasks: list[str] | None) -> dict:
    """A recipe mapping whose `auto` parameters are searched on `suite` unless its `search:` names one (a pipeline
    chooses its merges' coefficients on its own suite by default)."""
    if AUTO not in (recipe.get("parameters") or {}).values():
        return recipe
    search = dict(recipe.get("search") or {})
    if search.get("suite") is None:
        search["suite"] = suite
        if tasks and search.get("tasks") is None:
            search["tasks"] = list(tasks)
    return {**recipe, "search": search}


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
