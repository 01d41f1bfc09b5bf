"""What a merge method tells whoever runs it, beyond its tensors: the lineage it records and its one-line summary.

The flows call these for every method and never branch on a method's name: a new method, data-informed or not,
is its own module and one line in the registry's list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EdgeSpec:
    """A lineage edge a method adds from the merged model to the candidate at `position` (FW's `selected`)."""

    position: int
    role: str
    step: int | None = None
    weight: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodLineage:
    """What a method's decisions add to lineage: details on each candidate's edge, extra edges, and the keys of
    its details now carried by those edges (dropped from the run's record, not stored twice)."""

    candidate_details: dict[int, dict[str, Any]] = field(default_factory=dict)
    edges: list[EdgeSpec] = field(default_factory=list)
    carried: tuple[str, ...] = ()
