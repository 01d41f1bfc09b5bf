"""A recipe's inputs opened as the merge sees them: resolved to files, checked, and aligned under one set of names.

A fine-tune saved by a task class (`bert.encoder…` beside a `classifier`) is seen under the base's names; a LoRA
adapter as its base plus scaling·B@A; a `slices:` recipe as the one model stacked from its layer ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from merging.checkpoints.alignment import align_all, check_buffers_equal
from merging.checkpoints.checkpoint import SINGLE_NAME, Checkpoint
from merging.checkpoints.companions import CONFIG_FILES, PREPROCESSOR_FILES, TOKENIZER_FILES, companion_files
from merging.checkpoints.lora import LoraView, is_adapter, is_peft_adapter
from merging.checkpoints.remote import is_remote_url, open_checkpoint, remote_path
from merging.errors import CheckpointError, MergeyardError, RecipeError
from merging.recipes.recipe import Recipe
from merging.recipes.slices import layer_count, stack as stack_layers, stacked_config as stacked_model_config
from merging.references import parse_ref

Resolver = Callable[[str], Path]


def local_path(ref: str) -> Path:
    """The default resolver: local paths, and checkpoints on object storage (s3://… read by ranged GETs,
    `merging.checkpoints.remote`); other source URIs (hf://, mlflow://) need `mergeyard ingest` first."""
    if is_remote_url(ref):
        return remote_path(ref)
    parsed = parse_ref(ref)
    if parsed.scheme not in ("file", None):
        raise CheckpointError(f"{ref}: only local paths and object storage URLs can be merged directly; ingest it "
                              "into the registry first")
    return parsed.path or Path(ref)


@dataclass
class OpenedInputs:
    """Every input of a recipe, opened: its stored checkpoint (whose bytes the digest covers) and the view the
    merge reads (aligned to the reference's names, an adapter applied, slices stacked)."""

    refs: list[str]  # base first, then the models, each once
    paths: dict[str, Path]
    stored: dict[str, Checkpoint]
    labels: dict[str, str]
    reference: Checkpoint  # whose names, dtypes and shapes the output has
    base: Checkpoint | None  # as merged
    models: list[Checkpoint]  # as merged (one, the stacked model, for `slices:`)
    weights: list[float]
    companions: list[Path]  # config, tokenizer, preprocessor files the output carries
    wrapped: dict[int, dict] = field(default_factory=dict)  # candidate → the task wrapper its encoder sat in
    stacked_config: str | None = None  # a stacked model's config.json (its layer count)


def open_inputs(recipe: Recipe, out_dir: Path, resolve: Resolver = local_path,
                labels: dict[str, str] | None = None) -> OpenedInputs:
    refs = list(dict.fromkeys(([recipe.base] if recipe.base else []) + [m.model for m in recipe.models]))
    paths = {ref: resolve(ref) for ref in refs}
    for ref, path in paths.items():
        if isinstance(path, Path) and (out_dir.resolve() == path.resolve() or out_dir.resolve() in path.resolve().parents):
            raise MergeyardError(f"the output directory {out_dir} would overwrite the input {ref}; write the merge "
                                 "elsewhere")
    for ref, path in paths.items():
        if is_peft_adapter(path):
            raise CheckpointError(f"{ref}: a PEFT adapter directory; register it on its base first (`mergeyard ingest "
                                  f"{ref} --base BASE`), or name it in a recipe `mergeyard merge` runs")
    stored = {ref: open_checkpoint(path) for ref, path in paths.items()}  # whole files: their digests
    label = {ref: (labels or {}).get(ref, ref) for ref in refs}
    checkpoints = with_adapters_applied(stored, recipe.base, label)  # what is merged
    reference_ref = recipe.base or recipe.models[recipe.slice_model(recipe.slices[0]) if recipe.slices else 0].model
    tokenizer = resolve(recipe.tokenizer_source) if recipe.tokenizer_source else None
    # config from the base, tokenizer from it or the recipe's tokenizer_source: found before any work is done
    companions = loadability_files(paths[reference_ref], tokenizer)
    common = dict(refs=refs, paths=paths, stored=stored, labels=label, companions=companions)
    if recipe.slices:
        return _stacked(recipe, checkpoints, paths[reference_ref], label, common)
    reference = checkpoints[reference_ref]
    # Each input seen under the reference's names: a task model's head is not merged, its encoder is.
    aligned = dict(zip(refs, align_all(reference, [checkpoints[r] for r in refs],
                                       [label[reference_ref], *(label[r] for r in refs)])))
    views = {ref: view for ref, (view, _) in aligned.items()}
    check_buffers_equal(reference, [v for v in views.values() if v is not reference],
                        {id(views[r]): label[r] for r in refs})
    wrapped = {i: aligned[m.model][1].as_dict() for i, m in enumerate(recipe.models) if aligned[m.model][1].wraps}
    return OpenedInputs(reference=reference, base=views[recipe.base] if recipe.base else None,
                        models=[views[m.model] for m in recipe.models], weights=[m.weight for m in recipe.models],
                        wrapped=wrapped, **common)


def _stacked(recipe: Recipe, checkpoints: dict[str, Checkpoint], reference_path: Path, label: dict[str, str],
             common: dict) -> OpenedInputs:
    """One input: the model stacked from the slices' layer ranges (models of other layer counts may take part)."""
    sources = [(checkpoints[recipe.models[recipe.slice_model(s)].model], s.layer_range,
                label[recipe.models[recipe.slice_model(s)].model]) for s in recipe.slices]
    reference = stack_layers(sources)
    config_dir = reference_path if reference_path.is_dir() else reference_path.parent
    config = stacked_model_config(config_dir / "config.json", layer_count(reference)) \
        if (config_dir / "config.json").is_file() else None
    return OpenedInputs(reference=reference, base=None, models=[reference], weights=[1.0], stacked_config=config,
                        **common)


def with_adapters_applied(stored: dict[str, Checkpoint], base_ref: str | None,
                          label: dict[str, str]) -> dict[str, Checkpoint]:
    """Each input as it is merged: a LoRA adapter is its task vector on the recipe's base (`merging.checkpoints.lora`)."""
    adapters = [ref for ref, ckpt in stored.items() if is_adapter(ckpt)]
    if not adapters:
        return stored
    if base_ref is None or base_ref in adapters:
        raise RecipeError(f"{label[adapters[0]]} is a LoRA adapter: a task vector on a base, so the recipe needs a "
                          "base model (base:) that is a full checkpoint")
    return {ref: LoraView(ckpt, stored[base_ref], label[ref], label[base_ref]) if ref in adapters else ckpt
            for ref, ckpt in stored.items()}


def loadability_files(reference: Path, tokenizer_source: Path | None = None) -> list[Path]:
    """What makes the output loadable by transformers: the reference's (the base's) config and generation config,
    and the tokenizer and preprocessor files of `tokenizer_source` (default: the reference). Only a checkpoint
    directory's files count: beside a loose .safetensors file may lie anything."""
    def folder(path: Path | None) -> Path | None:
        if path is None:
            return None
        path = path if hasattr(path, "is_dir") else Path(path)  # a UPath on object storage stays one
        return path if path.is_dir() else path.parent if path.name == SINGLE_NAME else None

    config_dir, tokenizer_dir = folder(reference), folder(tokenizer_source) or folder(reference)
    if tokenizer_source is not None and tokenizer_dir is None:
        raise MergeyardError(f"tokenizer_source {tokenizer_source}: not a model directory holding a tokenizer")
    out = companion_files(config_dir, CONFIG_FILES) if config_dir else []
    return out + (companion_files(tokenizer_dir, TOKENIZER_FILES + PREPROCESSOR_FILES) if tokenizer_dir else [])
