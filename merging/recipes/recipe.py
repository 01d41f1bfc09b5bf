"""Merge recipes: YAML close to mergekit's, validated by pydantic.

    method: ties
    base: path/or/uri
    models:
      - model: path/or/uri
        weight: 1.0
    parameters: {density: 0.2, trim_scope: global, aggregate: mean, lambda: 1.0}
    out_dtype: float32
    seed: 0

A recipe's canonical form (parameters completed with their defaults, keys
sorted) and its hash are what lineage records and reproduction compare.
"""

from __future__ import annotations

import copy
import hashlib
import math
import json
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merging.errors import RecipeError
from merging.methods import MergeMethod, MethodParams, get_method
from merging.recipes.mergekit_config import is_mergekit, translate
from merging.references import parse_ref
from merging.recipes.search import AUTO, SearchSpec
from merging.recipes.settings import canonical_setting, check_setting, evaluate, first_defined, is_plain, leaves
from merging.yaml_input import YamlDoc, read_yaml, validation_problems

OutDtype = Literal["float32", "float16", "bfloat16"]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    weight: float = Field(1.0, allow_inf_nan=False)
    # this model's own parameters (mergekit's per-model `parameters:`): a value, a gradient over layers or
    # filters (`merging.recipes.settings`), taking precedence over the recipe's; `weight` here may vary by tensor
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("parameters")
    @classmethod
    def _settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, setting in value.items():
            check_setting(setting, f"parameters.{key}")
        return value


class MergeStep(BaseModel):
    """What a merge does, without its inputs: a recipe less `base` and `models` (a pipeline's `merges:` entries)."""

    model_config = ConfigDict(extra="forbid")

    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    out_dtype: OutDtype | None = None
    seed: int = Field(0, ge=0, le=2**63 - 1, description="DARE's and DELLA's masks derive from it (a 64-bit key)")
    # where the output's tokenizer files come from, as mergekit's key: `base` (the default: the base's, or the
    # first model's without one) or a model; the config always comes from the base
    tokenizer_source: str | None = None
    # the data and grid an `auto` parameter is chosen on (merging.algorithms.search)
    search: SearchSpec | None = None

    @field_validator("method")
    @classmethod
    def _known(cls, value: str) -> str:
        try:
            get_method(value)
        except RecipeError as exc:  # its message lists the known methods
            raise ValueError(str(exc)) from None
        return value

    @field_validator("tokenizer_source")
    @classmethod
    def _one_source(cls, value: str | None) -> str | None:
        if value is not None and (value == "union" or value.startswith("model:")):
            raise ValueError(f"tokenizer_source {value!r}: mergeyard takes `base` or a model, not a merged vocabulary")
        return None if value == "base" else value


class LayerSlice(BaseModel):
    """Layers [start, end) of one of the recipe's models (by its ref, or its position in `models`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | int
    layer_range: tuple[int, int]


class Recipe(MergeStep):
    """A merge as one typed, immutable object: made once from the user's mapping (`parse_recipe`) and checked
    as it is made; what derives from it (pinned to digests, `auto` chosen, learned parameters settled) is a new
    Recipe. Its typed parameters and canonical form are computed once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    # a model stacked from layer ranges of the models, in order (`passthrough` frankenmerges, merging.recipes.slices);
    # `models` defaults to the slices' models
    slices: list[LayerSlice] | None = None

    @model_validator(mode="before")
    @classmethod
    def _models_of_slices(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("slices") and not value.get("models"):
            refs = [s.get("model") for s in value["slices"] if isinstance(s, dict)]
            value = {**value, "models": list(dict.fromkeys(r for r in refs if isinstance(r, str)))}
        return value

    def slice_model(self, s: LayerSlice) -> int:
        """The position in `models` of the model slice `s` takes its layers from."""
        if isinstance(s.model, int):
            if not 0 <= s.model < len(self.models):
                raise RecipeError(f"slice model {s.model}: the recipe has {len(self.models)} models")
            return s.model
        for i, m in enumerate(self.models):
            if m.model == s.model:
                return i
        raise RecipeError(f"slice model {s.model!r} is not among the recipe's models")

    @field_validator("models", mode="before")
    @classmethod
    def _plain_strings(cls, value: Any) -> Any:
        # `models: [a, b]` is shorthand for `models: [{model: a}, {model: b}]`
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value

    @property
    def method_spec(self) -> MergeMethod:
        return get_method(self.method)

    @model_validator(mode="after")
    def _checked(self) -> "Recipe":
        return self.check()

    @cached_property
    def typed_params(self) -> MethodParams:
        return self.method_spec.parse_params(self._evaluated("", 0.0))

    def params(self) -> MethodParams:
        """The method's parameters for the recipe as a whole (a varying one at its first layer, outside filters)."""
        return self.typed_params

    def _derived(self, update: dict[str, Any]) -> "Recipe":
        """A new recipe: this one with `update`, checked, its own typed parameters and canonical form."""
        out = self.model_copy(update=update)
        for cached in _CACHED:
            out.__dict__.pop(cached, None)
        return out.check()

    def pinned(self, base: str | None, models: list[str], tokenizer_source: str | None = None,
               params: dict[str, Any] | None = None) -> "Recipe":
        """The same recipe with its inputs (and the tokenizer's source, and what its parameters name) by digest.
        Each entry keeps its weight and own parameters; slices name models by position, so they stay right."""
        update: dict[str, Any] = {"base": base,
                                  "models": [m.model_copy(update={"model": d}) for m, d in zip(self.models, models)]}
        if tokenizer_source is not None:
            update["tokenizer_source"] = tokenizer_source
        if params:
            update["parameters"] = {**self.parameters, **params}
        if self.slices:
            update["slices"] = [s.model_copy(update={"model": self.slice_model(s)}) for s in self.slices]
        return self._derived(update)

    def with_parameters(self, values: dict[str, Any]) -> "Recipe":
        """The recipe with parameters a method settled (AdaMerging's learned coefficients)."""
        return self._derived({"parameters": {**self.parameters, **values}})

    @property
    def varying(self) -> bool:
        """True when a tensor's parameters depend on more than the recipe's values: a gradient or filters, or a
        model's own parameters (what `for_tensor` resolves)."""
        return bool(self._varying_keys()) or any(m.parameters for m in self.models)

    def _varying_keys(self) -> list[str]:
        scalar = scalar_fields(self.method_spec.params)
        return [k for k, v in self.parameters.items() if k in scalar and not is_plain(v)]

    @property
    def auto_params(self) -> list[str]:
        """Parameters the recipe leaves to a search on data (`lambda: auto`)."""
        return [k for k, v in self.parameters.items() if v == AUTO]

    def with_chosen(self, values: dict[str, float]) -> "Recipe":
        """The recipe with its `auto` parameters set to the values a search chose, and no search left to run."""
        return self._derived({"parameters": {**self.parameters, **values}, "search": None})

    def _evaluated(self, tensor: str, t: float) -> dict[str, Any]:
        # only a parameter holding one value per tensor can be a setting; a list-typed one (`tasks`) is a value;
        # an `auto` one has its default until a search chose it
        scalar = scalar_fields(self.method_spec.params)
        out = {}
        for key, setting in self.parameters.items():
            if setting == AUTO:
                continue
            value = evaluate(setting, tensor, t) if key in scalar and _is_setting(setting) else setting
            if value is not None:
                out[key] = value
        return out

    def for_tensor(self, tensor: str, t: float) -> tuple[MethodParams, list[float], list[dict[str, Any]]]:
        """What one tensor gets, by mergekit's precedence (the model's own parameter, the recipe's, the default):
        the method's parameters, each model's weight, and each model's own values of its per-model parameters."""
        spec = self.method_spec
        shared = self._evaluated(tensor, t)
        params = spec.parse_params(shared)
        weights, overrides = [], []
        for m in self.models:
            own = {k: first_defined([v], tensor, t) for k, v in m.parameters.items()}
            own = {k: v for k, v in own.items() if v is not None}
            weight = own.pop("weight", m.weight)
            if own:
                validated = spec.parse_params({**shared, **own})
                own = {k: getattr(validated, _field(spec.params, k)) for k in own}
            weights.append(float(weight))
            overrides.append(own)
        return params, weights, overrides

    def check(self) -> "Recipe":
        """Raise RecipeError unless the method exists, takes these parameters and has its base."""
        spec = self.method_spec
        for key in self._varying_keys():  # the shape of a gradient or filter list, before any is evaluated
            try:
                check_setting(self.parameters[key], f"parameters.{key}")
            except ValueError as exc:
                raise RecipeError(f"method {self.method!r}: {exc}") from None
        params = self.params()
        self._check_auto()
        if spec.requires_base and not self.base:
            raise RecipeError(f"method {self.method!r} needs a `base:` model (the one the others were fine-tuned from)")
        self._check_settings(params)
        if self.slices:
            if not spec.stacks_slices:
                raise RecipeError(f"method {self.method!r} merges whole models; layer `slices:` need `passthrough`")
            if self.base:
                raise RecipeError("a stacked (sliced) model has no base")
            for s in self.slices:
                self.slice_model(s)
                if s.layer_range[0] < 0 or s.layer_range[1] <= s.layer_range[0]:
                    raise RecipeError(f"slice of {s.model}: layer_range {list(s.layer_range)} is empty")
        elif spec.stacks_slices and len(self.models) != 1:
            raise RecipeError(f"method {self.method!r} copies one model (or stacks `slices:`); the recipe has "
                              f"{len(self.models)}")
        return self

    def _check_auto(self) -> None:
        spec, auto = self.method_spec, self.auto_params
        for key in auto:
            if spec.scale_param is None:
                raise RecipeError(f"method {self.method!r}: {key}: auto — this method has no scale to choose on "
                                  f"data; give {key} a value")
            if _field(spec.params, key) != _field(spec.params, spec.scale_param):
                raise RecipeError(f"method {self.method!r}: {key}: auto — only its scale, {spec.scale_param}, can "
                                  "be chosen on data")
        if auto and (self.search is None or self.search.suite is None):
            raise RecipeError(f"method {self.method!r}: {auto[0]}: auto is chosen on a suite's calibration split: "
                              "name the suite in `search: {suite: ...}`")
        if self.search is not None and not auto:
            raise RecipeError(f"`search:` chooses `auto` parameters, and method {self.method!r} has none here"
                              + (f": set {spec.scale_param}: auto, or drop `search:`" if spec.scale_param else ""))

    def _check_settings(self, params: MethodParams) -> None:
        spec = self.method_spec
        varying = self._varying_keys()
        plain = {k: v for k, v in self.parameters.items() if k not in varying and v != AUTO}
        for key in varying:
            for value in leaves(self.parameters[key]):
                    spec.parse_params({**plain, key: value})
        per_model = set(getattr(spec.params, "per_model", ())) | {"weight"}
        for n, m in enumerate(self.models):
            unknown = sorted(set(m.parameters) - per_model)
            if unknown:
                raise RecipeError(f"method {self.method!r}: models[{n}] ({m.model}) sets {', '.join(unknown)}, which it "
                                  f"takes per model: {', '.join(sorted(per_model))}")
            for key, setting in m.parameters.items():
                for value in leaves(setting):
                    if key == "weight":
                        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                            raise RecipeError(f"models[{n}] ({m.model}): weight {value!r} is not a finite number")
                    else:
                        spec.parse_params({**plain, key: value})
        if self.varying and not spec.varies_per_tensor(params):
            raise RecipeError(f"method {self.method!r} (as configured) works on the whole model at once: its "
                              "parameters take one value each (no gradient, filters or per-model values)")

    def canonical(self) -> dict[str, Any]:
        """Parameters completed with their defaults, inputs as written (or pinned), keys in one order: what
        lineage records and `reproduce` compares (a copy: the recipe's own is computed once)."""
        return copy.deepcopy(self._canonical)

    @cached_property
    def _canonical(self) -> dict[str, Any]:
        params = self.params().model_dump(by_alias=True, mode="json")
        for key in self._varying_keys():  # a varying parameter is recorded as written, normalised
            params[key] = _canonical_numbers(canonical_setting(self.parameters[key]))
        for key in self.auto_params:
            params[_alias(self.method_spec.params, key)] = AUTO
        data = {
            "method": self.method,
            "base": self.base,
            "models": [self._canonical_model(m) for m in self.models],
            "parameters": params,
            "out_dtype": self.out_dtype,
            "seed": self.seed,
        }
        if self.tokenizer_source is not None:  # only when set: recipes without one keep their hash
            data["tokenizer_source"] = self.tokenizer_source
        if self.search is not None:  # the grid as it will be tried: the method's default written out
            data["search"] = {**self.search.model_dump(mode="json"),
                              "grid": list(self.search.grid or self.method_spec.scale_grid)}
        if self.slices:  # by position: pinning inputs to digests leaves them right
            data["slices"] = [{"model": self.slice_model(s), "layer_range": list(s.layer_range)} for s in self.slices]
        return data

    def _canonical_model(self, m: ModelEntry) -> dict[str, Any]:
        out: dict[str, Any] = {"model": m.model, "weight": m.weight}
        own = dict(m.parameters)
        if "weight" in own and is_plain(own["weight"]):  # a plain per-model weight is the entry's weight
            out["weight"] = float(own.pop("weight"))
        if own:  # only when set: recipes without any keep their hash
            spec = self.method_spec
            out["parameters"] = {
                k: (getattr(spec.parse_params({k: v}), _field(spec.params, k)) if k != "weight" and is_plain(v)
                    else _canonical_numbers(canonical_setting(v)))
                for k, v in sorted(own.items())}
        return out

    def canonical_json(self) -> str:
        return self._canonical_json

    @cached_property
    def _canonical_json(self) -> str:
        return json.dumps(self._canonical, sort_keys=True, separators=(",", ":"))

    @property
    def recipe_hash(self) -> str:
        return canonical_hash(self._canonical_json)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.canonical(), sort_keys=False)


_CACHED = ("typed_params", "_canonical", "_canonical_json")


def canonical_hash(canonical_json: str) -> str:
    """A recipe's hash from its canonical JSON (what a pipeline hands its tasks)."""
    return "sha256:" + hashlib.sha256(canonical_json.encode()).hexdigest()


def _alias(model: type[MethodParams], key: str) -> str:
    """The spelling `model_dump(by_alias=True)` gives the parameter `key` (`lambda` for `lambda_`)."""
    info = model.model_fields.get(_field(model, key))
    return (info.alias or _field(model, key)) if info is not None else key


def _field(model: type[MethodParams], key: str) -> str:
    """The attribute name of the parameter spelled `key` (its alias, as `lambda`, or its name)."""
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return name
    return key


def scalar_fields(model: type[MethodParams]) -> set[str]:
    """Names and aliases of the parameters holding one scalar (a number, flag, or choice): those a gradient or
    filters may set."""
    out = set()
    for name, info in model.model_fields.items():
        args = [a for a in (get_args(info.annotation) or (info.annotation,)) if a is not type(None)]
        if get_origin(info.annotation) is Literal or all(a in (bool, int, float, str) or get_origin(a) is Literal
                                                         for a in args):
            out |= {name, info.alias} - {None}
    return out


def _is_setting(value: Any) -> bool:
    return isinstance(value, (list, dict)) or is_plain(value)


def _canonical_numbers(setting: Any) -> Any:
    """Integers in gradients written as floats (1 and 1.0 interpolate alike, so they must hash alike)."""
    if isinstance(setting, bool) or not isinstance(setting, (int, float, list, dict)):
        return setting
    if isinstance(setting, (int, float)):
        return float(setting)
    if isinstance(setting, dict):
        return {k: (v if k == "filter" else _canonical_numbers(v)) for k, v in setting.items()}
    return [_canonical_numbers(e) for e in setting]


def _resolve_local(ref: str, root: Path) -> str:
    """A relative path that exists beside the recipe becomes absolute; anything else (a URI, a
    registry name or digest, a path that does not exist) is left for whoever runs the merge."""
    return str(parse_ref(ref, root))


def _rebase_search(search: SearchSpec | None, root: Path) -> SearchSpec | None:
    """A suite file named by a relative path in `search:` is taken from the recipe's folder."""
    if search is None or search.suite is None or "://" in search.suite or Path(search.suite).is_absolute():
        return search
    candidate = root / search.suite
    return search.model_copy(update={"suite": str(candidate.resolve())}) if candidate.is_file() else search


def parse_recipe(data: Any, root: Path | None = None, doc: YamlDoc | None = None) -> Recipe:
    """A checked Recipe from parsed YAML/JSON; relative paths resolve against `root`; `doc` gives errors lines."""
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping with at least `method:` and `models:`")
    if is_mergekit(data):  # mergekit's own YAML, as it is
        data, doc = translate(data, root), None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"invalid recipe: {validation_problems(exc, doc, root='recipe')}") from None
    if root is not None:
        recipe = recipe._derived(
            {
                "base": _resolve_local(recipe.base, root) if recipe.base else None,
                "models": [m.model_copy(update={"model": _resolve_local(m.model, root)}) for m in recipe.models],
                "parameters": recipe.method_spec.rebase_paths(recipe.parameters, root),
                "search": _rebase_search(recipe.search, root),
                "tokenizer_source": _resolve_local(recipe.tokenizer_source, root) if recipe.tokenizer_source else None,
                "slices": [s.model_copy(update={"model": _resolve_local(s.model, root)}) if isinstance(s.model, str)
                           else s for s in recipe.slices] if recipe.slices else None,
            }
        )
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    doc = read_yaml(path, RecipeError, "recipe")
    return parse_recipe(doc.data, root=path.parent.resolve(), doc=doc)
