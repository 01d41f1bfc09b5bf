"""The streaming merge engine: a recipe in, a checkpoint directory out.

Inputs are memory-mapped and read one tensor (or row chunk) at a time;
computation is float32 on the chosen device; output streams into shards in
sorted-name order, hashed as it goes. Peak memory is a few chunks per input,
independent of model size.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from merging.alignment import align_all, check_buffers_equal
from merging.checkpoint import SINGLE_NAME, Checkpoint
from merging.companions import CONFIG_FILES, PREPROCESSOR_FILES, TOKENIZER_FILES, companion_files
from merging.digest import checkpoint_digest
from merging.finite import all_finite
from merging.errors import CheckpointError, DeviceError, MergeyardError, NonFiniteError, RecipeError
from merging.lora import LoraView, is_adapter, is_peft_adapter
from merging.inputs import DEFAULT_CHUNK_ELEMS, MergeInputs, ProgressFn, check_input_finite
from merging.model_card import InputRecord, provenance, provenance_json, render_model_card
from merging.output import DEFAULT_MAX_SHARD_BYTES, CheckpointWriter, Layout
from merging.recipe import Recipe
from merging.references import parse_ref
from merging.safetensors_format import DTYPE_NAMES, DTYPES
from merging.search import search_scale
from merging.settings import layer_positions
from merging.slices import layer_count, stack as stack_layers, stacked_config as stacked_model_config
from merging.version import __version__

OUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
Resolver = Callable[[str], Path]


@dataclass
class MergeResult:
    out_dir: Path
    digest: str
    files: list[str]
    method: str
    recipe_hash: str
    input_digests: dict[str, str]
    num_params: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # what a data-informed method decided (e.g. FW's selections)
    resolved: Recipe | None = None  # the recipe with what the method settled (learned coefficients), if it did
    file_sha256: dict[str, str] = field(default_factory=dict)  # shard file name -> sha256, hashed as written

    def as_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "digest": self.digest,
            "files": self.files,
            "method": self.method,
            "recipe_hash": self.recipe_hash,
            "input_digests": self.input_digests,
            "num_params": self.num_params,
            "seconds": round(self.seconds, 3),
        }


def local_path(ref: str) -> Path:
    """The default resolver: local paths only (registry URIs need `mergeyard ingest` first)."""
    parsed = parse_ref(ref)
    if parsed.scheme not in ("file", None):
        raise CheckpointError(f"{ref}: only local paths can be merged directly; ingest it into the registry first")
    return parsed.path or Path(ref)


def with_adapters_applied(stored: dict[str, Checkpoint], base_ref: str | None,
                          label: dict[str, str]) -> dict[str, Checkpoint]:
    """Each input as it is merged: a LoRA adapter is its task vector on the recipe's base (`merging.lora`)."""
    adapters = [ref for ref, ckpt in stored.items() if is_adapter(ckpt)]
    if not adapters:
        return stored
    if base_ref is None or base_ref in adapters:
        raise RecipeError(f"{label[adapters[0]]} is a LoRA adapter: a task vector on a base, so the recipe needs a "
                          "base model (base:) that is a full checkpoint")
    return {ref: LoraView(ckpt, stored[base_ref], label[ref], label[base_ref]) if ref in adapters else ckpt
            for ref, ckpt in stored.items()}


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("the cuda device was asked for, but torch sees no CUDA GPU here; use the cpu")
    return device


def environment(device: torch.device) -> dict[str, str]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "platform": sys.platform}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run_merge(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    resolve: Resolver = local_path,
    input_digests: dict[str, str] | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    data: Callable[[Any], Any] | None = None,
    labels: dict[str, str] | None = None,
    validated_inputs: bool = False,
) -> MergeResult:
    """Merge as the recipe says and write the result to `out_dir`. All or nothing.

    A data-informed method (FW-Merging, MuDSC) asks for its data with requests (`merging.objective`); `data`
    builds each into an objective or calibration set (the caller knows the suites; `merging/` does not).
    `labels` names inputs in messages (a registry passes model names where the recipe holds digests).
    `validated_inputs`: the resolver hands out only checkpoints already checked finite (a registry's), so their
    elements are not checked again (a non-finite output still is, and then blames an input).
    """
    started = time.perf_counter()
    phases: dict[str, float] = {}
    recipe.check()
    requested = recipe  # its hash names the run; `auto` parameters are settled below
    spec = recipe.method_spec
    params = recipe.params()
    dev = resolve_device(device)
    out_dir = Path(out_dir)

    refs = ([recipe.base] if recipe.base else []) + [m.model for m in recipe.models]
    paths = {ref: resolve(ref) for ref in refs}
    for ref, path in paths.items():
        if out_dir.resolve() == path.resolve() or out_dir.resolve() in path.resolve().parents:
            raise MergeyardError(f"the output directory {out_dir} would overwrite the input {ref}; write the merge "
                                 "elsewhere")
    for ref, path in paths.items():
        if is_peft_adapter(path):
            raise CheckpointError(f"{ref}: a PEFT adapter directory; register it on its base first (`mergeyard ingest "
                                  f"{ref} --base BASE`), or name it in a recipe `mergeyard merge` runs")
    stored = {ref: Checkpoint(path) for ref, path in paths.items()}  # whole files: their digests
    refs = list(stored)
    label = {ref: (labels or {}).get(ref, ref) for ref in refs}
    checkpoints = with_adapters_applied(stored, recipe.base, label)  # what is merged
    reference_ref = recipe.base or recipe.models[recipe.slice_model(recipe.slices[0]) if recipe.slices else 0].model
    reference = checkpoints[reference_ref]
    stacked_config = None
    if recipe.slices:
        # one input: the model stacked from the slices' layer ranges (models of other layer counts may take part)
        sources = [(checkpoints[recipe.models[recipe.slice_model(s)].model], s.layer_range,
                    label[recipe.models[recipe.slice_model(s)].model]) for s in recipe.slices]
        reference = stack_layers(sources)
        views, base, models, wrapped_views = dict(checkpoints), None, [reference], {}
        config_file = paths[reference_ref] if paths[reference_ref].is_dir() else paths[reference_ref].parent
        if (config_file / "config.json").is_file():
            stacked_config = stacked_model_config(config_file / "config.json", layer_count(reference))
    else:
        # Each input seen under the reference's names: a task model's head is not merged, its encoder is.
        aligned = dict(zip(refs, align_all(reference, [checkpoints[r] for r in refs],
                                           [label[reference_ref], *(label[r] for r in refs)])))
        views = {ref: view for ref, (view, _) in aligned.items()}
        check_buffers_equal(reference, [v for v in views.values() if v is not reference],
                            {id(views[r]): label[r] for r in refs})
        base = views[recipe.base] if recipe.base else None
        models = [views[m.model] for m in recipe.models]
        wrapped_views = {i: aligned[m.model][1].as_dict() for i, m in enumerate(recipe.models)
                         if aligned[m.model][1].wraps}
    # config from the base, tokenizer from it or the recipe's tokenizer_source: found before any work is done
    companions = loadability_files(paths[reference_ref],
                                   resolve(recipe.tokenizer_source) if recipe.tokenizer_source else None)
    wrapped = wrapped_views

    # Digests the caller already knows (the registry does) are not recomputed.
    input_digests = dict(input_digests or {})
    missing = [ref for ref in stored if ref not in input_digests]
    t0 = time.perf_counter()
    for n, ref in enumerate(missing):
        input_digests[ref] = checkpoint_digest(stored[ref])
        if progress:
            progress("digest inputs", n + 1, len(missing))
    phases["digest_inputs"] = time.perf_counter() - t0

    names = reference.names
    float_names = [n for n in names if reference.entries[n].is_float]
    out_dtype = OUT_DTYPES.get(recipe.out_dtype) if recipe.out_dtype else None
    layout: Layout = [
        (n, (out_dtype or reference.entries[n].dtype) if reference.entries[n].is_float else reference.entries[n].dtype,
         reference.entries[n].shape)
        for n in names
    ]
    inputs = MergeInputs(
        base=base, models=models, weights=[1.0] if recipe.slices else [m.weight for m in recipe.models],
        names=float_names,
        device=dev, seed=recipe.seed, chunk_elems=chunk_elems, progress=progress,
        # a registry's inputs were checked finite when registered and are unchanged since (their files' size and
        # time, or their digest): checking every element again cost TIES ~7% of its time. The output is always checked.
        check_finite=not spec.propagates_non_finite and not validated_inputs, resolve=resolve,
    )

    solved, built, searched = None, None, {}
    if spec.data_informed:
        requests = spec.data(params) if spec.data is not None else None
        if requests is not None:  # None: the method has what it needs (registered statistics, learned coefficients)
            if data is None:
                raise MergeyardError(f"method {spec.name!r} learns from data: it needs an objective (or calibration "
                                     "inputs) built from its suite; run it with `mergeyard merge` or a pipeline, "
                                     "which build them")
            built = _build_each(requests, data)
    if recipe.auto_params:
        t0 = time.perf_counter()
        recipe, searched["search"] = choose_auto(recipe, inputs, reference, built, data, progress)
        params = recipe.params()
        phases["search"] = time.perf_counter() - t0
    if spec.data_informed:
        t0 = time.perf_counter()
        solved = spec.solve(inputs, params, built, progress)
        phases["solve"] = time.perf_counter() - t0

    writer = CheckpointWriter(out_dir, layout, max_shard_bytes, overwrite=overwrite,
                              metadata={"mergeyard.version": __version__, "mergeyard.method": spec.name})
    try:
        t0 = time.perf_counter()
        state = spec.prepare(inputs, params) if spec.prepare else None
        phases["prepare"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        total_bytes = sum(reference.entries[n].nbytes for n in names)
        done_bytes = 0
        out_dtypes = {name: DTYPES[dtype] for name, dtype, _ in layout}
        positions = layer_positions(names) if recipe.varying else {}
        for name in names:
            writer.begin_tensor(name)
            if reference.entries[name].is_float:
                chunks = [solved.state[name]] if solved is not None else _merge_tensor(spec, recipe, inputs, name,
                                                                                         params, state, positions)
                for merged in chunks:
                    out = merged.to(out_dtypes[name])
                    if not all_finite(out):
                        for ckpt in views.values():  # blame an input if one is at fault
                            check_input_finite(ckpt, name)
                        raise NonFiniteError(
                            f"the merge produced NaN or infinity in tensor {name!r} "
                            f"(as {DTYPE_NAMES[out_dtypes[name]]}); lower lambda/weights or use out_dtype: float32"
                        )
                    writer.write(name, out)
            else:
                writer.write(name, reference.read(name))  # integer buffers are copied, not merged
            done_bytes += reference.entries[name].nbytes
            if progress:
                progress("merge", done_bytes, total_bytes)
        for patch in spec.finalize(state) if spec.finalize else []:
            writer.patch(patch.name, patch.indices, patch.values)
        phases["merge"] = time.perf_counter() - t0

        records = ([InputRecord("base", recipe.base, input_digests[recipe.base])] if recipe.base else []) + [
            InputRecord("model", m.model, input_digests[m.model], m.weight) for m in recipe.models
        ]
        # The digest is known only once the shards are complete; the card is written after it.
        t0 = time.perf_counter()
        digest, files = writer.commit_with(
            lambda digest: {**_card_files(provenance(recipe, records, digest, environment(dev))),
                            **({"config.json": stacked_config} if stacked_config else {})},
            companions,
        )
        phases["commit"] = time.perf_counter() - t0
    except BaseException:
        writer.abort()
        raise
    resolved = recipe if recipe is not requested else None
    if solved is not None and solved.parameters:
        resolved = recipe.model_copy(update={"parameters": {**recipe.parameters, **solved.parameters}})
    return MergeResult(
        out_dir=out_dir, digest=digest, files=files, method=spec.name, recipe_hash=requested.recipe_hash,
        input_digests=dict(input_digests), num_params=sum(e.numel for e in reference.entries.values()),
        seconds=time.perf_counter() - started, phases=phases,
        details={**(solved.details if solved is not None else {}), **searched,
                 **({"wrapped_inputs": wrapped} if wrapped else {})},
        resolved=resolved, file_sha256=dict(writer.file_sha256),
    )


def _merge_tensor(spec, recipe: Recipe, inputs: MergeInputs, name: str, params, state, positions: dict[str, float]):
    """The merged chunks of one tensor, with the parameters and weights the recipe gives that tensor."""
    tensor = inputs.tensor(name)
    if name in positions:  # a varying recipe: gradients and filters evaluated for this tensor
        resolved, weights, overrides = recipe.for_tensor(name, positions[name])
        params = resolved
        if not recipe.slices:  # a stacked model is one input: the models' own values do not apply to it
            tensor.weights, tensor.overrides = weights, overrides
    return spec.merge(tensor, params, state)


def merge_in_memory(recipe: Recipe, inputs: MergeInputs, reference: Checkpoint, built: Any = None) -> dict:
    """The whole merged model as float32 tensors (and the reference's buffers), without writing it: what a search
    scores. The same per-tensor path as the writer's, patches applied."""
    spec, params = recipe.method_spec, recipe.params()
    if spec.data_informed:
        merged = dict(spec.solve(inputs, params, built, None).state)
    else:
        state = spec.prepare(inputs, params) if spec.prepare else None
        positions = layer_positions(inputs.names) if recipe.varying else {}
        merged = {name: torch.cat([c.reshape(-1) for c in _merge_tensor(spec, recipe, inputs, name, params, state,
                                                                        positions)])
                  .reshape(reference.entries[name].shape) for name in inputs.names}
        for patch in spec.finalize(state) if spec.finalize else []:
            merged[patch.name].view(-1)[patch.indices] = patch.values.to(torch.float32)
    for name in reference.names:
        if name not in merged:
            merged[name] = reference.read(name)
    return merged


def choose_auto(recipe: Recipe, inputs: MergeInputs, reference: Checkpoint, built: Any, data: Callable[[Any], Any] | None,
                progress: ProgressFn | None) -> tuple[Recipe, dict]:
    """The recipe with its `auto` scale chosen on the calibration split of its `search:` suite, and the record of
    the search (merging.search)."""
    spec = recipe.method_spec
    (key,) = recipe.auto_params  # only the method's scale may be auto (Recipe.check)
    if data is None:
        raise MergeyardError(f"method {spec.name!r}: {key}: auto is chosen on data: it needs its suite's calibration "
                             "split built; run it with `mergeyard merge` or a pipeline, which build it")
    search = recipe.search
    scorer = data(search.request())
    grid = tuple(search.grid or spec.scale_grid)
    chosen, tried = search_scale(grid, lambda v: merge_in_memory(recipe.with_chosen({key: v}), inputs, reference, built),
                                 scorer, spec.scale_affine, progress)
    record = {"parameter": key, "split": "calibration", "suite": search.suite, "data": scorer.digest,
              "tasks": list(search.tasks) if search.tasks else None, "budget": search.budget, "grid": list(grid),
              "tried": tried, "chosen": chosen}
    return recipe.with_chosen({key: chosen}), record


def _build_each(requests: Any, build: Callable[[Any], Any]) -> Any:
    """Each request of a method's (one, or a tuple of them) built into what it asked for, in the same shape."""
    return tuple(build(r) for r in requests) if isinstance(requests, tuple) else build(requests)


def loadability_files(reference: Path, tokenizer_source: Path | None = None) -> list[Path]:
    """What makes the output loadable by transformers: the reference's (the base's) config and generation config,
    and the tokenizer and preprocessor files of `tokenizer_source` (default: the reference). Only a checkpoint
    directory's files count: beside a loose .safetensors file may lie anything."""
    def folder(path: Path | None) -> Path | None:
        if path is None:
            return None
        path = Path(path)
        return path if path.is_dir() else path.parent if path.name == SINGLE_NAME else None

    config_dir, tokenizer_dir = folder(reference), folder(tokenizer_source) or folder(reference)
    if tokenizer_source is not None and tokenizer_dir is None:
        raise MergeyardError(f"tokenizer_source {tokenizer_source}: not a model directory holding a tokenizer")
    out = companion_files(config_dir, CONFIG_FILES) if config_dir else []
    return out + (companion_files(tokenizer_dir, TOKENIZER_FILES + PREPROCESSOR_FILES) if tokenizer_dir else [])


def _card_files(record: dict) -> dict[str, str]:
    return {"README.md": render_model_card(record), "mergeyard.json": provenance_json(record)}
