"""A merge that is recorded: inputs registered, the recipe pinned to digests, the output registered with lineage.

The recipe stored for a run names its inputs by content digest, not by path,
so `reproduce` can rebuild it from the store wherever the original files went.
A run row says `running` while the merge works and `succeeded` only in the
transaction that registers the output; a failure marks it `failed`, leaves no
model row and removes the output directory this merge created.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from merging.engine import MergeResult, environment, resolve_device, run_merge
from merging.inputs import ProgressFn
from merging.recipe import Recipe, parse_recipe
from merging.version import __version__
from flows.provenance import code_revision
from registry.errors import ModelNotFoundError, RegistryError
from registry.registry import ModelInfo, Parent, Registry


@dataclass
class RecordedMerge:
    model: ModelInfo
    result: MergeResult
    run_id: int
    out_dir: Path | None


def resolve_input(registry: Registry, ref: str) -> ModelInfo:
    """A recipe input: a source to ingest (URI or existing path), else a registry reference."""
    if "://" in ref or os.path.exists(ref):
        return registry.ingest(ref)[0]
    try:
        return registry.resolve(ref)
    except ModelNotFoundError:
        raise RegistryError(f"recipe input {ref!r} is neither a path, a source URI nor a registered model") from None


def pin_recipe(recipe: Recipe, base: ModelInfo | None, models: list[ModelInfo]) -> Recipe:
    """The same recipe with every input named by its digest."""
    data = recipe.canonical()
    data["base"] = base.digest if base else None
    data["models"] = [{"model": m.digest, "weight": entry["weight"]} for m, entry in zip(models, data["models"])]
    return parse_recipe(data)


def store_resolver(registry: Registry):
    def resolve(digest: str) -> Path:
        info = registry.find_digest(digest)
        if info is None:
            raise ModelNotFoundError(f"input {digest} is not in the registry")
        return Path(info.store_path)

    return resolve


def merge_and_record(recipe: Recipe, registry: Registry, *, out: Path | None = None, name: str | None = None,
                     device: str = "cpu", max_shard_bytes: int = 5_000_000_000, overwrite: bool = False,
                     progress: ProgressFn | None = None) -> RecordedMerge:
    base = resolve_input(registry, recipe.base) if recipe.base else None
    models = [resolve_input(registry, m.model) for m in recipe.models]
    pinned = pin_recipe(recipe, base, models)
    params = {"method": pinned.method, "seed": str(pinned.seed), "recipe_hash": pinned.recipe_hash,
              "out_dtype": str(pinned.out_dtype), **{f"param.{k}": str(v) for k, v in pinned.params().model_dump(by_alias=True).items()}}
    run_id = registry.begin_merge_run(
        method=pinned.method, recipe_json=pinned.canonical_json(), recipe_hash=pinned.recipe_hash, seed=pinned.seed,
        mergeyard_version=__version__, environment=environment(resolve_device(device)), code_revision=code_revision(),
        params=params,
    )
    target = out if out is not None else registry.config.scratch / f"merge-run-{run_id}"
    created_output = False
    try:
        result = run_merge(pinned, target, device=device, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                           progress=progress, resolve=store_resolver(registry),
                           input_digests={m.digest: m.digest for m in ([base] if base else []) + models})
        created_output = True
        parents = ([Parent(base, "base")] if base else []) + [
            Parent(m, "candidate", weight=entry.weight, details={"position": i})
            for i, (m, entry) in enumerate(zip(models, pinned.models))
        ]
        model = registry.complete_merge_run(run_id, target, result.digest, name or f"merged-{pinned.method}", parents,
                                            result.seconds)
    except BaseException as exc:
        registry.fail_merge_run(run_id, f"{type(exc).__name__}: {exc}")
        if created_output:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if out is None:
        shutil.rmtree(target, ignore_errors=True)  # the store holds the registered copy
    return RecordedMerge(model, result, run_id, out)
