"""The MAP sweep as a Prefect flow: samples as mapped tasks (on Dask with `--dask`), then fit, search, store.

    ingest base + candidates → [sample task × design points] → surrogates + NSGA-III → front row
    → plot (PNG) + front JSON → an MLflow run and a Prefect artifact

The bayesian and nested variants call the sample task again round by round
(level by level); every round is one mapped batch. Samples are cached in the
lineage database, not by Prefect: a re-run, a larger design or another variant
reuses whatever it shares.
"""

# No `from __future__ import annotations`: Prefect validates flow parameters from the real types.

import base64
import json
from pathlib import Path
from typing import Literal

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from evaluation.suite import CLASSIFICATION_METRICS
from merging.algorithms.map import MapParams
from merging.errors import MergeyardError
from flows.pipeline import IO_RETRIES, ingest_task, pinned_settings, registry_for, suite_of
from flows.settings import Settings


class MapConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    suite: str
    base: str
    candidates: list[str] = Field(min_length=2)
    tasks: list[str] | None = None
    variant: Literal["plain", "bayesian", "nested"] = "plain"
    params: MapParams = Field(default_factory=MapParams)
    preference: dict[str, float] | None = None  # nested: how inner nodes choose their point


@task(name="map-sample", task_run_name="sample {coefficients}", cache_policy=NO_CACHE, **IO_RETRIES)
def sample_task(env: Settings, base: str, candidates: list[str], coefficients: list[float], suite: str,
                tasks: list[str] | None) -> dict:
    from flows.map_steps import evaluate_sample

    metrics, reused = evaluate_sample(registry_for(env), suite_of(env, suite, tasks), base, candidates, coefficients,
                                      env.device)
    return {"metrics": metrics, "reused": reused}


def refuse_unscorable(suite):
    """The suite, if every task is scored by accuracy: MAP's surrogates model accuracy in [0, 1], so a perplexity
    task has no front to chart (one line, before any sample is merged)."""
    unscorable = [n for n, t in suite.tasks.items() if t.metric not in CLASSIFICATION_METRICS]
    if unscorable:
        raise MergeyardError(f"MAP charts accuracy fronts; task {unscorable[0]!r} of suite {suite.name!r} is scored by "
                             f"{suite.tasks[unscorable[0]].metric}; give --tasks with classification tasks only")
    return suite


@flow(name="mergeyard-map", log_prints=True)
def map_flow(config: MapConfig, env: Settings | None = None) -> dict:
    from merging.algorithms.map import run_bayesian, run_map, run_nested

    from flows.map_steps import store_front

    env = env or pinned_settings()
    suite = refuse_unscorable(suite_of(env, config.suite, config.tasks))
    tasks = list(suite.tasks)
    base = ingest_task(env, config.base)
    candidates = ingest_task.map(unmapped(env), config.candidates, base=unmapped(base)).result()
    if len(set(candidates)) != len(candidates):
        raise ValueError("two candidates have the same bytes: MAP needs distinct task vectors")
    counts = {"evaluated": 0, "reused": 0}

    def evaluate(coefficient_vectors: list[list[float]]) -> list[dict[str, float]]:
        futures = sample_task.map(unmapped(env), base, unmapped(candidates), coefficient_vectors, config.suite,
                                  unmapped(config.tasks))
        results = futures.result()
        for r in results:
            counts["reused" if r["reused"] else "evaluated"] += 1
        return [r["metrics"]["accuracy"] for r in results]

    n = len(candidates)
    if config.variant == "bayesian":
        run = run_bayesian(evaluate, n, tasks, config.params)
    elif config.variant == "nested":
        run = run_nested(evaluate, n, tasks, config.params, owners=_owners(config, tasks, n),
                         preference=config.preference)
    else:
        run = run_map(evaluate, n, tasks, config.params)
    registry = registry_for(env)
    record = store_front(registry, run, suite=suite, base=base, candidates=candidates, variant=config.variant,
                         settings=config.params.model_dump(), suite_ref=config.suite)
    report = {"front": record.id, "suite": suite.name, "suite_digest": suite.digest, "tasks": tasks,
              "variant": config.variant, "candidates": candidates, "base": base,
              "real_evaluations": len(run.samples), "newly_evaluated": counts["evaluated"],
              "reused_samples": counts["reused"], "surrogates": record.surrogates, "points": record.points}
    report["files"] = publish(env, record, run.metrics)
    print(f"MAP front {record.id}: {len(record.points)} points from {len(run.samples)} real evaluations "
          f"({counts['reused']} reused from the sample cache)")
    return report


def _owners(config: MapConfig, tasks: list[str], n: int) -> list[list[str]] | None:
    """Nested: candidate i serves task i when there is one candidate per task; otherwise every node serves all."""
    return [[t] for t in tasks] if n == len(tasks) else None


def publish(env: Settings, record, samples: list[dict[str, float]], picked: list[dict] = ()) -> dict:
    """The front as JSON and a PNG of 2-task panels, logged to MLflow and (inside a flow) as a Prefect artifact."""
    from flows.map_plot import plot_front
    from registry import map_records

    out = Path(env.home) / "map"
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"front-{record.id}.json"
    tmp = json_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record.as_dict(), indent=2))
    tmp.replace(json_path)
    png = plot_front(out / f"front-{record.id}.png", record.tasks, samples, record.points, picked,
                     title=f"MAP front {record.id} on {record.suite_name} ({record.variant}, "
                           f"{record.real_evaluations} evaluations)")
    registry = registry_for(env)
    run_id = None
    if registry.mirror is not None:
        metrics = {f"surrogate/{t}/{k}": v for t, s in record.surrogates.items() for k, v in
                   (("r2", s.get("r2")), ("mae", s.get("mae"))) if v is not None}
        metrics["front/points"] = len(record.points)
        metrics["real_evaluations"] = record.real_evaluations
        run_id = registry.mirror.log_run(
            f"map-front-{record.id}", {"mergeyard.kind": "map-front", "mergeyard.suite": record.suite_name,
                                       "mergeyard.suite_digest": record.suite_digest},
            {"variant": record.variant, "candidates": ",".join(record.candidates), "base": record.base_digest,
             **{f"param.{k}": v for k, v in record.settings.items() if k not in ("rounds", "tree")}},
            metrics, [json_path, png])
        map_records.set_front_mlflow_run(registry, record.id, run_id)
    _prefect_artifact(record, png)
    return {"json": str(json_path), "plot": str(png), "mlflow_run": run_id}


def _prefect_artifact(record, png: Path) -> None:
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return  # outside a flow run (`map pick` re-plots): nothing to attach it to
    from prefect.artifacts import create_image_artifact, create_markdown_artifact

    header = "| # | " + " | ".join(record.tasks) + " | coefficients |\n|" + "---|" * (len(record.tasks) + 2)
    rows = [f"| {i} | " + " | ".join(f"{100 * p['predicted'][t]:.1f}" for t in record.tasks) + " | "
            + ", ".join(f"{c:.2f}" for c in p["coefficients"]) + " |" for i, p in enumerate(record.points[:40])]
    errors = "\n".join(f"- {t}: held-out R² {s['r2']:.3f}, MAE {100 * s['mae']:.2f} points"
                       if s.get("r2") is not None else f"- {t}: MAE {100 * s['mae']:.2f} points"
                       for t, s in record.surrogates.items())
    # the picture itself, self-contained (a data URI), so the Prefect UI shows it without reaching MLflow
    create_image_artifact(image_url="data:image/png;base64," + base64.b64encode(png.read_bytes()).decode(),
                          key=f"map-front-{record.id}-plot", description=f"Pareto front {record.id}: 2-task panels")
    create_markdown_artifact(
        key=f"map-front-{record.id}",
        markdown=f"# MAP front {record.id} on {record.suite_name}\n\n{record.variant}, "
                 f"{record.real_evaluations} real evaluations, {len(record.points)} points (predicted accuracy %)."
                 f"\n\nSurrogates:\n{errors}\n\n{header}\n" + "\n".join(rows) + f"\n\nPlot: `{png}`",
        description=f"Pareto front {record.id} ({record.suite_name})")
