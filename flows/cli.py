"""The `mergeyard` command line (typer + rich).

Errors a user can cause print as one line on stderr and exit with status 1;
nothing half-written is left behind (the engine writes via temp + rename).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from merging.errors import MergeyardError
from merging.version import __version__
from flows.cli_common import preflight, stdout, user_errors
from flows.progress import progress_bars, stderr
from flows.settings import get_settings

app = typer.Typer(
    name="mergeyard",
    help="Model merging with lineage: ingest, score, merge, evaluate and promote models, reproducibly.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _defaults() -> None:
    """Keep what libraries cache under MERGEYARD_HOME too (matplotlib's font cache, used by the zoo's renderer)."""
    import os

    os.environ.setdefault("MPLCONFIGDIR", str((Path(get_settings().home) / "cache" / "matplotlib").resolve()))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our own bars, or none


@app.command()
@user_errors
def merge(
    recipe: Path = typer.Argument(..., help="recipe YAML (method, base, models, parameters)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write the merged checkpoint here (must not exist unless --overwrite)"),
    name: Optional[str] = typer.Option(None, help="registry name of the merged model (default merged-METHOD)"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: MERGEYARD_DEVICE or cpu)"),
    max_shard_bytes: Optional[int] = typer.Option(None, help="largest output shard in bytes (default 5e9)"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory once the merge succeeded"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Merge checkpoints as RECIPE says, register the result with its lineage, print its digest.

    Recipe inputs may be paths or source URIs (ingested first) or registered models (digest, name, NAME@ALIAS).
    """
    from flows.merge import merge_and_record
    from flows.registry_access import open_registry
    from merging.recipe import load_recipe

    settings = get_settings()
    parsed = load_recipe(recipe)
    registry = open_registry(settings)
    with progress_bars(enabled=sys.stderr.isatty() or not as_json) as progress:
        recorded = merge_and_record(
            parsed, registry, out=out, name=name, device=device or settings.device,
            max_shard_bytes=max_shard_bytes or settings.max_shard_bytes, overwrite=overwrite, progress=progress,
        )
    result = recorded.result
    if as_json:
        print(json.dumps({**result.as_dict(), "out_dir": str(out) if out else None, "name": recorded.model.name,
                          "store_path": recorded.model.store_path, "merge_run": recorded.run_id}, indent=2))
    else:
        stdout.print(f"merged with [bold]{result.method}[/] in {result.seconds:.2f} s → {recorded.model.name} "
                     f"(run {recorded.run_id}){f', written to {out}' if out else ''}")
        stdout.print(result.digest, highlight=False)


@app.command()
@user_errors
def digest(
    path: Path = typer.Argument(..., help="a .safetensors file or a checkpoint directory (sharded or not)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Print a checkpoint's content digest (independent of sharding and file names)."""
    from merging.checkpoint import Checkpoint
    from merging.digest import checkpoint_digest

    ckpt = Checkpoint(path)
    value = checkpoint_digest(ckpt)
    if as_json:
        print(json.dumps({"path": str(path), "digest": value, "tensors": len(ckpt.entries),
                          "params": ckpt.num_params, "bytes": ckpt.nbytes}, indent=2))
    else:
        print(value)


def _plain_default(value):
    from pydantic import BaseModel

    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


@app.command()
@user_errors
def methods(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """List the merge methods with their parameters and papers."""
    from merging.methods import all_methods

    listing = []
    for spec in all_methods():
        params = {
            (f.alias or name): {"default": _plain_default(f.get_default(call_default_factory=True)),
                                "description": f.description or ""}
            for name, f in spec.params.model_fields.items()
        }
        listing.append({"name": spec.name, "summary": spec.summary, "paper": spec.paper,
                        "requires_base": spec.requires_base, "parameters": params})
    if as_json:
        print(json.dumps(listing, indent=2, default=str))
        return
    table = Table("method", "parameters (default)", "paper", title="merge methods")
    for m in listing:
        params = ", ".join(f"{k}={v['default']}" for k, v in m["parameters"].items())
        table.add_row(f"[bold]{m['name']}[/]\n{m['summary']}", params, m["paper"])
    stdout.print(table)


DASK_HELP = "run mapped tasks on Dask: an ADDRESS (tcp://host:8786), or no value for a local cluster"


def _run_pipeline(config, dask: Optional[str], refresh: bool) -> dict:
    """The pipeline flow, in this process, against the configured (or ephemeral) Prefect API."""
    import os

    from flows.runtime import configure_prefect

    settings = get_settings()
    configure_prefect(settings)
    if refresh:
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"
    from flows.pipeline import pipeline_flow
    from flows.runtime import with_runner

    env = settings.pinned().model_copy(update={"device": config.device})
    return with_runner(pipeline_flow, dask)(config, env)


def _print_report(report: dict, as_json: bool) -> None:
    from flows.console import promotion_table, render_tree, report_tables
    from flows.registry_access import open_registry
    from registry.lineage import lineage as build_lineage

    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    stdout.print(report_tables(report))
    promotion = report.get("promotion")
    if promotion:
        stdout.print(promotion_table(promotion))
    registry = open_registry()
    shown = registry.resolve(promotion["model"] if promotion else report["best"])
    with registry.Session() as session:
        stdout.print(f"lineage of {shown.name} {shown.digest[:19]}:")
        stdout.print(render_tree(build_lineage(session, shown.id)))


def _where_next() -> None:
    import os

    settings = get_settings()
    stdout.print("[bold]next[/]:")
    stdout.print(f"  mlflow ui --backend-store-uri {settings.mlflow_uri} --port 5000   [dim]# runs, models, aliases[/]",
                 highlight=False, soft_wrap=True)
    if "PREFECT_API_URL" not in os.environ:
        stdout.print(f"  PREFECT_HOME={os.environ.get('PREFECT_HOME')} prefect server start   [dim]# flow runs and the merge artifacts[/]",
                     highlight=False, soft_wrap=True)
    stdout.print("  mergeyard models list; mergeyard audit; mergeyard reproduce MODEL", highlight=False)


@app.command()
@user_errors
def demo(
    full: bool = typer.Option(False, help="all 22 zoo fine-tunes and the 8 ta8-mini targets (about 9 minutes to build on 2 CPU cores)"),
    dask: Optional[str] = typer.Option(None, "--dask", help=DASK_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the pipeline report as JSON"),
) -> None:
    """The whole job with no configuration: build the offline zoo, ingest, score, merge with every method,
    evaluate, promote the best through a gate; print the results, the decision and the promoted model's lineage."""
    from flows.config import load_pipeline
    from flows.demo import prepare_demo

    settings = get_settings()
    with progress_bars(enabled=not as_json) as progress:
        path = prepare_demo(settings, full=full, progress=progress)
    if not as_json:
        stdout.print(f"pipeline: {path}")
    report = _run_pipeline(load_pipeline(path), dask, refresh=False)
    _print_report(report, as_json)
    if not as_json:
        _where_next()
        stdout.print(f"  mergeyard run {path}   [dim]# again: everything is cached[/]", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def run(
    pipeline: Path = typer.Argument(..., help="pipeline YAML (name, suite, base, candidates, merges, promotion)"),
    dask: Optional[str] = typer.Option(None, "--dask", help=DASK_HELP),
    refresh: bool = typer.Option(False, help="ignore Prefect's caches (the registry still reuses recorded work)"),
    fail_on_refusal: bool = typer.Option(False, help="exit 2 when the gate refuses the best merge"),
    as_json: bool = typer.Option(False, "--json", help="print the pipeline report as JSON"),
) -> None:
    """Run a pipeline: ingest, score, merge, evaluate, promote (a Prefect flow run)."""
    from flows.config import load_pipeline

    config = load_pipeline(pipeline)
    preflight(get_settings(), config.suite, config.tasks, [config.base, *config.resolved_candidates()])
    report = _run_pipeline(config, dask, refresh)
    _print_report(report, as_json)
    if fail_on_refusal and report.get("promotion") and report["promotion"]["decision"] == "refused":
        raise typer.Exit(2)


@app.command()
@user_errors
def serve(
    pipeline: Path = typer.Argument(..., help="pipeline YAML with a `schedule: {cron: ...}`"),
    dask: Optional[str] = typer.Option(None, "--dask", help=DASK_HELP),
    limit: Optional[int] = typer.Option(None, help="most concurrent runs"),
) -> None:
    """Serve the pipeline as a Prefect deployment on its cron schedule (needs PREFECT_API_URL; runs until stopped)."""
    from flows.config import load_pipeline
    from flows.runtime import configure_prefect

    settings = get_settings()
    config = load_pipeline(pipeline)
    configure_prefect(settings)
    from flows.runtime import serve_pipeline

    # Fail now, not at 2 a.m.: after the server, the suite's tasks and the base and listed candidates (globs
    # are matched at each run, so an empty one is not an error yet).
    serve_pipeline(config, settings.pinned().model_copy(update={"device": config.device}), dask, limit,
                   preflight=lambda: preflight(settings, config.suite, config.tasks, [config.base, *config.candidates]))


@app.command()
@user_errors
def score(
    candidates: list[str] = typer.Argument(..., help="candidate models: paths, URIs or registered models"),
    suite: str = typer.Option(..., "--suite", help="a suite file (.yaml) or a built-in suite (ta8-mini, zoo-all, zoo:TASK, ta8); any name with --reference"),
    base: str = typer.Option(..., "--base", help="the base the candidates were fine-tuned from"),
    reference: Optional[str] = typer.Option(None, help="data-free: score by task-vector cosine with this model"),
    tasks: Optional[list[str]] = typer.Option(None, "--tasks", help="only these tasks of the suite (repeatable)"),
    samples: int = typer.Option(100, help="few-shot samples per task for the gradient"),
    as_json: bool = typer.Option(False, "--json", help="print as JSON"),
) -> None:
    """Relevance of each candidate to a suite, recorded: cosine of −∇loss at the base with its task vector
    (per tensor, averaged; FW-Merging's oracle at θ₀), or with --reference the data-free task-vector cosine."""
    from flows.resolve import resolve_input
    from flows.registry_access import open_registry
    from flows.steps import score_candidates, score_data_free
    from flows.suites import suite_for

    settings = get_settings()
    registry = open_registry(settings)
    # the suite first: a bad suite file fails before any candidate is ingested
    the_suite = None if reference else suite_for(suite, tasks, settings.zoo_dir / "manifest.json", registry=registry)
    base_model = resolve_input(registry, base)
    models = [resolve_input(registry, c) for c in candidates]
    if reference:
        scores = score_data_free(registry, suite, base_model, resolve_input(registry, reference), models)
        title = f"task-vector cosine with {reference} (for {suite})"
    else:
        scores = score_candidates(registry, the_suite, base_model, models, samples, settings.device)
        title = f"relevance to {suite} ({the_suite.digest[:19]})"
    rows = sorted(((m, scores[m.digest]) for m in models), key=lambda r: -r[1])
    if as_json:
        print(json.dumps([{"digest": m.digest, "name": m.name, "relevance": v} for m, v in rows], indent=2))
        return
    table = Table("candidate", "digest", "relevance", title=title)
    for m, v in rows:
        table.add_row(m.name, m.digest[:19], f"{v:+.4f}")
    stdout.print(table)


@app.command()
@user_errors
def ingest(
    uri: str = typer.Argument(..., help="path, file://, hf://ORG/NAME[@REV], open_clip://ARCH[/PRETRAINED], mlflow://NAME/VERSION or NAME@ALIAS"),
    name: Optional[str] = typer.Option(None, help="registry name (default: derived from the source)"),
    base: Optional[str] = typer.Option(None, help="declared base MODEL: the checkpoint must match its tensors"),
    as_json: bool = typer.Option(False, "--json", help="print the model as JSON"),
) -> None:
    """Validate a checkpoint and register it by content digest (the same bytes again are a no-op)."""
    from flows.registry_access import open_registry

    model, created = open_registry().ingest(uri, name=name, base=base)
    if as_json:
        print(json.dumps({**model.as_dict(), "created": created}, indent=2))
    else:
        verb = "registered" if created else "already registered as"
        stdout.print(f"{verb} [bold]{model.name}[/] ({model.num_params:,} params, {model.dtype})")
        stdout.print(model.digest, highlight=False)


models_app = typer.Typer(help="Registered models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
@user_errors
def models_list(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """List registered models."""
    from flows.registry_access import open_registry

    rows = open_registry().list_models()
    if as_json:
        print(json.dumps([m.as_dict() for m in rows], indent=2))
        return
    table = Table("digest", "name", "kind", "params", "dtype", "source", "created", title="registered models")
    for m in rows:
        table.add_row(m.digest[:19], m.name, m.kind, f"{m.num_params:,}", m.dtype, m.source_uri,
                      m.created_at.strftime("%Y-%m-%d %H:%M"))
    stdout.print(table)


@app.command()
@user_errors
def export(
    model: str = typer.Argument(..., help="digest, name, or NAME@ALIAS"),
    out: Path = typer.Option(..., "--out", "-o", help="directory to write (must not exist unless --overwrite)"),
    head: Optional[str] = typer.Option(None, help="a fine-tuned task model (or its head) whose head to put on the encoder"),
    overwrite: bool = typer.Option(False, help="replace an existing directory"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Write a registered model as a directory transformers loads; with --head, as that fine-tune's task model
    (AutoModelForSequenceClassification) around the model's encoder."""
    from flows.export import export_model
    from flows.registry_access import open_registry

    info, head_info = export_model(open_registry(), model, out, head, overwrite)
    if as_json:
        print(json.dumps({"model": info.digest, "name": info.name, "head": head_info.digest if head_info else None,
                          "out": str(out)}, indent=2))
    else:
        with_head = f" with the head of {head_info.name}" if head_info else ""
        stdout.print(f"wrote {info.name}{with_head} to {out}", highlight=False)


@app.command()
@user_errors
def lineage(
    model: str = typer.Argument(..., help="digest (or unique prefix), name, or NAME@ALIAS"),
    fmt: str = typer.Option("tree", "--format", help="tree, json or mermaid"),
) -> None:
    """Show a model's ancestors down to the ingested roots, with methods, coefficients and metrics."""
    from flows.registry_access import open_registry
    from registry.lineage import lineage as build_lineage

    if fmt not in ("tree", "json", "mermaid"):
        raise MergeyardError(f"--format {fmt!r}: use tree, json or mermaid")
    registry = open_registry()
    info = registry.resolve(model)
    with registry.Session() as session:
        graph = build_lineage(session, info.id)
    if fmt == "json":
        print(graph.to_json())
    elif fmt == "mermaid":
        print(graph.to_mermaid())
    else:
        from flows.console import render_tree

        stdout.print(render_tree(graph))


@app.command()
@user_errors
def promote(
    model: str = typer.Argument(..., help="digest, name, or NAME@ALIAS"),
    to: str = typer.Option(..., "--to", help="alias to move, e.g. staging or production"),
    gate: Optional[Path] = typer.Option(None, help="gate YAML (default: no rules; the event is still recorded)"),
    actor: Optional[str] = typer.Option(None, help="who promotes (default: $USER)"),
    reason: Optional[str] = typer.Option(None, help="why, for the audit log"),
    as_json: bool = typer.Option(False, "--json", help="print the decision as JSON"),
) -> None:
    """Pass MODEL through a gate and, if it passes, move NAME@ALIAS to it. Both outcomes are audit events."""
    import getpass

    from flows.gates import promote_through
    from flows.registry_access import open_registry
    from registry.promotion import Gate, load_gate

    decision = promote_through(open_registry(), model, to, load_gate(gate) if gate else Gate(),
                               actor or getpass.getuser(), reason, get_settings().zoo_dir / "manifest.json")
    if as_json:
        print(json.dumps(decision.as_dict(), indent=2, default=str))
    else:
        table = Table("rule", "observed", "threshold", "", title=f"gate for {decision.model.name}@{to}")
        for c in decision.checks:
            table.add_row(c.rule, str(c.observed), str(c.threshold), "[green]pass[/]" if c.passed else f"[red]FAIL[/] {c.detail}")
        if decision.checks:
            stdout.print(table)
        verdict = "[green]promoted[/]" if decision.passed else "[red]refused[/]"
        stdout.print(f"{verdict} {decision.model.digest[:19]} to {decision.model.name}@{to} (event {decision.event_id})")
    if not decision.passed:
        raise typer.Exit(2)


@app.command()
@user_errors
def audit(
    model: Optional[str] = typer.Argument(None, help="only events about this model"),
    alias: Optional[str] = typer.Option(None, help="only events for this alias"),
    as_json: bool = typer.Option(False, "--json", help="print as JSON"),
) -> None:
    """The promotion history: who moved which model where, when, and the numbers the gate compared."""
    from flows.registry_access import open_registry
    from registry.promotion import audit as read_audit

    rows = read_audit(open_registry(), model, alias)
    if as_json:
        print(json.dumps([vars(r) for r in rows], indent=2, default=str))
        return
    table = Table("event", "time", "alias", "decision", "model", "previous", "actor", "reason", title="promotion audit log")
    for r in rows:
        table.add_row(str(r.id), r.time[:19], f"{r.name}@{r.alias}", r.decision, r.model[:19],
                      (r.previous or "")[:19], r.actor, r.reason or "")
    stdout.print(table)


@app.command()
@user_errors
def reproduce(
    model: str = typer.Argument(..., help="digest, name, or NAME@ALIAS"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda"),
    as_json: bool = typer.Option(False, "--json", help="print as JSON"),
) -> None:
    """Rebuild a model from its lineage record and compare digests; exit 1 naming differing tensors on mismatch."""
    from flows.registry_access import open_registry
    from flows.reproduce import reproduce as run_reproduce

    with progress_bars(enabled=not as_json) as progress:
        outcome = run_reproduce(open_registry(), model, device=device or get_settings().device, progress=progress)
    if as_json:
        print(json.dumps(outcome.as_dict(), indent=2))
    elif outcome.ok:
        stdout.print(f"[green]reproduced[/] {outcome.model.name}: {outcome.rebuilt_digest}", highlight=False)
    if not outcome.ok:
        names = ", ".join(outcome.differing[:10]) + (" ..." if len(outcome.differing) > 10 else "")
        stderr.print(f"[bold red]error:[/] rebuilt {outcome.rebuilt_digest} but recorded {outcome.model.digest}; "
                     f"differing tensors: {names or 'none found (metadata only)'}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command()
@user_errors
def evaluate(
    model: str = typer.Argument(..., help="digest, name, NAME@ALIAS, or a checkpoint path (ingested first)"),
    suite: Optional[str] = typer.Option(None, "--suite", help="a suite file (.yaml) or a built-in suite: ta8-mini, zoo-all, zoo:TASK, ta8"),
    import_file: Optional[Path] = typer.Option(None, "--import", help="record an lm-evaluation-harness results file instead (marked imported)"),
    tasks: Optional[list[str]] = typer.Option(None, "--tasks", help="only these tasks of the suite (repeatable)"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda"),
    record: bool = typer.Option(True, help="record the results in the registry and MLflow"),
    as_json: bool = typer.Option(False, "--json", help="print as JSON"),
) -> None:
    """Score a model on a task suite: each task's metric, its loss and normalised accuracy. With --import, record
    an lm-evaluation-harness results file as the model's imported evaluation (gates need allow_imported: true)."""
    from flows.evaluate import evaluate_model
    from flows.registry_access import open_registry

    settings = get_settings()
    if (suite is None) == (import_file is None):
        raise MergeyardError("give --suite (evaluate here) or --import RESULTS.json (record lm-evaluation-harness results)")
    if import_file is not None:
        from flows.evaluate import import_results

        info, imported = import_results(open_registry(settings), model, import_file)
        if as_json:
            print(json.dumps({"model": info.digest, "name": info.name, "imported": imported.provenance,
                              "rows": [{"task": t, "metric": m, "value": v} for t, m, v in imported.rows]}, indent=2))
            return
        table = Table("task", "metric", "value", title=f"{info.name}: imported from {imported.provenance['file']} "
                      f"({imported.provenance['harness']} {imported.provenance['harness_version']})")
        for t, m, v in imported.rows:
            table.add_row(t, m, f"{v:.4f}")
        stdout.print(table)
        return
    with progress_bars(enabled=not as_json) as progress:
        info, result = evaluate_model(open_registry(settings), model, suite, tasks=tasks,
                                      zoo_manifest=settings.zoo_dir / "manifest.json", device=device or settings.device,
                                      record=record, progress=progress)
    if as_json:
        print(json.dumps({"model": info.digest, "name": info.name, **result.as_dict()}, indent=2))
        return
    table = Table("task", "metric", "value", "accuracy", "normalised", "loss", "samples",
                  title=f"{info.name} on {result.suite} ({result.suite_digest[:19]})")
    pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for t in result.tasks:
        shown = f"{t.value:.3f}" if t.metric == "perplexity" else pct(t.value)
        table.add_row(t.task, t.metric, shown, pct(t.accuracy), pct(t.normalized_accuracy), f"{t.loss:.3f}", str(t.samples))
    table.add_row("[bold]average[/]", "", "", f"[bold]{pct(result.average_accuracy)}[/]",
                  pct(result.average_normalized_accuracy), "", "")
    stdout.print(table)


zoo_app = typer.Typer(help="The offline benchmark zoo (procedural tasks, a small CLIP, its fine-tunes).", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("pretrain")
@user_errors
def zoo_pretrain(
    steps: int = typer.Option(4000, help="contrastive pre-training steps (batch 256)"),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, help="asset directory (default: the one committed in evaluation/zoo/assets)"),
) -> None:
    """Pre-train the zoo CLIP deterministically and write it as the float16 asset (tens of CPU minutes)."""
    import time

    from evaluation.zoo.asset import ASSET_DIR, save_asset
    from evaluation.zoo.train import pretrain

    started = time.perf_counter()
    with progress_bars() as progress:
        clip = pretrain(steps, batch=256, lr=2e-3, per_class=400, noise=10.0, seed=seed, progress=progress)
    record = save_asset(clip, {"command": f"mergeyard zoo pretrain --steps {steps} --seed {seed}", "steps": steps,
                               "seed": seed, "seconds": round(time.perf_counter() - started, 1)}, out or ASSET_DIR)
    stdout.print(f"wrote the zoo CLIP ({record['bytes'] / 1e6:.1f} MB): {record['digest']}")


@zoo_app.command("build")
@user_errors
def zoo_build(
    small: bool = typer.Option(False, help="4 tasks, short fine-tunes (about a minute; what the tests use)"),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, help="output directory (default MERGEYARD_HOME/zoo)"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
) -> None:
    """Write the base image tower and one fine-tune per task, with a manifest (reused when unchanged)."""
    from evaluation.zoo.build import build_zoo

    target = out or get_settings().zoo_dir
    with progress_bars(enabled=not as_json) as progress:
        manifest = build_zoo(target, small=small, seed=seed, progress=progress)
    if as_json:
        print(json.dumps(manifest, indent=2))
        return
    table = Table("task", "zero-shot", "fine-tuned", "digest", title=f"zoo at {target}")
    for task, entry in manifest["finetuned"].items():
        table.add_row(task, f"{100 * manifest['zero_shot'][task]:.1f}", f"{100 * entry['accuracy']:.1f}", entry["digest"][:19])
    stdout.print(table)


from flows.cli_map import map_app  # noqa: E402  (a sub-app of its own module: cli.py stays readable)

app.add_typer(map_app, name="map")

db_app = typer.Typer(help="The lineage database.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
@user_errors
def db_upgrade() -> None:
    """Apply schema migrations (Alembic) to MERGEYARD_DATABASE_URL."""
    from registry.db import current_revision, head_revision, make_engine, upgrade

    engine = make_engine(get_settings().lineage_database_url)
    before = current_revision(engine)
    upgrade(engine)
    stdout.print(f"lineage database at schema {head_revision(engine)} (was {before or 'empty'})")


@db_app.command("current")
@user_errors
def db_current() -> None:
    """Print the schema revision of the lineage database."""
    from registry.db import current_revision, make_engine

    print(current_revision(make_engine(get_settings().lineage_database_url)) or "empty")


@app.command()
def version() -> None:
    """Print the mergeyard version."""
    print(__version__)


def main() -> None:
    """The console script: `--dask` with no value means a local Dask cluster."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--dask" and (i + 1 == len(args) or args[i + 1].startswith("-") or args[i + 1].endswith((".yaml", ".yml"))):
            args.insert(i + 1, "local")
            break
    app(args=args, prog_name="mergeyard")


if __name__ == "__main__":
    main()
