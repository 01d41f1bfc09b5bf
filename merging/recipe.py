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

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from merging.errors import RecipeError
from merging.methods import MergeMethod, MethodParams, get_method
from merging.references import parse_ref
from merging.yaml_input import YamlDoc, read_yaml, validation_problems

OutDtype = Literal["float32", "float16", "bfloat16"]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    weight: float = 1.0


class MergeStep(BaseModel):
    """What a merge does, without its inputs: a recipe less `base` and `models` (a pipeline's `merges:` entries)."""

    model_config = ConfigDict(extra="forbid")

    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    out_dtype: OutDtype | None = None
    seed: int = 0
    # where the output's tokenizer files come from, as mergekit's key: `base` (the default: the base's, or the
    # first model's without one) or a model; the config always comes from the base
    tokenizer_source: str | None = None

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


class Recipe(MergeStep):
    base: str | None = None
    models: list[ModelEntry] = Field(min_length=1)

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

    def params(self) -> MethodParams:
        return self.method_spec.parse_params(self.parameters)

    def check(self) -> "Recipe":
        """Raise RecipeError unless the method exists, takes these parameters and has its base."""
        spec = self.method_spec
        self.params()
        if spec.requires_base and not self.base:
            raise RecipeError(f"method {self.method!r} needs a `base:` model (the one the others were fine-tuned from)")
        return self

    def canonical(self) -> dict[str, Any]:
        data = {
            "method": self.method,
            "base": self.base,
            "models": [{"model": m.model, "weight": m.weight} for m in self.models],
            "parameters": self.params().model_dump(by_alias=True, mode="json"),
            "out_dtype": self.out_dtype,
            "seed": self.seed,
        }
        if self.tokenizer_source is not None:  # only when set: recipes without one keep their hash
            data["tokenizer_source"] = self.tokenizer_source
        return data

    def canonical_json(self) -> str:
        return json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))

    @property
    def recipe_hash(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.canonical(), sort_keys=False)


def _resolve_local(ref: str, root: Path) -> str:
    """A relative path that exists beside the recipe becomes absolute; anything else (a URI, a
    registry name or digest, a path that does not exist) is left for whoever runs the merge."""
    return str(parse_ref(ref, root))


def parse_recipe(data: Any, root: Path | None = None, doc: YamlDoc | None = None) -> Recipe:
    """A checked Recipe from parsed YAML/JSON; relative paths resolve against `root`; `doc` gives errors lines."""
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping with at least `method:` and `models:`")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"invalid recipe: {validation_problems(exc, doc, root='recipe')}") from None
    if root is not None:
        recipe = recipe.model_copy(
            update={
                "base": _resolve_local(recipe.base, root) if recipe.base else None,
                "models": [m.model_copy(update={"model": _resolve_local(m.model, root)}) for m in recipe.models],
                "parameters": recipe.method_spec.rebase_paths(recipe.parameters, root),
                "tokenizer_source": _resolve_local(recipe.tokenizer_source, root) if recipe.tokenizer_source else None,
            }
        )
    return recipe.check()


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    doc = read_yaml(path, RecipeError, "recipe")
    return parse_recipe(doc.data, root=path.parent.resolve(), doc=doc)
