"""`mergeyard ingest | models list | lineage | promote | audit | reproduce | db`: the registry's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from merging.errors import MergeyardError
from flows.cli_app import app
from flows.cli_common import (DEVICE, EXIT_GATE_REFUSED, EXIT_MISMATCH, EXIT_TAMPERED, JSON, MERGE_DASK_HELP, WIDE, digest_text, make_app, print_json,
                              show_progress, stdout, table, user_errors)
from flows.progress import progress_bars, stderr


@app.command()
@user_errors
def ingest(
    uri: str = typer.Argument(..., help="path, file://, hf://ORG/NAME[@REV], open_clip://ARCH[/PRETRAINED], mlflow://NAME/VERSION or NAME@ALIAS"),
    name: Optional[str] = typer.Option(None, help="registry name (default: derived from the source)"),
    base: Optional[str] = typer.Option(None, help="declared base: a registered MODEL, or a path or URI (ingested first); the checkpoint must hold its tensors (a task model around it too)"),
    by_reference: bool = typer.Option(False, "--by-reference", help="record a local checkpoint where it is, without copying it into the store; every later read checks it is unchanged"),
    as_json: bool = JSON,
) -> None:
    """Validate a checkpoint and register it by content digest (the same bytes again are a no-op)."""
    from flows.registry_access import open_registry

    model, created = open_registry().ingest(uri, name=name, base=base, by_reference=by_reference)
    if as_json:
        print_json({**model.as_dict(), "created": created})
    else:
        verb = "registered" if created else "already registered as"
        stdout.print(f"{verb} [bold]{model.name}[/] ({model.num_params:,} params, {model.dtype})")
        stdout.print(model.digest, highlight=False)


models_app = make_app(help="Registered models.")
app.add_typer(models_app, name="models")


@models_app.command("list")
@user_errors
def models_list(as_json: bool = JSON, wide: bool = WIDE) -> None:
    """List registered models."""
    from flows.registry_access import open_registry

    rows = open_registry().list_models()
    if as_json:
        print_json([m.as_dict() for m in rows])
        return
    shown = table("digest", "name", "kind", "params", "dtype", "source", "created", title="registered models")
    for m in rows:
        shown.add_row(digest_text(m.digest, wide), m.name, m.kind, f"{m.num_params:,}", m.dtype, m.source_uri,
                      m.created_at.strftime("%Y-%m-%d %H:%M"))
    stdout.print(shown)


@app.command()
@user_errors
def lineage(
    model: str = typer.Argument(..., help="digest (or unique prefix), name, or NAME@ALIAS"),
    fmt: str = typer.Option("tree", "--format", help="tree, json or mermaid"),
    as_json: bool = typer.Option(False, "--json", help="the same as --format json"),
) -> None:
    """Show a model's ancestors down to the ingested roots, with methods, coefficients and metrics."""
    from flows.registry_access import open_registry
    from registry.lineage import lineage as build_lineage

    fmt = "json" if as_json else fmt
    if fmt not in ("tree", "json", "mermaid"):
        raise MergeyardError(f"--format {fmt!r}: use tree, json or mermaid")
    registry = open_registry()
    info = registry.resolve(model)
    with registry.Session() as session:
        graph = build_lineage(session, info.id)
    for node in graph.nodes.values():  # a lost or damaged stored copy shows where it sits in the tree
        node.stored = registry.store.looks_intact(node.digest)
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
    gate: Optional[Path] = typer.Option(None, help="gate YAML (production refuses to move without one)"),
    no_gate: bool = typer.Option(False, "--no-gate", help="move a protected alias (production) with no gate: recorded in the event"),
    actor: Optional[str] = typer.Option(None, help="who promotes (default: $USER)"),
    reason: Optional[str] = typer.Option(None, help="why, for the audit log"),
    as_json: bool = JSON,
) -> None:
    """Pass MODEL through a gate and, if it passes, move NAME@ALIAS to it. Both outcomes are audit events;
    a refusal exits 3. Moving production without a gate is refused unless --no-gate says so."""
    import getpass

    from flows.gates import promote_through
    from flows.registry_access import open_registry
    from flows.settings import get_settings
    from registry.promotion import load_gate

    decision = promote_through(open_registry(), model, to, load_gate(gate) if gate else None,
                               actor or getpass.getuser(), reason, get_settings().zoo_manifest, no_gate=no_gate)
    if as_json:
        print_json(decision.as_dict())
    else:
        shown = table("rule", "observed", "threshold", "", title=f"gate for {decision.model.name}@{to}")
        for c in decision.checks:
            shown.add_row(c.rule, str(c.observed), str(c.threshold), "[green]pass[/]" if c.passed else f"[red]FAIL[/] {c.detail}")
        if decision.checks:
            stdout.print(shown)
        verdict = "[green]promoted[/]" if decision.passed else "[red]refused[/]"
        stdout.print(f"{verdict} {decision.model.digest[:19]} to {decision.model.name}@{to} (event {decision.event_id})")
    if not decision.passed:
        raise typer.Exit(EXIT_GATE_REFUSED)


@app.command()
@user_errors
def audit(
    model: Optional[str] = typer.Argument(None, help="only events about this model"),
    alias: Optional[str] = typer.Option(None, help="only events for this alias"),
    verify: bool = typer.Option(False, "--verify", help="check the hash chain (and MLflow's witness of its head); exit 5 naming the first bad event"),
    head: bool = typer.Option(False, "--head", help="print the chain's head (seq:hash), for a team to publish"),
    as_json: bool = JSON,
    wide: bool = WIDE,
) -> None:
    """The promotion history: who moved which model where, when, and the numbers the gate compared. Every event
    is hash-chained to the one before: --verify walks the chain."""
    from flows.registry_access import open_registry
    from registry.promotion import audit as read_audit, verify_audit

    if verify or head:
        report = verify_audit(open_registry())
        if as_json:
            print_json(report.as_dict())
        elif head:
            print(f"{report.head_seq}:{report.head}")
        elif report.ok:
            stdout.print(f"[green]audit log intact[/]: {report.events} events, head {report.head_seq}:{report.head}",
                         highlight=False)
        if not report.ok and verify:
            p = report.problems[0]
            stderr.print(f"[bold red]error:[/] audit log fails verification at event {p.event_id} (seq {p.seq}): "
                         f"{p.kind}: {p.detail}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_TAMPERED)
        return
    rows = read_audit(open_registry(), model, alias)
    if as_json:
        print_json([vars(r) for r in rows])
        return
    shown = table("event", "time", "alias", "decision", "model", "previous", "actor", "reason",
                  title="promotion audit log")
    for r in rows:
        shown.add_row(str(r.id), r.time[:19], f"{r.name}@{r.alias}", r.decision, digest_text(r.model, wide),
                      digest_text(r.previous, wide), r.actor, r.reason or "")
    stdout.print(shown)


@app.command()
@user_errors
def reproduce(
    model: str = typer.Argument(..., help="digest, name, or NAME@ALIAS"),
    device: Optional[str] = DEVICE,
    plan: bool = typer.Option(False, "--plan", help="show the merge plan its run executed (per tensor: shard, "
                              "inputs and bytes read, parameters) instead of rebuilding"),
    dask: Optional[str] = typer.Option(None, "--dask", help=MERGE_DASK_HELP),
    as_json: bool = JSON,
) -> None:
    """Rebuild a model from its lineage record and compare digests; exit 4 naming the differing tensors on a
    mismatch. With --dask the rebuild runs on a cluster: a model merged in one process rebuilds there, and back."""
    from flows.registry_access import open_registry
    from flows.reproduce import reproduce as run_reproduce
    from flows.settings import get_settings

    if plan:
        _show_plan(model, as_json)
        return
    with progress_bars(enabled=show_progress(as_json)) as progress:
        outcome = run_reproduce(open_registry(), model, device=device or get_settings().device, progress=progress,
                                    dask=dask)
    if as_json:
        print_json(outcome.as_dict())
    elif outcome.ok:
        restored = " (its damaged stored copy was put back from the rebuild)" if outcome.restored else ""
        stdout.print(f"[green]reproduced[/] {outcome.model.name}: {outcome.rebuilt_digest}{restored}", highlight=False)
    if not outcome.ok:
        names = ", ".join(outcome.differing[:10]) + (f" and {len(outcome.differing) - 10} more"
                                                     if len(outcome.differing) > 10 else "")
        compared = ("the stored copy against the checksums recorded at ingest" if outcome.run_id is None
                    else "the rebuild against the stored copy")
        shown = f"{compared}; differing tensors: {names}" if names else (
            "the rebuild equals the stored copy, whose digest is not the recorded one: the stored copy was "
            "replaced (`mergeyard doctor`)")
        stderr.print(f"[bold red]error:[/] rebuilt {outcome.rebuilt_digest} but recorded {outcome.model.digest}; "
                     f"{shown}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_MISMATCH)


def _show_plan(model: str, as_json: bool) -> None:
    from flows.registry_access import open_registry
    from flows.reproduce import recorded_plan

    found = recorded_plan(open_registry(), model)
    if found is None:
        raise MergeyardError(f"{model} has no recorded merge plan (an ingested model, or merged before plans were "
                             "recorded)")
    if as_json:
        print_json({"digest": found.digest, **found.model_dump(mode="json")})
        return
    stdout.print(f"plan {found.digest} of a [bold]{found.method}[/] merge (recipe {found.recipe_hash[:19]}): "
                 f"{len(found.units)} tensors into {len(found.shards)} shard(s), {len(found.inputs)} inputs"
                 + "".join(f"; {step.step} ({step.passes} passes)" for step in found.preparation)
                 + ("; solved on data first" if found.solve else ""), highlight=False)
    shown = table("tensor", "shard", "action", "reads (input: bytes)", "parameters", title="units, in order")
    for unit in found.units:
        reads = ", ".join(f"{r.input}: {r.length}" for r in unit.reads)
        shown.add_row(unit.name, found.shards[unit.shard], unit.action, reads,
                      "" if unit.params is None else ", ".join(f"{k}={v}" for k, v in unit.params.items()))
    stdout.print(shown)


db_app = make_app(help="The lineage database.")
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
@user_errors
def db_upgrade(as_json: bool = JSON) -> None:
    """Apply schema migrations (Alembic) to MERGEYARD_DATABASE_URL."""
    from flows.settings import get_settings
    from registry.db import current_revision, head_revision, make_engine, upgrade

    engine = make_engine(get_settings().lineage_database_url)
    before = current_revision(engine)
    upgrade(engine)
    if as_json:
        print_json({"revision": head_revision(engine), "was": before})
    else:
        stdout.print(f"lineage database at schema {head_revision(engine)} (was {before or 'empty'})")


@db_app.command("current")
@user_errors
def db_current(as_json: bool = JSON) -> None:
    """Print the schema revision of the lineage database."""
    from flows.settings import get_settings
    from registry.db import current_revision, make_engine

    revision = current_revision(make_engine(get_settings().lineage_database_url))
    print_json({"revision": revision}) if as_json else print(revision or "empty")
