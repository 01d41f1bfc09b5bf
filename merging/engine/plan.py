"""A merge plan: what an executor does, as data, made from a recipe and its inputs' headers before any tensor is read.

For each output tensor, in the order it is written: the shard it goes to, its dtype and shape, whether it is merged
(float) or copied from the reference (a buffer), the byte ranges of every input it reads (file relative to the
input's checkpoint, offset, length, the tensor stored there), and — where the recipe varies by tensor (gradients,
filters, a model's own values) — the parameters and weights that tensor gets. Model-wide steps are named with how
they decompose: global TIES's thresholds are a map over tensors (per model, a histogram of |τ|'s bit patterns)
and an exact reduce (the histograms summed, the rank selected), in two passes; a data-informed method's solve
comes first and the units write what it solved.

The plan serialises to JSON and has a digest; it names inputs by digest and files relative to them, so the same
merge has the same plan wherever its inputs lie. The run records it (`mergeyard reproduce` shows it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from merging.checkpoints.checkpoint import Checkpoint
from merging.checkpoints.names import layer_positions
from merging.engine.opening import OpenedInputs
from merging.engine.writer import Layout, plan_shards, shard_file_names
from merging.recipes.recipe import Recipe

PLAN_FORMAT = "mergeyard-plan-v1"
OUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ByteRange(_Data):
    input: int  # position in the plan's inputs
    file: str  # relative to the input's checkpoint (its directory, or its file's)
    offset: int
    length: int
    tensor: str  # the name stored in that file


class PlannedInput(_Data):
    ref: str
    digest: str


class TensorUnit(_Data):
    name: str
    dtype: str  # the output's safetensors dtype
    shape: tuple[int, ...]
    shard: int
    action: Literal["merge", "copy"]  # merged from the inputs (floats), or the reference's buffer copied
    reads: tuple[ByteRange, ...]
    # where the recipe varies by tensor: this tensor's parameters, each model's weight and its own values
    params: dict[str, Any] | None = None
    weights: tuple[float, ...] | None = None
    overrides: tuple[dict[str, Any], ...] | None = None


class ModelWideStep(_Data):
    step: str
    map: str
    reduce: str
    passes: int


class MergePlan(_Data):
    format: Literal["mergeyard-plan-v1"] = PLAN_FORMAT
    method: str
    recipe_hash: str
    parameters: dict[str, Any]
    seed: int
    inputs: tuple[PlannedInput, ...]
    max_shard_bytes: int
    shards: tuple[str, ...]
    units: tuple[TensorUnit, ...]
    preparation: tuple[ModelWideStep, ...] = ()
    solve: bool = False  # a data-informed method solves the whole model before the units write it
    finalize: str | None = None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> "MergePlan":
        return cls.model_validate_json(text)


def layout_of(reference: Checkpoint, out_dtype: str | None) -> Layout:
    """(name, output dtype, shape) of every tensor, in name order: floats in `out_dtype` (default: as stored)."""
    target = OUT_DTYPES.get(out_dtype) if out_dtype else None
    return [(n, (target or e.dtype) if e.is_float else e.dtype, e.shape)
            for n, e in ((n, reference.entries[n]) for n in reference.names)]


def plan_merge(recipe: Recipe, opened: OpenedInputs, digests: dict[str, str], max_shard_bytes: int) -> MergePlan:
    """The plan of `recipe` (its `auto` parameters already chosen) over `opened`."""
    spec, reference = recipe.method_spec, opened.reference
    layout = layout_of(reference, recipe.out_dtype)
    shards = plan_shards(layout, max_shard_bytes)
    shard_of = {name: s for s, shard in enumerate(shards) for name, _, _ in shard}
    owner = _file_owners(opened)
    positions = layer_positions(reference.names) if recipe.varying and not spec.data_informed else {}
    readers = ([opened.base] if opened.base is not None else []) + list(opened.models)
    units = []
    for name, dtype, shape in layout:
        merged = reference.entries[name].is_float
        sources = readers if merged else [reference]
        reads = tuple(r for view in sources for r in _ranges(view, name, owner))
        units.append(TensorUnit(name=name, dtype=dtype, shape=tuple(shape), shard=shard_of[name],
                                action="merge" if merged else "copy", reads=reads,
                                **(_varying(recipe, name, positions[name]) if merged and name in positions else {})))
    prepare = spec.prepare
    return MergePlan(
        method=spec.name, recipe_hash=recipe.recipe_hash, parameters=recipe.params().model_dump(mode="json",
                                                                                                 by_alias=True),
        seed=recipe.seed, inputs=tuple(PlannedInput(ref=r, digest=digests[r]) for r in opened.refs),
        max_shard_bytes=max_shard_bytes, shards=tuple(shard_file_names(len(shards))), units=tuple(units),
        preparation=tuple(ModelWideStep(**step) for step in (prepare.describe(recipe.params()) if prepare else [])),
        solve=spec.data_informed, finalize=spec.finalize.describe if spec.finalize else None)


def _varying(recipe: Recipe, name: str, position: float) -> dict[str, Any]:
    params, weights, overrides = recipe.for_tensor(name, position)
    if recipe.slices:  # a stacked model is one input: the models' own values do not apply to it
        return {"params": params.model_dump(mode="json", by_alias=True)}
    return {"params": params.model_dump(mode="json", by_alias=True), "weights": tuple(weights),
            "overrides": tuple(overrides)}


def _file_owners(opened: OpenedInputs) -> dict[Path, tuple[int, Path]]:
    """Each file an input holds → (the input's position, the folder its files are named from)."""
    owners: dict[Path, tuple[int, Path]] = {}
    for i, ref in enumerate(opened.refs):
        ckpt = opened.stored[ref]
        root = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
        for f in ckpt.files:
            owners.setdefault(_as_path(f), (i, root))
    return owners


def _as_path(file):
    return file if hasattr(file, "relative_to") else Path(file)  # a UPath on object storage stays one


def _ranges(view: Checkpoint, name: str, owner: dict[Path, tuple[int, Path]]) -> list[ByteRange]:
    out = []
    for file, offset, length, stored in view.locate(name):
        file = _as_path(file)
        i, root = owner[file]
        out.append(ByteRange(input=i, file=str(file.relative_to(root)), offset=offset, length=length,
                             tensor=stored))
    return out
