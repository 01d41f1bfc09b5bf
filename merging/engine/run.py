"""The streaming merge engine: a recipe in, a checkpoint directory out.

    open the inputs (merging.engine.opening) → settle what the recipe leaves open (the data a method learns
    from, `auto` coefficients) → plan (merging.engine.plan) → execute the plan (merging.engine.executor)

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

from merging.algorithms.search import search_scale
from merging.checkpoints.checkpoint import Checkpoint
from merging.checkpoints.digest import checkpoint_digest
from merging.checkpoints.inputs import DEFAULT_CHUNK_ELEMS, MergeInputs, ProgressFn
from merging.checkpoints.names import layer_positions
from merging.engine.executor import Executor, LocalExecutor
from merging.engine.model_card import InputRecord, provenance, provenance_json, render_model_card
from merging.engine.opening import (  # noqa: F401  (local_path, loadability_files, with_adapters_applied: public here)
    OpenedInputs, Resolver, loadability_files, local_path, open_inputs, with_adapters_applied,
)
from merging.engine.plan import OUT_DTYPES, MergePlan, layout_of, plan_merge  # noqa: F401  (OUT_DTYPES: public)
from merging.engine.writer import DEFAULT_MAX_SHARD_BYTES, CheckpointWriter
from merging.errors import DeviceError, MergeyardError
from merging.methods.registry import Solved
from merging.recipes.recipe import Recipe
from merging.version import __version__


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
    plan: MergePlan | None = None  # what was executed (recorded with the run)

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
    before_commit: Callable[[], None] | None = None,
    executor_factory: Callable[..., Executor] | None = None,
) -> MergeResult:
    """Merge as the recipe says and write the result to `out_dir`. All or nothing.

    A data-informed method (FW-Merging, MuDSC) asks for its data with requests (`merging.objective`); `data`
    builds each into an objective or calibration set (the caller knows the suites; `merging/` does not).
    `labels` names inputs in messages (a registry passes model names where the recipe holds digests).
    `validated_inputs`: the resolver hands out only checkpoints already checked finite (a registry's), so their
    elements are not checked again (a non-finite output still is, and then blames an input). `before_commit` runs
    once every tensor is written and before the output is renamed in (a registry's check that every input byte it
    read was the byte it stored): raising there leaves nothing behind. `executor_factory` builds the executor from
    (method, inputs, reference, progress): a `merging.engine.dask_executor.DaskExecutor` runs the units on a
    cluster; default: this process.
    """
    started, phases = time.perf_counter(), {}
    dev, out_dir, spec = resolve_device(device), Path(out_dir), recipe.method_spec
    opened = open_inputs(recipe, out_dir, resolve, labels)
    t0 = time.perf_counter()
    digests = _digests(opened, input_digests, progress)
    phases["digest_inputs"] = time.perf_counter() - t0
    inputs = MergeInputs(
        base=opened.base, models=opened.models, weights=opened.weights,
        names=[n for n in opened.reference.names if opened.reference.entries[n].is_float],
        device=dev, seed=recipe.seed, chunk_elems=chunk_elems, progress=progress,
        # a registry's inputs were checked finite when registered and are unchanged since (their files' size and
        # time, or their digest): checking every element again cost TIES ~7% of its time. The output is always checked.
        check_finite=not spec.propagates_non_finite and not validated_inputs, resolve=resolve,
    )
    settled, solved, details = _settle(recipe, inputs, opened.reference, data, progress, phases)
    if solved is not None and solved.parameters:  # what the method learned is part of what was merged
        settled = settled.with_parameters(solved.parameters)
    plan = plan_merge(settled, opened, digests, max_shard_bytes)
    writer = CheckpointWriter(out_dir, layout_of(opened.reference, settled.out_dtype), max_shard_bytes,
                              overwrite=overwrite, metadata={"mergeyard.version": __version__,
                                                             "mergeyard.method": spec.name})
    executor = (executor_factory or LocalExecutor)(spec, inputs, opened.reference, progress)
    executed = executor.run(plan, writer, solved, _card(settled, opened, digests, dev), opened.companions,
                            before_commit)
    return MergeResult(
        out_dir=out_dir, digest=executed.digest, files=executed.files, method=spec.name,
        recipe_hash=recipe.recipe_hash, input_digests=digests,
        num_params=sum(e.numel for e in opened.reference.entries.values()),
        seconds=time.perf_counter() - started, phases={**phases, **executed.phases},
        details={**details, **({"wrapped_inputs": opened.wrapped} if opened.wrapped else {}), **executed.details},
        resolved=settled if settled is not recipe else None, file_sha256=executed.file_sha256, plan=plan)


def _digests(opened: OpenedInputs, known: dict[str, str] | None, progress: ProgressFn | None) -> dict[str, str]:
    """Every input's digest; those the caller already knows (the registry does) are not recomputed."""
    digests = dict(known or {})
    missing = [ref for ref in opened.refs if ref not in digests]
    for n, ref in enumerate(missing):
        digests[ref] = checkpoint_digest(opened.stored[ref])
        if progress:
            progress("digest inputs", n + 1, len(missing))
    return {ref: digests[ref] for ref in opened.refs}


def _settle(recipe: Recipe, inputs: MergeInputs, reference: Checkpoint, data: Callable[[Any], Any] | None,
            progress: ProgressFn | None, phases: dict) -> tuple[Recipe, Solved | None, dict]:
    """What the recipe leaves to data, settled: the data a method learns from built, `auto` chosen (a new recipe),
    a data-informed method's solve. Returns the settled recipe, the solve and what was decided."""
    spec, built, details = recipe.method_spec, None, {}
    requests = spec.data(recipe.params()) if spec.data_informed and spec.data is not None else None
    if requests is not None:  # None: the method has what it needs (registered statistics, learned coefficients)
        if data is None:
            raise MergeyardError(f"method {spec.name!r} learns from data: it needs an objective (or calibration "
                                 "inputs) built from its suite; run it with `mergeyard merge` or a pipeline, "
                                 "which build them")
        built = _build_each(requests, data)
    if recipe.auto_params:
        t0 = time.perf_counter()
        recipe, details["search"] = choose_auto(recipe, inputs, reference, built, data, progress)
        phases["search"] = time.perf_counter() - t0
    if not spec.data_informed:
        return recipe, None, details
    t0 = time.perf_counter()
    solved = spec.solve(inputs, recipe.params(), built, progress)
    phases["solve"] = time.perf_counter() - t0
    return recipe, solved, {**solved.details, **details}


def _card(recipe: Recipe, opened: OpenedInputs, digests: dict[str, str], dev: torch.device):
    """The files written beside the shards once the digest is known: the model card, mergeyard.json, and a stacked
    model's config."""
    records = ([InputRecord("base", recipe.base, digests[recipe.base])] if recipe.base else []) + [
        InputRecord("model", m.model, digests[m.model], m.weight) for m in recipe.models]

    def files(digest: str) -> dict[str, str]:
        record = provenance(recipe, records, digest, environment(dev))
        return {"README.md": render_model_card(record), "mergeyard.json": provenance_json(record),
                **({"config.json": opened.stacked_config} if opened.stacked_config else {})}

    return files


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
    the search (merging.algorithms.search)."""
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




