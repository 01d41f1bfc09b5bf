"""`mergeyard evaluate | score | measure`: a model's numbers on a suite, candidates' relevance, statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from merging.errors import MergeyardError
from flows.cli_app import app
from flows.cli_common import (SUITE_HELP, DEVICE, JSON, TASKS, WIDE, digest_text, print_json, show_progress, split_tasks, stdout,
                              table, user_errors)
from flows.progress import progress_bars



def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.1f}"


@app.command()
@user_errors
def evaluate(
    model: str = typer.Argument(..., help="digest, name, NAME@ALIAS, or a checkpoint path (ingested first)"),
    suite: Optional[str] = typer.Option(None, "--suite", help=SUITE_HELP),
    import_file: Optional[Path] = typer.Option(None, "--import", help="record an lm-evaluation-harness results file instead (marked imported)"),
    tasks: Optional[list[str]] = TASKS,
    device: Optional[str] = DEVICE,
    record: bool = typer.Option(True, help="record the results in the registry and MLflow"),
    as_json: bool = JSON,
) -> None:
    """Score a model on a task suite: each task's metric, its loss and normalised accuracy. With --import, record
    an lm-evaluation-harness results file as the model's imported evaluation (gates need allow_imported: true)."""
    from flows.evaluate import evaluate_model, import_results
    from flows.registry_access import open_registry
    from flows.settings import get_settings

    settings = get_settings()
    if (suite is None) == (import_file is None):
        raise MergeyardError("give --suite (evaluate here) or --import RESULTS.json (record lm-evaluation-harness results)")
    if import_file is not None:
        info, imported = import_results(open_registry(settings), model, import_file)
        if as_json:
            print_json({"model": info.digest, "name": info.name, "imported": imported.provenance,
                        "rows": [{"task": t, "metric": m, "value": v} for t, m, v in imported.rows]})
            return
        shown = table("task", "metric", "value", title=f"{info.name}: imported from {imported.provenance['file']} "
                      f"({imported.provenance['harness']} {imported.provenance['harness_version']})")
        for t, m, v in imported.rows:
            shown.add_row(t, m, f"{v:.4f}")
        stdout.print(shown)
        return
    with progress_bars(enabled=show_progress(as_json)) as progress:
        info, result = evaluate_model(open_registry(settings), model, suite, tasks=split_tasks(tasks),
                                      zoo_manifest=settings.zoo_manifest, device=device or settings.device,
                                      record=record, progress=progress)
    if as_json:
        print_json({"model": info.digest, "name": info.name, **result.as_dict()})
        return
    shown = table("task", "metric", "value", "accuracy", "normalised", "loss", "samples",
                  title=f"{info.name} on {result.suite} ({result.suite_digest[:19]})")
    for t in result.tasks:
        value = f"{t.value:.3f}" if t.metric == "perplexity" else _pct(t.value)
        shown.add_row(t.task, t.metric, value, _pct(t.accuracy), _pct(t.normalized_accuracy), f"{t.loss:.3f}",
                      str(t.samples))
    shown.add_row("[bold]average[/]", "", "", f"[bold]{_pct(result.average_accuracy)}[/]",
                  _pct(result.average_normalized_accuracy), "", "")
    stdout.print(shown)


@app.command()
@user_errors
def score(
    candidates: list[str] = typer.Argument(..., help="candidate models: paths, URIs or registered models"),
    suite: str = typer.Option(..., "--suite", help=SUITE_HELP + " (any name, with --reference)"),
    base: str = typer.Option(..., "--base", help="the base the candidates were fine-tuned from"),
    reference: Optional[str] = typer.Option(None, help="data-free: score by task-vector cosine with this model"),
    tasks: Optional[list[str]] = TASKS,
    samples: int = typer.Option(100, help="few-shot samples per task for the gradient"),
    device: Optional[str] = DEVICE,
    as_json: bool = JSON,
    wide: bool = WIDE,
) -> None:
    """Relevance of each candidate to a suite, recorded: cosine of −∇loss at the base with its task vector
    (per tensor, averaged; FW-Merging's oracle at θ₀), or with --reference the data-free task-vector cosine."""
    from flows.registry_access import open_registry
    from flows.resolve import resolve_input
    from flows.settings import get_settings
    from flows.steps import score_candidates, score_data_free
    from flows.suites import suite_for

    settings = get_settings()
    registry = open_registry(settings)
    # the suite first: a bad suite file fails before any candidate is ingested
    the_suite = None if reference else suite_for(suite, split_tasks(tasks), settings.zoo_manifest, registry=registry)
    base_model = resolve_input(registry, base)
    models = [resolve_input(registry, c) for c in candidates]
    if reference:
        scores = score_data_free(registry, suite, base_model, resolve_input(registry, reference), models)
        title = f"task-vector cosine with {reference} (for {suite})"
    else:
        scores = score_candidates(registry, the_suite, base_model, models, samples, device or settings.device)
        title = f"relevance to {suite} ({the_suite.digest[:19]})"
    rows = sorted(((m, scores[m.digest]) for m in models), key=lambda r: -r[1])
    if as_json:
        print_json([{"digest": m.digest, "name": m.name, "relevance": v} for m, v in rows])
        return
    shown = table("candidate", "digest", "relevance", title=title)
    for m, v in rows:
        shown.add_row(m.name, digest_text(m.digest, wide), f"{v:+.4f}")
    stdout.print(shown)


@app.command()
@user_errors
def measure(
    model: str = typer.Argument(..., help="digest, name, NAME@ALIAS, or a checkpoint path (ingested first)"),
    suite: str = typer.Option(..., "--suite", help=SUITE_HELP),
    stat: str = typer.Option(..., "--stat", help="fisher (the diagonal Fisher) or gram (each linear layer's XᵀX)"),
    tasks: Optional[list[str]] = TASKS,
    samples: int = typer.Option(64, help="calibration samples per task"),
    device: Optional[str] = DEVICE,
    as_json: bool = JSON,
) -> None:
    """Measure a model's statistics on a suite once and register them (kind `statistics`, linked to the model and
    the suite digest): Fisher merging and RegMean then take them instead of data (`statistics: [...]`)."""
    from flows.measure import measure as run_measure
    from flows.registry_access import open_registry
    from flows.settings import get_settings

    settings = get_settings()
    info, created = run_measure(open_registry(settings), model, suite, stat, tasks=split_tasks(tasks), budget=samples,
                                device=device or settings.device, zoo_manifest=settings.zoo_manifest)
    if as_json:
        print_json({**info.as_dict(), "created": created})
    else:
        verb = "registered" if created else "already registered as"
        stdout.print(f"{verb} [bold]{info.name}[/] ({info.num_params:,} values)")
        stdout.print(info.digest, highlight=False)
