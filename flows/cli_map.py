"""`mergeyard map`: Pareto fronts of merge coefficients (MAP), and picking a point to merge for real.

    mergeyard map --suite ta8-mini --base zoo/base --candidates a,b,c [--bayesian|--nested] [--dask]
    mergeyard map pick FRONT --prefer "digits=2,letters=1"
    mergeyard map list | show FRONT
"""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from merging.errors import MergeyardError
from flows.cli_common import SUITE_HELP, DEVICE, JSON, TASKS, make_app, preflight, print_json, show_progress, split_tasks, stdout, \
    user_errors
from flows.progress import progress_bars

map_app = make_app(no_args_is_help=False,
                   help="Pareto fronts of task-arithmetic coefficients (MAP) and merging a chosen point.")


def _split(values: list[str] | None) -> list[str]:
    return split_tasks(values) or []


@map_app.callback(invoke_without_command=True)
@user_errors
def map_sweep(
    ctx: typer.Context,
    suite: Optional[str] = typer.Option(None, "--suite", help=SUITE_HELP),
    base: Optional[str] = typer.Option(None, "--base", help="the base the candidates were fine-tuned from"),
    candidates: Optional[list[str]] = typer.Option(None, "--candidates", help="candidate models (repeat, or a,b,c)"),
    tasks: Optional[list[str]] = TASKS,
    bayesian: bool = typer.Option(False, "--bayesian", help="adaptive sampling where the front is uncertain"),
    nested: bool = typer.Option(False, "--nested", help="pairwise tree of 2-coefficient searches (many tasks)"),
    samples: Optional[int] = typer.Option(None, help="real evaluations (default (n+1)(n+2); nested: per node)"),
    low: float = typer.Option(0.0, help="smallest coefficient"),
    high: float = typer.Option(1.0, help="largest coefficient"),
    seed: int = typer.Option(0),
    prefer: Optional[str] = typer.Option(None, help="nested: preference inner nodes choose by ('a=2,b=1')"),
    dask: Optional[str] = typer.Option(None, "--dask", help="run the samples on Dask (an address, or none: local)"),
    device: Optional[str] = DEVICE,
    as_json: bool = JSON,
) -> None:
    """Sample coefficient vectors, fit a quadratic surrogate per task, search them for the Pareto front, store it."""
    if ctx.invoked_subcommand is not None:
        return
    if not (suite and base and candidates):
        raise MergeyardError("mergeyard map needs --suite, --base and --candidates (or a subcommand: pick, list, show)")
    if bayesian and nested:
        raise MergeyardError("choose one of --bayesian and --nested")
    from merging.algorithms.map import MapParams, parse_preference

    from flows.settings import get_settings

    settings = get_settings()
    preflight(settings, suite, _split(tasks), [base, *_split(candidates)])
    from flows.runtime import configure_prefect, with_runner

    configure_prefect(settings)
    from flows.map_flow import MapConfig, map_flow

    config = MapConfig(suite=suite, base=base, candidates=_split(candidates), tasks=_split(tasks) or None,
                       variant="bayesian" if bayesian else "nested" if nested else "plain",
                       params=MapParams(samples=samples, low=low, high=high, seed=seed),
                       preference=parse_preference(prefer) if prefer else None)
    report = with_runner(map_flow, dask)(config, settings.pinned().model_copy(update={"device": device or settings.device}))
    if as_json:
        print_json(report)
        return
    _print_front(report["front"], report["tasks"], report["points"], report["surrogates"])
    stdout.print(f"{report['real_evaluations']} real evaluations ({report['reused_samples']} from the sample cache); "
                 f"plot {report['files']['plot']}", highlight=False, soft_wrap=True)
    stdout.print(f"next: mergeyard map pick {report['front']} --prefer \"{report['tasks'][0]}=2,{report['tasks'][1]}=1\"",
                 highlight=False)


def _print_front(front_id: int, tasks: list[str], points: list[dict], surrogates: dict, limit: int = 25) -> None:
    errors = Table("task", "held-out R²", "held-out MAE (points)", "samples", title=f"surrogates of front {front_id}")
    for t in tasks:
        s = surrogates[t]
        errors.add_row(t, "" if s.get("r2") is None else f"{s['r2']:.3f}", f"{100 * s['mae']:.2f}", str(s["samples"]))
    stdout.print(errors)
    table = Table("#", *tasks, "coefficients", title=f"Pareto front {front_id}: predicted accuracy (%)")
    step = max(1, len(points) // limit)
    for i in range(0, len(points), step):
        p = points[i]
        table.add_row(str(i), *(f"{100 * p['predicted'][t]:.1f}" for t in tasks),
                      " ".join(f"{c:.2f}" for c in p["coefficients"]))
    stdout.print(table)


@map_app.command("pick")
@user_errors
def map_pick(
    front: int = typer.Argument(..., help="front id (from `mergeyard map` or `map list`)"),
    prefer: str = typer.Option(..., "--prefer", help="preference weights, e.g. 'digits=2,letters=1'"),
    name: Optional[str] = typer.Option(None, help="registry name of the merged model (default map-front-ID)"),
    device: Optional[str] = DEVICE,
    as_json: bool = JSON,
) -> None:
    """Pick the front point the preference favours, merge it for real, evaluate it: predicted versus measured."""
    from merging.algorithms.map import parse_preference
    from flows.map_steps import pick_and_merge
    from flows.registry_access import open_registry
    from flows.suites import suite_for
    from flows.settings import get_settings
    from registry.map_records import get_front

    settings = get_settings()
    registry = open_registry(settings)
    record = get_front(registry, front)
    suite = suite_for(record.settings.get("suite", record.suite_name), record.tasks, settings.zoo_dir / "manifest.json",
                      registry=registry)
    with progress_bars(enabled=show_progress(as_json)) as progress:
        picked = pick_and_merge(registry, record, parse_preference(prefer), suite, name=name, device=device or settings.device,
                                progress=progress)
    out = {"front": front, "point": picked.point, "coefficients": picked.coefficients, "predicted": picked.predicted,
           "measured": picked.measured, "model": picked.model.digest, "name": picked.model.name,
           "merge_run": picked.run_id}
    if as_json:
        print(json.dumps(out, indent=2))
        return
    table = Table("task", "predicted %", "measured %", "error (points)",
                  title=f"front {front}, point {picked.point} → {picked.model.name} {picked.model.digest[:19]}")
    for t in record.tasks:
        table.add_row(t, f"{100 * picked.predicted[t]:.1f}", f"{100 * picked.measured[t]:.1f}",
                      f"{100 * (picked.measured[t] - picked.predicted[t]):+.1f}")
    stdout.print(table)
    stdout.print("coefficients: " + ", ".join(f"{c:.3f}" for c in picked.coefficients), highlight=False)


@map_app.command("list")
@user_errors
def map_list(as_json: bool = JSON) -> None:
    """The stored Pareto fronts."""
    from flows.registry_access import open_registry
    from registry.map_records import list_fronts

    rows = list_fronts(open_registry())
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    table = Table("front", "suite", "tasks", "variant", "candidates", "evaluations", "points", "created", title="MAP fronts")
    for r in rows:
        table.add_row(str(r.id), r.suite_name, ",".join(r.tasks), r.variant, str(len(r.candidates)),
                      str(r.real_evaluations), str(len(r.points)), r.created_at.strftime("%Y-%m-%d %H:%M"))
    stdout.print(table)


@map_app.command("show")
@user_errors
def map_show(front: int = typer.Argument(..., help="front id (from `mergeyard map` or `map list`)"), as_json: bool = JSON) -> None:
    """One front: its surrogates' held-out errors and its points."""
    from flows.registry_access import open_registry
    from registry.map_records import get_front

    record = get_front(open_registry(), front)
    if as_json:
        print(json.dumps(record.as_dict(), indent=2))
        return
    _print_front(record.id, record.tasks, record.points, record.surrogates)
