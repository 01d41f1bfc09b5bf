"""Merge methods, registered by name with a parameter model and a paper.

A method is a pure function of (inputs of one tensor, parameters, state) that
yields the merged tensor chunk by chunk. A method that needs to look at the
whole model first (global TIES thresholds) supplies `prepare`; one that must
correct output after seeing every tensor supplies `finalize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from merging.errors import RecipeError
from merging.inputs import MergeInputs, TensorInputs


class MethodParams(BaseModel):
    """Base of every parameter model: unknown keys are an error, not ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


@dataclass(frozen=True)
class Patch:
    """Output values to overwrite after the merge pass (flat indices into one tensor)."""

    name: str
    indices: torch.Tensor
    values: torch.Tensor


MergeFn = Callable[[TensorInputs, Any, Any], Iterator[torch.Tensor]]
PrepareFn = Callable[[MergeInputs, Any], Any]
FinalizeFn = Callable[[Any], list[Patch]]


@dataclass
class Solved:
    """What a whole-model (data-informed) method returns: the merged float tensors and what it decided."""

    state: dict[str, torch.Tensor]
    details: dict[str, Any]


# (inputs, params, objective, progress) → Solved; the objective is built by the caller from the params
SolveFn = Callable[[MergeInputs, Any, Any, Any], Solved]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    params: type[MethodParams]
    paper: str
    summary: str
    merge: MergeFn
    requires_base: bool = True
    prepare: PrepareFn | None = None
    finalize: FinalizeFn | None = None
    # True when any NaN/inf in an input reaches the output (0·NaN and 0·inf are NaN): the engine
    # then checks only the output, and looks for the culprit input only when that check fails.
    propagates_non_finite: bool = False
    # A data-informed method works on the whole model at once with an objective (a loss and its
    # gradient, see merging.objective) instead of streaming tensor by tensor.
    solve: SolveFn | None = None

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
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'parameters'}: {err['msg']}" for err in exc.errors()
            )
            allowed = ", ".join(f.alias or n for n, f in self.params.model_fields.items())
            raise RecipeError(f"method {self.name!r}: {problems} (parameters it takes: {allowed})") from None


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


def merge_method(
    name: str,
    *,
    params: type[MethodParams],
    paper: str,
    requires_base: bool = True,
    prepare: PrepareFn | None = None,
    finalize: FinalizeFn | None = None,
    propagates_non_finite: bool = False,
    solve: SolveFn | None = None,
) -> Callable[[MergeFn], MergeFn]:
    """Register `fn` as the merge method `name`."""

    def register(fn: MergeFn) -> MergeFn:
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _METHODS[name] = MergeMethod(name, params, paper, summary, fn, requires_base, prepare, finalize,
                                     propagates_non_finite, solve)
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise RecipeError(f"unknown merge method {name!r}; known: {', '.join(sorted(_METHODS))}") from None


def all_methods() -> list[MergeMethod]:
    return [_METHODS[n] for n in sorted(_METHODS)]
