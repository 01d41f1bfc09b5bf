"""`mergeyard demo | run | serve`: the whole job as a Prefect flow run, now or on a schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli_app import app
from flows.cli_common import (DASK_HELP, DEVICE, EXIT_GATE_REFUSED, JSON, preflight, print_json, show_progress,
                              stdout, user_errors)
from flows.progress import progress_bars


def _run_pipeline(config, dask: Optional[str], refresh: bool) -> dict:
    """The pipeline flow, in this process, against the configured (or ephemeral) Prefect API."""
    import os

    from flows.runtime import configure_prefect
    from flows.settings import get_settings

    settings = get_settings()
    configure_prefect(settings)
    if refresh:
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"
    from flows.pipeline import pipeline_flow
    from flows.runtime import with_runner

    return with_runner(pipeline_flow, dask)(config, settings.pinned().model_copy(update={"device": config.device}))


def _print_report(report: dict, as_json: bool) -> None:
    from flows.console import promotion_table, render_tree, report_tables
    from flows.registry_access import open_registry
    from registry.lineage import lineage as build_lineage

    if as_json:
        print_json(report)
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

    from flows.settings import get_settings

    settings = get_settings()
    stdout.print("[bold]next[/]:")
    stdout.print(f"  mlflow ui --backend-store-uri {settings.mlflow_uri} --port 5000   [dim]# runs, models, aliases[/]",
                 highlight=False, soft_wrap=True)
    if "PREFECT_API_URL" not in os.environ:
        stdout.print(f"  PREFECT_HOME={os.environ.get('PREFECT_HOME')} prefect server start   [dim]# flow runs and the merge artifacts[/]",
                     highlight=False, soft_wrap=True)
    stdout.print("  mergeyard models list; mergeyard audit; mergeyard reproduce MODEL", highlight=False)


def _with_device(config, device: Optional[str]):
    return config.model_copy(update={"device": device}) if device else config


@app.command()
@user_errors
def demo(
    full: bool = typer.Option(False, help="all 22 zoo fine-tunes and the 8 ta8-mini targets (about 9 minutes to build on 2 CPU cores)"),
    dask: Optional[str] = typer.Option(None, "--dask", help=DASK_HELP),
    device: Optional[str] = DEVICE,
    as_json: bool = JSON,
) -> None:
    """The whole job with no configuration: build the offline zoo, ingest, score, merge with every method,
    evaluate, promote the best through a gate; print the results, the decision and the promoted model's lineage."""
    from flows.config import load_pipeline
    from flows.demo import prepare_demo
    from flows.settings import get_settings

    with progress_bars(enabled=show_progress(as_json)) as progress:
        path = prepare_demo(get_settings(), full=full, progress=progress)
    if not as_json:
        stdout.print(f"pipeline: {path}")
    report = _run_pipeline(_with_device(load_pipeline(path), device), dask, refresh=False)
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
    fail_on_refusal: bool = typer.Option(False, help="exit 3 when the gate refuses the best merge"),
    device: Optional[str] = DEVICE,
    as_json: bool = JSON,
) -> None:
    """Run a pipeline: ingest, score, merge, evaluate, promote (a Prefect flow run)."""
    from flows.config import load_pipeline
    from flows.settings import get_settings

    config = _with_device(load_pipeline(pipeline), device)
    preflight(get_settings(), config.suite, config.tasks, [config.base, *config.resolved_candidates()])
    report = _run_pipeline(config, dask, refresh)
    _print_report(report, as_json)
    if fail_on_refusal and report.get("promotion") and report["promotion"]["decision"] == "refused":
        raise typer.Exit(EXIT_GATE_REFUSED)


@app.command()
@user_errors
def serve(
    pipeline: Path = typer.Argument(..., help="pipeline YAML with a `schedule: {cron: ...}`"),
    dask: Optional[str] = typer.Option(None, "--dask", help=DASK_HELP),
    limit: Optional[int] = typer.Option(None, help="most concurrent runs"),
    device: Optional[str] = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="print the deployment as JSON once it is served"),
) -> None:
    """Serve the pipeline as a Prefect deployment on its cron schedule (needs PREFECT_API_URL; runs until stopped)."""
    from flows.config import load_pipeline
    from flows.runtime import configure_prefect
    from flows.settings import get_settings

    settings = get_settings()
    config = _with_device(load_pipeline(pipeline), device)
    configure_prefect(settings)
    from flows.runtime import serve_pipeline

    # Fail now, not at 2 a.m.: after the server, the suite's tasks and the base and listed candidates (globs
    # are matched at each run, so an empty one is not an error yet).
    serve_pipeline(config, settings.pinned().model_copy(update={"device": config.device}), dask, limit,
                   preflight=lambda: preflight(settings, config.suite, config.tasks, [config.base, *config.candidates]),
                   announce=(lambda info: print_json(info)) if as_json else None)
