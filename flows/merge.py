"""A merge that is recorded: inputs registered, the recipe pinned to digests, the output registered with lineage.

The recipe stored for a run names its inputs by content digest, not by path,
so `reproduce` can rebuild it from the store wherever the original files went.
A run row says `running` while the merge works and `succeeded` only in the
transaction that registers the output (and, in a pipeline, its evaluations:
`stage_merge` → evaluate the staged files → `commit_merge`). A failure at any
step marks it `failed`, leaves no model row and removes the output directory
this merge created.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from merging.checkpoints.alignment import Alignment
from merging.runtime.crashpoints import crashpoint
from merging.methods import get_method
from merging.methods.hooks import MethodLineage
from merging.engine import MergeResult, environment, resolve_device, run_merge
from merging.checkpoints.inputs import ProgressFn
from merging.recipes.recipe import Recipe
from merging.version import __version__
from flows.provenance import code_revision
from flows.resolve import VerifiedInputs, check_adapter_bases, local_source, resolve_input
from registry.names import check_name
from registry.registry import ModelInfo, Parent, Registry, SuiteEvaluation
from registry.serving import ServedHead


@dataclass
class RecordedMerge:
    model: ModelInfo
    result: MergeResult
    run_id: int
    out_dir: Path | None


@dataclass
class StagedMerge:
    """A merge written to scratch and recorded as a `running` run, not yet a registered model."""

    run_id: int
    path: Path
    result: MergeResult
    recipe: Recipe  # pinned: inputs named by digest
    base: ModelInfo | None
    models: list[ModelInfo]

    def lineage(self) -> MethodLineage:
        """What the method's decisions add to lineage (its own hook; none for a streaming merge)."""
        hook = get_method(self.recipe.method).lineage
        return hook(self.result.details) if hook is not None and self.result.details else MethodLineage()

    def parents(self) -> list[Parent]:
        lineage, wrapped = self.lineage(), self.wrapped()
        return ([Parent(self.base, "base")] if self.base else []) + [
            Parent(m, "candidate", weight=entry.weight,
                   details={"position": i, **lineage.candidate_details.get(i, {}),
                            **({"wrapper": wrapped[i].prefix} if i in wrapped else {})})
            for i, (m, entry) in enumerate(zip(self.models, self.recipe.models))
        ] + [Parent(self.models[e.position], e.role, weight=e.weight, step=e.step, details=e.details)
             for e in lineage.edges]

    def wrapped(self) -> dict[int, Alignment]:
        """Candidates that are task models around the base: their encoder was merged, their head was not."""
        return {int(i): Alignment(a["prefix"], tuple(a["head"]))
                for i, a in self.result.details.get("wrapped_inputs", {}).items()}

    def run_details(self) -> dict | None:
        """What the method decided, for the run's record (less what its lineage edges carry already)."""
        carried = set(self.lineage().carried)
        details = {k: v for k, v in self.result.details.items() if k not in carried}
        return details or None


def data_builder(device: str, registry: Registry | None = None, base: ModelInfo | None = None):
    """What the engine calls to build each data request of a data-informed method: its suite reads the base's
    config and tokenizer where the suite names no model."""
    def build(request):
        from flows.objectives import build_request
        from flows.suites import model_directories

        model_dirs = model_directories(registry, base) if registry is not None else None
        return build_request(request, device, model_dirs, registry)

    return build


def prefetch_scans(registry: Registry, refs: list[str], workers: int = 2) -> None:
    """Validate and hash the recipe's local checkpoints two at a time before they are ingested one by one: sha256
    runs on one core per file, and the digest cache hands each ingest its result. An unchanged, already cached file
    costs a stat. What fails here is left for the ingest itself to report, in the recipe's order."""
    from concurrent.futures import ThreadPoolExecutor

    from merging.checkpoints.checkpoint import Checkpoint
    from merging.checkpoints.lora import is_peft_adapter

    paths = [path for path in map(local_source, dict.fromkeys(refs))
             if path is not None and path.exists() and not is_peft_adapter(path)]
    if len(paths) < 2:
        return

    def scan(path: Path) -> None:
        try:
            registry.scan(Checkpoint(path))
        except Exception:  # reported by the ingest that follows
            pass

    with ThreadPoolExecutor(workers, thread_name_prefix="mergeyard-prefetch") as pool:
        list(pool.map(scan, paths))


@contextmanager
def executor_for(dask: str | None):
    """`run_merge`'s executor factory: None (this process) without `dask`, else the Dask executor on that scheduler
    ('local': a LocalCluster started for this merge and stopped after it)."""
    if dask is None:
        yield None
        return
    from merging.engine.dask_executor import on_dask

    with on_dask(dask) as factory:
        yield factory


def pin_inputs(recipe: Recipe, registry: Registry,
               by_reference: bool = False) -> tuple[Recipe, ModelInfo | None, list[ModelInfo]]:
    """Resolve (ingesting where needed; `by_reference`: local paths recorded where they are) every input and name
    it by digest."""
    prefetch_scans(registry, ([recipe.base] if recipe.base else []) + [m.model for m in recipe.models])
    base = resolve_input(registry, recipe.base, by_reference) if recipe.base else None
    models = [resolve_input(registry, m.model, by_reference, base) for m in recipe.models]
    check_adapter_bases(base, models)
    tokenizer = resolve_input(registry, recipe.tokenizer_source) if recipe.tokenizer_source else None
    named = {}  # the method's parameters that name registered artifacts, pinned to their digests
    params = recipe.params().model_dump(by_alias=True, mode="json")
    for key in get_method(recipe.method).model_params:
        if params.get(key):
            named[key] = [resolve_input(registry, ref).digest for ref in params[key]]
    pinned = recipe.pinned(base.digest if base else None, [m.digest for m in models],
                           tokenizer.digest if tokenizer is not None else None, named)
    return pinned, base, models


def stage_merge(recipe: Recipe, registry: Registry, *, out: Path | None = None, device: str = "cpu",
                max_shard_bytes: int = 5_000_000_000, overwrite: bool = False,
                progress: ProgressFn | None = None, by_reference: bool = False,
                dask: str | None = None) -> StagedMerge:
    """Run the merge into `out` (default: scratch) under a `running` run row; a failure marks the run failed.
    `dask`: the plan's units run on the Dask scheduler at this address ('local': a LocalCluster started here)."""
    if out is not None:
        registry.refuse_managed(out)
    pinned, base, models = pin_inputs(recipe, registry, by_reference)
    params = {"method": pinned.method, "seed": str(pinned.seed), "recipe_hash": pinned.recipe_hash,
              "out_dtype": str(pinned.out_dtype),  # parameters as the recipe holds them (`auto` too), in JSON
              **{f"param.{k}": v if isinstance(v, str) else json.dumps(v)
                 for k, v in pinned.canonical()["parameters"].items()}}
    run_id = registry.begin_merge_run(
        method=pinned.method, recipe_json=pinned.canonical_json(), recipe_hash=pinned.recipe_hash, seed=pinned.seed,
        mergeyard_version=__version__, environment=environment(resolve_device(device)), code_revision=code_revision(),
        params=params,
    )
    target = out if out is not None else registry.config.scratch / f"merge-run-{run_id}"
    try:
        with registry.tracked_output(out), VerifiedInputs(registry) as verified, \
                executor_for(dask) as executor:  # every byte read is the byte stored
            result = run_merge(pinned, target, device=device, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                               progress=progress, resolve=verified, validated_inputs=True, executor_factory=executor,
                               data=data_builder(device, registry, base), before_commit=verified.check,
                               input_digests={m.digest: m.digest for m in ([base] if base else []) + models},
                               labels={m.digest: f"{m.name} ({m.digest[:19]})" for m in ([base] if base else []) + models})
    except BaseException as exc:
        registry.fail_merge_run(run_id, f"{type(exc).__name__}: {exc}")
        raise
    # a method that settled parameters (learned coefficients) is recorded with them: `reproduce` rebuilds from them
    return StagedMerge(run_id, target, result, result.resolved or pinned, base, models)


def commit_merge(registry: Registry, staged: StagedMerge, name: str, *, evaluations: list[SuiteEvaluation] = (),
                 keep_output: bool = False, details: dict | None = None) -> ModelInfo:
    """Register the staged output with its lineage and evaluations, and mark the run succeeded, atomically.
    `details` joins what the method decided in the run's record (e.g. the MAP front a point came from).
    Each task model among the candidates has its head registered first: the merged encoder serves their tasks.
    A method that needs a base declares it for candidates registered without one (task vectors are taken from it)."""
    crashpoint("merge.staged")  # the output complete in scratch, the run still `running`
    try:
        if staged.base is not None and get_method(staged.recipe.method).requires_base:
            for m in staged.models:
                registry.declare_base(m, staged.base)
        heads = [ServedHead(staged.models[i].name, Path(registry.register_head(staged.models[i], alignment).store_path),
                            alignment.prefix.rstrip("."))
                 for i, alignment in staged.wrapped().items()]
        model = registry.complete_merge_run(staged.run_id, staged.path, staged.result.digest, name, staged.parents(),
                                            staged.result.seconds, evaluations=evaluations,
                                            details={**(staged.run_details() or {}), **(details or {})} or None,
                                            heads=heads, recipe_json=staged.recipe.canonical_json(),
                                            move=not keep_output, written_sha256=staged.result.file_sha256,
                                            plan=_plan_record(staged.result))
    except BaseException as exc:
        abort_merge(registry, staged, exc)
        raise
    if not keep_output:
        shutil.rmtree(staged.path, ignore_errors=True)  # the store holds the registered copy
    return model


def _plan_record(result: MergeResult) -> tuple[str, str] | None:
    return (result.plan.digest, result.plan.to_json()) if result.plan is not None else None


def abort_merge(registry: Registry, staged: StagedMerge, error: BaseException) -> None:
    """The run failed after its output was written: mark it failed and remove what it wrote."""
    registry.fail_merge_run(staged.run_id, f"{type(error).__name__}: {error}")
    shutil.rmtree(staged.path, ignore_errors=True)


def merge_and_record(recipe: Recipe, registry: Registry, *, out: Path | None = None, name: str | None = None,
                     device: str = "cpu", max_shard_bytes: int = 5_000_000_000, overwrite: bool = False,
                     progress: ProgressFn | None = None, details: dict | None = None,
                     by_reference: bool = False, dask: str | None = None) -> RecordedMerge:
    if name is not None:
        check_name(name)  # before any input is ingested or any tensor merged
    staged = stage_merge(recipe, registry, out=out, device=device, max_shard_bytes=max_shard_bytes,
                         overwrite=overwrite, progress=progress, by_reference=by_reference, dask=dask)
    model = commit_merge(registry, staged, name or f"merged-{staged.recipe.method}", keep_output=out is not None,
                         details=details)
    return RecordedMerge(model, staged.result, staged.run_id, out)
