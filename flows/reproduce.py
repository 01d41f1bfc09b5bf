"""`mergeyard reproduce`: rebuild a model from its lineage record and compare digests.

A merged model is rebuilt from the run's recipe, whose inputs are digests
resolved from the store. An ingested model has no recipe: its stored bytes are
re-hashed against the recorded digest. The outcome is recorded either way, so
a promotion gate can require a verified rebuild.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from merging.checkpoints.checkpoint import Checkpoint
from merging.checkpoints.digest import checkpoint_digest
from merging.engine import run_merge
from merging.engine.plan import MergePlan
from merging.engine.writer import DEFAULT_MAX_SHARD_BYTES
from merging.methods import get_method
from merging.checkpoints.inputs import ProgressFn
from merging.recipes.recipe import parse_recipe
from merging.version import __version__
from flows.merge import data_builder, executor_for
from flows.resolve import VerifiedInputs
from registry.errors import StoreDamagedError
from registry.registry import ModelInfo, Registry
from merging.runtime.processes import owner_token


@dataclass
class Reproduction:
    model: ModelInfo
    ok: bool
    rebuilt_digest: str
    differing: list[str] = field(default_factory=list)
    run_id: int | None = None
    data: dict | None = None  # a data-informed method's data digests, recorded vs rebuilt, when they differ
    restored: bool = False  # the stored copy was damaged and was put back from the verified rebuild
    plan: dict | None = None  # the merge plan recorded with the run, and the rebuild's: {recorded, rebuilt, same}

    def as_dict(self) -> dict:
        return {"model": self.model.digest, "name": self.model.name, "ok": self.ok, "rebuilt_digest": self.rebuilt_digest,
                "differing_tensors": self.differing, "merge_run": self.run_id, "store_restored": self.restored,
                **({"data_digests": self.data} if self.data else {}), **({"plan": self.plan} if self.plan else {})}


def _tensor_sha256(ckpt: Checkpoint, name: str) -> str:
    # iter_raw reuses one buffer per block: hash each block as it comes, never keep the views
    h = hashlib.sha256()
    for block in ckpt.iter_raw(name):
        h.update(block)
    return h.hexdigest()


def differing_tensors(a: Path, b: Path) -> list[str]:
    """Names whose bytes, dtype or shape differ, or that only one side has."""
    ca, cb = Checkpoint(a), Checkpoint(b)
    names = sorted(set(ca.entries) | set(cb.entries))
    out = []
    for name in names:
        if name not in ca.entries or name not in cb.entries:
            out.append(name)
            continue
        ea, eb = ca.entries[name], cb.entries[name]
        if ea.dtype != eb.dtype or ea.shape != eb.shape or _tensor_sha256(ca, name) != _tensor_sha256(cb, name):
            out.append(name)
    return out


def reproduce(registry: Registry, ref: str, *, device: str = "cpu", progress: ProgressFn | None = None,
              dask: str | None = None) -> Reproduction:
    model = registry.resolve(ref)
    run = registry.producing_run(model)
    if run is None:  # ingested: verify the stored bytes still are what was recorded
        outcome = _verify_stored(registry, model)
    else:
        recipe = parse_recipe(json.loads(run.recipe_json))
        registry.config.scratch.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"reproduce-{owner_token()}-", dir=registry.config.scratch))
        try:
            base = registry.find_digest(recipe.base) if recipe.base else None
            recorded_plan = MergePlan.from_json(run.plan_json) if run.plan_json else None
            shard_bytes = recorded_plan.max_shard_bytes if recorded_plan else DEFAULT_MAX_SHARD_BYTES
            # a rotten input is named, never blamed on the merge; `dask`: rebuilt on a cluster, compared the same
            with VerifiedInputs(registry) as verified, executor_for(dask) as executor:
                result = run_merge(recipe, work / "rebuilt", device=device, resolve=verified, executor_factory=executor,
                                   max_shard_bytes=shard_bytes, before_commit=verified.check, validated_inputs=True,
                                   data=data_builder(device, registry, base), progress=progress,
                                   input_digests={d: d for d in [recipe.base, *(m.model for m in recipe.models)] if d})
            ok = result.digest == model.digest
            differing = [] if ok else differing_tensors(work / "rebuilt", Path(model.store_path))
            outcome = Reproduction(model, ok, result.digest, differing, run.id)
            if ok:  # the rebuild is the recorded model: a stored copy that is not gets put back from it
                outcome.restored = registry.restore_if_damaged(model, Checkpoint(work / "rebuilt"))
            outcome.data = _data_change(recipe.method, run.details, result.details)
            if run.plan_digest:  # what was planned then, and now: the same plan unless the engine's planning changed
                outcome.plan = {"recorded": run.plan_digest, "rebuilt": result.plan.digest,
                                "same": run.plan_digest == result.plan.digest}
        finally:
            shutil.rmtree(work, ignore_errors=True)
    registry.record_reproduction(model, outcome.ok, outcome.rebuilt_digest, {
        "merge_run": outcome.run_id, "differing_tensors": outcome.differing[:100], "mergeyard_version": __version__,
        "recorded_mergeyard_version": run.mergeyard_version if run else None,
        **({"data_digests": outcome.data} if outcome.data else {}),
    })
    return outcome


def recorded_plan(registry: Registry, ref: str) -> MergePlan | None:
    """The merge plan the run that made `ref` executed (None for an ingested model, or a run recorded before plans)."""
    run = registry.producing_run(registry.resolve(ref))
    return MergePlan.from_json(run.plan_json) if run is not None and run.plan_json else None


def _verify_stored(registry: Registry, model: ModelInfo) -> Reproduction:
    """An ingested model's stored copy against its record; where it differs, the tensors that do (by the
    checksums recorded at ingest)."""
    if not registry.store.has(model.digest):
        raise StoreDamagedError(f"the stored copy of {model.name} ({model.digest[:19]}) is missing; ingest the "
                                "original again to restore it (`mergeyard doctor` lists every such model)")
    checksums: dict[str, str] = {}
    rebuilt = checkpoint_digest(model.store_path, checksums)
    ok = rebuilt == model.digest
    differing = []
    if not ok:
        recorded = registry.recorded_checksums(model) or {}
        differing = sorted(n for n in set(recorded) | set(checksums) if recorded.get(n) != checksums.get(n))
    return Reproduction(model, ok, rebuilt, differing)


def _data_change(method: str, recorded: dict | None, rebuilt: dict) -> dict | None:
    """The data a data-informed method read (its own `data_digests` hook), where the rebuild read other bytes."""
    hook = get_method(method).data_digests
    if hook is None or not rebuilt:
        return None
    before, after = (hook(recorded) if recorded else {}), hook(rebuilt)
    return {"recorded": before, "rebuilt": after} if before != after else None
