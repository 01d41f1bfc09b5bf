"""A recipe's `search:` block and its `auto` parameters (what merging.algorithms.search runs).

    method: tsv
    parameters: {alpha: auto}
    search: {suite: suite.yaml, tasks: [sentiment, topic], budget: 64, grid: [0.6, 0.8, 1.0, 1.2]}
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator

from merging.objective import ScoreRequest

AUTO = "auto"


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
