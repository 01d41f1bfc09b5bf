"""Merge methods, registered by name with a parameter model, a paper and the hooks it needs (merging.methods.hooks).

A method is a pure function of (inputs of one tensor, parameters, state) that
yields the merged tensor chunk by chunk. A method that needs to look at the
whole model first (global TIES thresholds) supplies `prepare`; one that must
correct output after seeing every tensor supplies `finalize`; a data-informed
one supplies `solve` and the data it asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from merging.errors import RecipeError
from merging.methods.hooks import (  # noqa: F401  (Patch and Solved: what methods return, importable from here)
    HOOKS, DataDigests, Finalize, Lineage, Merge, Patch, PerTensor, Prepare, Requests, Solve, Solved, Summary,
)
from merging.yaml_input import validation_problems


# What `auto` tries by default (merging.algorithms.search): task arithmetic sums its task vectors, so its λ lives below 1;
# the consensus and sparse methods' merged vector is a mean or a sparse sum, whose λ runs around 1.
LAMBDA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
CONSENSUS_GRID = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0)


class MethodParams(BaseModel):
    """Base of every parameter model: unknown keys are an error, not ignored.

    `per_model` names the parameters a model entry may set for itself (mergekit's per-model `density`);
    a method reads them per tensor with `TensorInputs.per_model`."""

    # NaN and infinity are refused where they are written: a merge would otherwise run to the end and fail its
    # output's finite check
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False)
    per_model: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class MergeMethod:
    name: str
    params: type[MethodParams]
    paper: str
    summary: str
    merge: Merge
    requires_base: bool = True
    prepare: Prepare | None = None
    finalize: Finalize | None = None
    # True when any NaN/inf in an input reaches the output (0·NaN and 0·inf are NaN): the engine
    # then checks only the output, and looks for the culprit input only when that check fails.
    propagates_non_finite: bool = False
    # A data-informed method works on the whole model at once with an objective (a loss and its
    # gradient, see merging.objective) instead of streaming tensor by tensor.
    solve: Solve | None = None
    # ---- wiring: what the flows call, for every method alike ----
    data: Requests | None = None
    # where its parameters name a suite and its tasks ("suite", "calibration.suite"): a pipeline fills in its own
    suite_param: str | None = None
    tasks_param: str | None = None
    lineage: Lineage | None = None
    describe: Summary | None = None
    data_digests: DataDigests | None = None
    # parameters that show it at work on the demo's small zoo; None leaves it out of the demo (a method for
    # exactly two models or for stacked slices, or one its own tests cover, so the demo stays a few minutes)
    example: dict[str, Any] | None = None
    # parameters naming registered models or artifacts (RegMean's statistics): recorded by digest, like inputs
    model_params: tuple[str, ...] = ()
    # whether (as configured) each tensor may get its own parameters and weights (gradients, filters): a
    # method that decides over the whole model at once (global TIES thresholds, a data-informed solve) cannot
    per_tensor: PerTensor | None = None
    # takes the one model stacked from the recipe's layer `slices:` (passthrough) instead of the models
    stacks_slices: bool = False
    # the parameter scaling what the method adds to its base (λ, α): a recipe may set it to `auto`, searched on a
    # suite's calibration split (merging.algorithms.search) over `scale_grid` unless the recipe's `search:` names a grid;
    # `scale_affine`: the output is A + s·B in it, so the search merges twice, not once per value
    scale_param: str | None = None
    scale_grid: tuple[float, ...] = ()
    scale_affine: bool = True

    def __post_init__(self):
        for hook, protocol in HOOKS.items():  # a plugin's hook that lacks what its protocol asks for fails here
            value = getattr(self, hook)
            if value is not None and not isinstance(value, protocol):
                raise TypeError(f"merge method {self.name!r}: its {hook} is not a {protocol.__name__} "
                                f"(merging.methods.hooks): {value!r}")

    def varies_per_tensor(self, params: Any) -> bool:
        if self.solve is not None:
            return False
        return True if self.per_tensor is None else self.per_tensor(params)

    @property
    def data_informed(self) -> bool:
        return self.solve is not None

    def rebase_paths(self, raw: dict[str, Any] | None, root: Path) -> dict[str, Any]:
        """`raw` with every relative file path among its parameters (fields marked `path_field`, such as a suite
        file) taken from `root`, the folder of the YAML that named it."""
        return _rebase(self.params, dict(raw or {}), root)

    def parse_params(self, raw: dict[str, Any] | None) -> MethodParams:
        try:
            return self.params.model_validate(raw or {})
        except ValidationError as exc:
            allowed = ", ".join(f.alias or n for n, f in self.params.model_fields.items())
            raise RecipeError(f"method {self.name!r}: {validation_problems(exc, root='parameters')} "
                              f"(parameters it takes: {allowed})") from None

    def with_suite(self, raw: dict[str, Any], suite: str, tasks: list[str] | None) -> dict[str, Any]:
        """`raw` parameters naming `suite` (and `tasks`) wherever the method takes its data from, unless they name
        a suite already (a pipeline's data-informed merges optimise the pipeline's suite by default)."""
        if self.suite_param is None or _get(raw, self.suite_param) is not None:
            return raw
        out = _set(raw, self.suite_param, suite)
        return _set(out, self.tasks_param, list(tasks)) if tasks and self.tasks_param else out


def _get(raw: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        raw = raw.get(key) if isinstance(raw, dict) else None
    return raw


def _set(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    head, _, rest = path.partition(".")
    if not rest:
        return {**raw, head: value}
    inner = raw.get(head) if isinstance(raw.get(head), dict) else {}
    return {**raw, head: _set(inner, rest, value)}


def path_field(default: Any = None, **kwargs) -> Any:
    """A parameter that may name a file (a suite file): recipes resolve it against their own folder."""
    return Field(default, json_schema_extra={"path": True}, **kwargs)


def _rebase(model: type[BaseModel], raw: dict[str, Any], root: Path) -> dict[str, Any]:
    for name, info in model.model_fields.items():
        key = info.alias or name
        value = raw.get(key)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("path") and isinstance(value, str) and "://" not in value:
            candidate = root / value
            if not Path(value).is_absolute() and candidate.is_file():
                raw[key] = str(candidate.resolve())
        elif isinstance(value, dict) and isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            raw[key] = _rebase(info.annotation, dict(value), root)
    return raw


_METHODS: dict[str, MergeMethod] = {}
ENTRY_POINT_GROUP = "mergeyard.methods"
_plugins_loaded = False


def merge_method(name: str, *, params: type[MethodParams], paper: str, **options: Any) -> Callable[[Merge], Merge]:
    """Register `fn` as the merge method `name`; `options` are `MergeMethod`'s fields (requires_base, prepare,
    finalize, propagates_non_finite, solve, and the wiring: data, suite_param, tasks_param, lineage, describe,
    data_digests, example). Third parties do the same in a module named in the entry-point group
    `mergeyard.methods`."""

    def register(fn: Merge) -> Merge:
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _METHODS[name] = MergeMethod(name=name, params=params, paper=paper, summary=summary, merge=fn, **options)
        return fn

    return register


def unregister(name: str) -> None:
    """Remove a registered method (a test's or a notebook's own)."""
    _METHODS.pop(name, None)


def _load_plugins() -> None:
    """Import each module the `mergeyard.methods` entry points name: importing one registers its methods."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not look like a mergeyard bug
            raise RecipeError(f"the plugin method module {ep.value!r} ({ep.name}) failed to load: {exc}") from None


def get_method(name: str) -> MergeMethod:
    if name not in _METHODS:
        _load_plugins()
    try:
        return _METHODS[name]
    except KeyError:
        raise RecipeError(f"unknown merge method {name!r}; known: {', '.join(sorted(_METHODS))}") from None


def all_methods() -> list[MergeMethod]:
    _load_plugins()
    return [_METHODS[n] for n in sorted(_METHODS)]
