"""Prefect flows: ingest → score → merge → evaluate → promote, and `pipeline`, which runs them all.

Flows only wire tasks; each task calls one plain function of `flows.steps`
(or the registry). Tasks pass URIs and digests, never tensors, plus the
pinned `Settings` a task needs to open the same registry in any process (a Dask
worker included).

Cache keys are content digests + recipe hash + suite digest + mergeyard
version + the registry's database, so a re-run whose inputs did not change
is `Cached` in Prefect and does no merge and no evaluation. The registry is
still the source of truth: with Prefect's cache cleared, the steps find the
recorded merge or evaluation and reuse it.
"""

# No `from __future__ import annotations`: Prefect validates flow parameters from the real types,
# and a served deployment must resolve them (PipelineConfig, Settings) when it loads this file.

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from merging.recipes.recipe import canonical_hash, parse_recipe
from merging.version import __version__
from flows.config import MergeSpec, PipelineConfig
from registry.promotion import Gate
from flows.settings import Settings, get_settings

def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the network, a server or the database hiccupped. Not: a user error, a missing file."""
    from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

    from merging.errors import MergeyardError

    if isinstance(exc, MergeyardError):
        return False
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, OSError, OperationalError, DisconnectionError, InterfaceError)):
        return True
    try:
        import httpx

        return isinstance(exc, httpx.TransportError)
    except ImportError:  # pragma: no cover
        return False


def _retry_if_transient(task, task_run, state) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


# Transient failures of the hub, the MLflow server or the database get retried; user errors do not.
IO_RETRIES = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_if_transient)


def pinned_settings() -> Settings:
    """The process's settings as tasks receive them (see `Settings.pinned`)."""
    return get_settings().pinned()


@lru_cache(maxsize=4)
def _registry(env_json: str):
    from flows.registry_access import open_registry

    registry = open_registry(Settings.model_validate_json(env_json))
    if registry.mirror is not None:
        registry.mirror.client  # noqa: B018  (create the MLflow client once, before tasks share it across threads)
    return registry


def registry_for(env: Settings):
    return _registry(env.model_dump_json())


@lru_cache(maxsize=8)
def _named_suite(name: str, tasks: tuple[str, ...] | None, manifest: str):
    from flows.suites import suite_for

    return suite_for(name, list(tasks) if tasks else None, Path(manifest))


def suite_of(env: Settings, ref: str, tasks: list[str] | None):
    """The suite `ref` names. A suite file is read afresh each time (its data may change between runs of a served
    pipeline; a task that finds another digest than its flow computed refuses to go on)."""
    from evaluation.suites import is_suite_file
    from flows.suites import suite_for

    if is_suite_file(ref):
        return suite_for(ref, tasks, registry=registry_for(env))
    return _named_suite(ref, tuple(tasks) if tasks else None, str(env.zoo_manifest))


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _evaluate_key(context, p: dict) -> str:
    return _key("evaluate", __version__, p["env"].database_url, p["digest"], p["suite_digest"])


def _merge_key(context, p: dict) -> str:
    # recipe_json is a recipe's canonical JSON (`recipe_for`): its hash needs no parse
    return _key("merge", __version__, p["env"].database_url, canonical_hash(p["recipe_json"]), p["name"],
                p["suite_digest"])


def _score_key(context, p: dict) -> str:
    return _key("score", __version__, p["env"].database_url, p["suite_digest"], p["base"], p["candidates"],
                p["samples_per_task"])


# ---- tasks -------------------------------------------------------------------------------------


@task(name="ingest", task_run_name="ingest {uri}", cache_policy=NO_CACHE, **IO_RETRIES)
def ingest_task(env: Settings, uri: str, base: str | None = None) -> str:
    """A source URI or path → its digest (sources change, so never cached; the registry makes it idempotent)."""
    from flows.resolve import is_source, resolve_input

    registry = registry_for(env)
    if base is not None and is_source(uri):
        return registry.ingest(uri, base=base)[0].digest
    return resolve_input(registry, uri).digest


@task(name="score", cache_key_fn=_score_key, persist_result=True, **IO_RETRIES)
def score_task(env: Settings, suite: str, tasks: list[str] | None, suite_digest: str, base: str, candidates: list[str],
               samples_per_task: int) -> dict[str, float]:
    from flows.steps import score_candidates

    registry = registry_for(env)
    return score_candidates(registry, suite_of(env, suite, tasks), registry.resolve(base),
                            [registry.resolve(c) for c in candidates], samples_per_task, env.device)


@task(name="evaluate", task_run_name="evaluate {digest:.19}", cache_key_fn=_evaluate_key, persist_result=True,
      **IO_RETRIES)
def evaluate_task(env: Settings, digest: str, suite: str, tasks: list[str] | None, suite_digest: str) -> dict:
    from flows.steps import evaluate_or_reuse

    registry = registry_for(env)
    s = suite_of(env, suite, tasks)
    if s.digest != suite_digest:
        raise RuntimeError(f"suite {suite} changed under the run ({s.digest} != {suite_digest})")
    return vars(evaluate_or_reuse(registry, registry.resolve(digest), s, env.device))


# One retry: a merge that failed on a transient error left a failed run and nothing else, so it can start over.
@task(name="merge", task_run_name="merge {name} ({label})", cache_key_fn=_merge_key, persist_result=True,
      retries=1, retry_delay_seconds=2, retry_condition_fn=_retry_if_transient)
def merge_task(env: Settings, recipe_json: str, name: str, label: str, suite: str, tasks: list[str] | None,
               suite_digest: str) -> dict:
    """Merge + evaluate + register atomically (see flows.steps.merge_evaluate_commit)."""
    from flows.steps import merge_evaluate_commit

    from merging.engine.dask_executor import in_dask_worker

    # on Dask (`--dask`), the merge's own units spread over the same cluster
    outcome = merge_evaluate_commit(registry_for(env), parse_recipe(json.loads(recipe_json)), name,
                                    suite_of(env, suite, tasks), device=env.device,
                                    dask="current" if in_dask_worker() else None)
    return {"digest": outcome.model.digest, "merged": outcome.merged, "scores": vars(outcome.scores)}


@task(name="promote", task_run_name="promote {digest:.19} to {alias}", cache_policy=NO_CACHE, **IO_RETRIES)
def promote_task(env: Settings, digest: str, alias: str, gate_json: str | None, actor: str, reason: str | None = None,
                 no_gate: bool = False) -> dict:
    from flows.steps import promote_if_changed
    from registry.promotion import Gate

    gate = Gate.model_validate_json(gate_json) if gate_json else None
    return promote_if_changed(registry_for(env), digest, alias, gate, actor, reason, no_gate).as_dict()


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(env: Settings, report: dict) -> list[str]:
    """One markdown artifact per merge and one for the run (Prefect UI → Artifacts)."""
    from prefect.artifacts import create_markdown_artifact

    from flows.report import artifact_key, merge_markdown, pipeline_markdown

    ids = []
    for merge in report["merges"]:
        ids.append(str(create_markdown_artifact(
            key=artifact_key(report["name"], merge["label"]), markdown=merge_markdown(report, merge),
            description=f"{merge['label']} → {merge['digest'][:19]}")))
    ids.append(str(create_markdown_artifact(key=artifact_key(report["name"], "summary"),
                                            markdown=pipeline_markdown(report),
                                            description=f"pipeline {report['name']}")))
    return ids


# ---- flows -------------------------------------------------------------------------------------


def _with_results(env: Settings, *tasks_):
    """The tasks, persisting results under this registry's home (a block Prefect's API knows, as it requires)."""
    from prefect.filesystems import LocalFileSystem

    name = "mergeyard-results-" + hashlib.sha256(str(env.results_dir).encode()).hexdigest()[:12]
    LocalFileSystem(basepath=str(env.results_dir)).save(name, overwrite=True)
    return [t.with_options(result_storage=f"local-file-system/{name}") for t in tasks_]


def merge_label(spec: MergeSpec) -> str:
    params = ",".join(f"{k}={v}" for k, v in sorted(spec.parameters.items()))
    return f"{spec.method}({params})" if params else spec.method


def recipe_for(spec: MergeSpec, base: str, candidates: list[str], suite: str | None = None,
               tasks: list[str] | None = None) -> str:
    """The pinned recipe; a data-informed method optimises the pipeline's suite unless it names its own."""
    from merging.methods import get_method
    from merging.recipes.search import with_search_suite

    parameters = dict(spec.parameters)
    if suite is not None:  # wherever the method takes its data from, unless its parameters name a suite
        parameters = get_method(spec.method).with_suite(parameters, suite, tasks)
    data = {**spec.model_dump(exclude={"name"}), "base": base, "models": candidates, "parameters": parameters}
    if suite is not None:  # `auto` coefficients are chosen on the pipeline's suite unless `search:` names another
        data = with_search_suite(data, suite, tasks)
    return parse_recipe(data).canonical_json()


@flow(name="mergeyard-ingest")
def ingest_flow(uris: list[str], base: str | None = None, env: Settings | None = None) -> list[str]:
    env = env or pinned_settings()
    base_digest = ingest_task(env, base) if base else None
    return ingest_task.map(unmapped(env), uris, base=unmapped(base_digest)).result()


@flow(name="mergeyard-evaluate")
def evaluate_flow(models: list[str], suite: str, tasks: list[str] | None = None, env: Settings | None = None) -> list[dict]:
    env = env or pinned_settings()
    (evaluate,) = _with_results(env, evaluate_task)
    digest = suite_of(env, suite, tasks).digest
    refs = [registry_for(env).resolve(m).digest for m in models]
    return evaluate.map(unmapped(env), refs, suite, unmapped(tasks), digest).result()


@flow(name="mergeyard-score")
def score_flow(suite: str, base: str, candidates: list[str], tasks: list[str] | None = None,
               samples_per_task: int = 100, env: Settings | None = None) -> dict[str, float]:
    """Relevance of each candidate (ingested first if it is a source) to the suite, recorded."""
    env = env or pinned_settings()
    (score,) = _with_results(env, score_task)
    base_digest = ingest_task(env, base)
    digests = ingest_task.map(unmapped(env), candidates, base=unmapped(base_digest)).result()
    return score(env, suite, tasks, suite_of(env, suite, tasks).digest, base_digest, digests, samples_per_task)


@flow(name="mergeyard-merge")
def merge_flow(spec: MergeSpec, base: str, candidates: list[str], suite: str, tasks: list[str] | None = None,
               name: str | None = None, env: Settings | None = None) -> dict:
    """One merge, evaluated on the suite and registered atomically with its lineage."""
    env = env or pinned_settings()
    (merge,) = _with_results(env, merge_task)
    base_digest = ingest_task(env, base)
    digests = ingest_task.map(unmapped(env), candidates, base=unmapped(base_digest)).result()
    return merge(env, recipe_for(spec, base_digest, digests, suite, tasks), name or spec.name or f"merged-{spec.method}",
                 merge_label(spec), suite, tasks, suite_of(env, suite, tasks).digest)


@flow(name="mergeyard-promote")
def promote_flow(model: str, alias: str, gate: Gate | None = None, actor: str = "mergeyard-flow",
                 reason: str | None = None, env: Settings | None = None, no_gate: bool = False) -> dict:
    """The model through the gate to NAME@ALIAS (an audit event either way; none if it already holds it)."""
    env = env or pinned_settings()
    return promote_task(env, registry_for(env).resolve(model).digest, alias, gate.model_dump_json() if gate else None,
                        actor, reason, no_gate)


@flow(name="mergeyard-pipeline", log_prints=True)
def pipeline_flow(config: PipelineConfig, env: Settings | None = None) -> dict:
    """Ingest the base and candidates, score, merge with each method, evaluate, promote the best, publish."""
    from flows.steps import best_merge, select_candidates, summary

    env = env or pinned_settings()
    score, evaluate, merge = _with_results(env, score_task, evaluate_task, merge_task)
    suite = suite_of(env, config.suite, config.tasks)
    tasks = list(config.tasks) if config.tasks else None

    base = ingest_task(env, config.base)
    uris = config.resolved_candidates()
    candidates = ingest_task.map(unmapped(env), uris, base=unmapped(base)).result()
    candidates = list(dict.fromkeys(candidates))  # two URIs with the same bytes are one candidate

    if config.score.method == "gradient":
        relevance = score(env, config.suite, tasks, suite.digest, base, candidates, config.score.samples_per_task)
        chosen = set(select_candidates(relevance, config.score.min_relevance, config.score.top_k))
        selected = [d for d in candidates if d in chosen]  # config order, so a recipe never depends on score noise
    else:
        relevance, selected = {}, candidates
    if not selected:
        raise RuntimeError(f"no candidate passed the relevance filter ({config.score}); scores: {relevance}")

    parent_futures = evaluate.map(unmapped(env), [base] + selected, config.suite, unmapped(tasks), suite.digest)
    labels = [merge_label(m) for m in config.merges]
    merge_futures = merge.map(unmapped(env), [recipe_for(m, base, selected, config.suite, tasks) for m in config.merges],
                              [m.name or config.name for m in config.merges], labels, config.suite, unmapped(tasks),
                              suite.digest)
    parents = parent_futures.result()
    merges = merge_futures.result()  # a failed merge fails the run here: nothing half-promoted
    for m, future in zip(merges, merge_futures):
        m["cached"] = future.state.name == "Cached"
        m["merged"] = m["merged"] and not m["cached"]

    registry = registry_for(env)
    report = {
        "name": config.name, "suite": config.suite, "suite_digest": suite.digest, "tasks": list(suite.tasks),
        "base": base,
        "candidates": [{"digest": d, "name": registry.resolve(d).name, "relevance": relevance.get(d),
                        "selected": d in selected} for d in candidates],
        "parents": {p["digest"]: p for p in parents},
        "merges": [{"label": label, "method": spec.method, "parameters": spec.parameters, **m,
                    "name": spec.name or config.name, **dict(zip(("metric", "average"), summary(m["scores"])))}
                   for label, spec, m in zip(labels, config.merges, merges)],
    }
    best = best_merge(report["merges"])
    report["best"] = best["digest"]
    if config.promotion is not None:
        gate = config.gate()
        report["promotion"] = promote_task(env, best["digest"], config.promotion.alias,
                                           gate.model_dump_json() if gate else None, config.promotion.actor,
                                           f"pipeline {config.name}: best of {len(config.merges)} merges on {config.suite}",
                                           config.promotion.no_gate)
    else:
        report["promotion"] = None
    report["artifacts"] = publish_task(env, report)
    shown = f"average accuracy {100 * best['average']:.1f}" if best["metric"] == "accuracy" else \
        f"mean perplexity {best['average']:.4g}"
    print(f"best merge {best['label']} → {best['digest'][:19]} ({shown})")
    return report
