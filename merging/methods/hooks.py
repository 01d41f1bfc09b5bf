"""What a merge method gives the engine and the flows besides its parameters: each hook's protocol, declared once.

A method is registered (`merging.methods.registry.merge_method`) with a `Merge` function and, where it needs them,
the optional hooks below. The engine calls `Prepare`, `Merge`, `Finalize` and `Solve`; the flows call `Requests`
(the data it learns from), `Lineage`, `Summary` and `DataDigests` — for every method alike, never branching on
its name. A new method, data-informed or not, is its own module and one line in the registry's list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from merging.checkpoints.inputs import MergeInputs, TensorInputs


@dataclass(frozen=True)
class Patch:
    """Output values to overwrite after the merge pass (flat indices into one tensor)."""

    name: str
    indices: "torch.Tensor"
    values: "torch.Tensor"


@dataclass
class Solved:
    """What a whole-model (data-informed) method returns: the merged float tensors and what it decided."""

    state: dict[str, "torch.Tensor"]
    details: dict[str, Any]
    # parameters the method settled (AdaMerging's learned coefficients): the run records the recipe with them,
    # so `reproduce` rebuilds the same bytes without learning again
    parameters: dict[str, Any] | None = None


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


# ---- the engine's hooks ------------------------------------------------------------------------------------------


@runtime_checkable
class Merge(Protocol):
    """One output tensor from its inputs: its chunks, in order, float32, flat (`state`: what `Prepare` returned)."""

    def __call__(self, tensor: "TensorInputs", params: Any, state: Any) -> Iterator["torch.Tensor"]: ...


@runtime_checkable
class Prepare(Protocol):
    """A model-wide step before any tensor is merged (global TIES's thresholds), as a map over tensors and an
    exact reduce, so an executor may run the map anywhere (merging.engine.plan records `describe`'s steps).

    In this process `__call__` runs it all. An executor elsewhere runs it pass by pass: `begin` (the reducer's
    carry, or the finished state when there is nothing to map), then for each of `passes`: `context(stage, carry)`
    (the small, picklable part of the carry a map needs), `map(stage, context, tensor)` over tensors anywhere,
    `combine(stage, a, b)` of two maps' partials (exact: any grouping gives the same), `reduce(stage, carry,
    partial)` and `settle(stage, carry)`; then `finish(carry)` is the state."""

    passes: int

    def describe(self, params: Any) -> list[dict]:
        """The steps for the plan, [{step, map, reduce, passes}]; [] when these parameters need none."""

    def __call__(self, inputs: "MergeInputs", params: Any) -> Any:
        """The state `Merge` reads (None when there is nothing to prepare), computed over every tensor."""

    def begin(self, inputs: "MergeInputs", params: Any) -> tuple[bool, Any]:
        """(True, carry) when there is a map to run; (False, state) when the state needs none."""

    def context(self, stage: int, carry: Any) -> Any: ...

    def map(self, stage: int, context: Any, tensor: "TensorInputs") -> Any: ...

    def combine(self, stage: int, a: Any, b: Any) -> Any: ...

    def reduce(self, stage: int, carry: Any, partial: Any) -> None: ...

    def settle(self, stage: int, carry: Any) -> None: ...

    def finish(self, carry: Any) -> Any: ...


@runtime_checkable
class Finalize(Protocol):
    """A correction after every tensor is written (global TIES's majority sign, known only at the end).

    What it corrects accumulates in the prepared state as tensors merge. Where units merge in other processes,
    each starts from `fresh(state)` and the executor folds what each gathered back with `absorb(state, part)`, in
    the plan's order, before calling it."""

    describe: str  # for the plan

    def __call__(self, state: Any) -> list[Patch]: ...

    def fresh(self, state: Any) -> Any: ...

    def absorb(self, state: Any, part: Any) -> None: ...


@runtime_checkable
class Solve(Protocol):
    """A data-informed method's whole-model merge: its float tensors and what it decided (`data`: what its
    `Requests` asked for, built by whoever runs the recipe)."""

    def __call__(self, inputs: "MergeInputs", params: Any, data: Any, progress: Any) -> Solved: ...


# ---- the flows' hooks --------------------------------------------------------------------------------------------


@runtime_checkable
class Requests(Protocol):
    """The data a method learns from, as requests (merging.objective), one or a tuple; None: it needs none."""

    def __call__(self, params: Any) -> Any: ...


@runtime_checkable
class Lineage(Protocol):
    """What the method's decisions (its `Solved.details`) add to lineage."""

    def __call__(self, details: dict) -> MethodLineage: ...


@runtime_checkable
class Summary(Protocol):
    """One line of what the method decided, for the console."""

    def __call__(self, details: dict) -> str: ...


@runtime_checkable
class DataDigests(Protocol):
    """The digests of the data it read, from its details: `reproduce` says when a rebuild read other bytes."""

    def __call__(self, details: dict) -> dict[str, str]: ...


@runtime_checkable
class PerTensor(Protocol):
    """Whether, as configured, each tensor may get its own parameters (gradients, filters, per-model values)."""

    def __call__(self, params: Any) -> bool: ...


HOOKS = {"merge": Merge, "prepare": Prepare, "finalize": Finalize, "solve": Solve, "data": Requests,
         "lineage": Lineage, "describe": Summary, "data_digests": DataDigests, "per_tensor": PerTensor}
