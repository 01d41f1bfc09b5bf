"""MAP's steps as plain functions: one evaluated sample, a stored front, a picked point merged for real.

A sample is a streamed task-arithmetic merge (θ_base + Σ c_i τ_i, the engine's
`task_arithmetic` with the coefficients as model weights) written to scratch,
scored on the suite and deleted; only its metrics stay, in the sample cache.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.evaluator import evaluate_checkpoint
from evaluation.suite import Suite
from merging.engine import run_merge
from merging.algorithms.map import Front, MapRun, pick
from merging.recipes.recipe import parse_recipe
from flows.merge import merge_and_record
from flows.resolve import store_resolver
from flows.suites import bound_to
from registry import map_records
from registry.errors import RegistryError
from registry.map_records import FrontRecord
from registry.registry import Registry
from merging.runtime.processes import owner_token


def ta_recipe(base: str, candidates: list[str], coefficients: list[float]):
    return parse_recipe({"method": "task_arithmetic", "base": base, "parameters": {"lambda": 1.0},
                         "models": [{"model": c, "weight": float(w)} for c, w in zip(candidates, coefficients)]})


def evaluate_sample(registry: Registry, suite: Suite, base: str, candidates: list[str], coefficients: list[float],
                    device: str = "cpu") -> tuple[dict, bool]:
    """({"accuracy": {task: v}, "loss": {task: v}}, reused) for θ_base + Σ c_i τ_i on the suite, cached by key."""
    key = map_records.sample_key(base, candidates, coefficients, suite.digest)
    cached = map_records.cached_sample(registry, key)
    if cached is not None:
        return cached, True
    started = time.perf_counter()
    registry.config.scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"map-sample-{owner_token()}-", dir=registry.config.scratch))
    try:
        run_merge(ta_recipe(base, candidates, coefficients), work / "merged", device=device,
                  resolve=store_resolver(registry), input_digests={d: d for d in [base, *candidates]})
        result = evaluate_checkpoint(work / "merged", bound_to(suite, registry, registry.find_digest(base)),
                                     device=device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    metrics = {"accuracy": {t.task: t.accuracy for t in result.tasks}, "loss": {t.task: t.loss for t in result.tasks}}
    map_records.record_sample(registry, key, base, candidates, coefficients, suite.name, suite.digest, metrics,
                              time.perf_counter() - started)
    return metrics, False


def store_front(registry: Registry, run: MapRun, *, suite: Suite, base: str, candidates: list[str], variant: str,
                settings: dict, suite_ref: str | None = None) -> FrontRecord:
    """`suite_ref` is how the sweep named the suite (a name, or a suite file's path): `map pick` opens it again."""
    return map_records.record_front(
        registry, suite_name=suite.name, suite_digest=suite.digest, base_digest=base, candidates=list(candidates),
        tasks=list(run.front.tasks), variant=variant,
        settings={**settings, "rounds": run.rounds, "tree": run.tree, "suite": suite_ref or suite.name},
        surrogates={t: _plain(s.as_dict()) for t, s in run.surrogates.items()}, points=run.front.points(),
        real_evaluations=len(run.samples))


def _plain(d: dict) -> dict:
    """numpy scalars → JSON numbers (NaN, where R² is undefined, → None)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.floating, float)):
            v = float(v)
            out[k] = None if v != v else v
        else:
            out[k] = v
    return out


def front_of(record: FrontRecord) -> Front:
    coefficients = np.array([p["coefficients"] for p in record.points])
    predicted = np.array([[p["predicted"][t] for t in record.tasks] for p in record.points])
    return Front(coefficients, predicted, list(record.tasks))


@dataclass
class Picked:
    front: FrontRecord
    point: int
    coefficients: list[float]
    predicted: dict[str, float]
    measured: dict[str, float]
    model: object  # ModelInfo
    run_id: int


def pick_and_merge(registry: Registry, record: FrontRecord, preference: dict[str, float], suite: Suite, *,
                   name: str | None = None, device: str = "cpu", progress=None) -> Picked:
    """The preferred front point merged for real (registered with lineage, the front and preference in its run
    record), evaluated on the suite, with the surrogates' prediction beside the measurement."""
    from flows.steps import evaluate_or_reuse

    if suite.digest != record.suite_digest:
        raise RegistryError(
            f"front {record.id} was fitted on suite digest {record.suite_digest[:19]}, the suite is now "
            f"{suite.digest[:19]}: run `mergeyard map` again")
    front = front_of(record)
    index = pick(front, preference)
    coefficients = [float(c) for c in front.coefficients[index]]
    predicted = {t: float(v) for t, v in zip(front.tasks, front.predicted[index])}
    details = {"map": {"front": record.id, "point": index, "preference": preference, "predicted": predicted,
                       "variant": record.variant}}
    recorded = merge_and_record(ta_recipe(record.base_digest, record.candidates, coefficients), registry,
                                name=name or f"map-front-{record.id}", device=device, progress=progress,
                                details=details)
    scores = evaluate_or_reuse(registry, recorded.model, suite, device)
    return Picked(record, index, coefficients, predicted, {t: scores.accuracy[t] for t in front.tasks},
                  recorded.model, recorded.run_id)
