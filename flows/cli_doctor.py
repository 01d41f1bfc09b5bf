"""`mergeyard doctor [--fix]`: what crashes and lost files left behind, listed, and repaired with --fix."""

from __future__ import annotations

import typer

from flows.cli_app import app
from flows.cli_common import EXIT_UNHEALTHY, JSON, print_json, show_progress, stdout, table, user_errors
from flows.progress import progress_bars


@app.command()
@user_errors
def doctor(
    fix: bool = typer.Option(False, "--fix", help="repair what was found (default: only list it)"),
    as_json: bool = JSON,
) -> None:
    """Check the store and the MLflow mirror against the lineage database: temporary directories of dead
    processes, store entries no row names, stored copies missing or damaged (sha256 of every file), PENDING
    logged models, MLflow versions no row records or rows whose version MLflow lost, aliases MLflow shows
    elsewhere than the audit log, runs left RUNNING. Exit 6 while anything found is left unrepaired."""
    from flows.registry_access import open_registry
    from registry.doctor import Doctor

    import os
    from pathlib import Path

    from flows.settings import get_settings

    registry = open_registry(expect_mirror=False)
    # where `run`, `map` and `demo` keep an ephemeral Prefect server's state (flows.runtime.configure_prefect)
    prefect_home = None if "PREFECT_API_URL" in os.environ else Path(
        os.environ.get("PREFECT_HOME") or Path(get_settings().home) / "prefect").expanduser().resolve()
    with progress_bars(enabled=show_progress(as_json)) as progress:
        def counter(stage, total):
            done = [0]

            def step(n):
                done[0] += n
                progress(stage, done[0], total)
            return step

        findings = Doctor(registry, fix=fix, progress=counter if progress else None,
                          prefect_home=prefect_home).run()
    left = [f for f in findings if not f.fixed]
    if as_json:
        print_json({"fix": fix, "findings": [f.as_dict() for f in findings], "left": len(left)})
    elif not findings:
        stdout.print("[green]healthy[/]: nothing to repair")
    else:
        shown = table("kind", "subject", "detail", "fix" if not fix else "done")
        for f in findings:
            done = "yes" if f.fixed else (f"failed: {f.error}" if f.error else ("—" if not f.action else "no"))
            shown.add_row(f.kind, f.subject, f.detail, f.action if not fix else f"{f.action} ({done})")
        stdout.print(shown)
        if left:
            hint = "; run `mergeyard doctor --fix`" if not fix and any(f.action for f in left) else ""
            stdout.print(f"{len(left)} of {len(findings)} left{hint}", highlight=False)
    if left:
        raise typer.Exit(EXIT_UNHEALTHY)


@app.command()
@user_errors
def gc(
    apply: bool = typer.Option(False, "--apply", help="remove what was found (default: only list it)"),
    as_json: bool = JSON,
) -> None:
    """Free disk no registered model and no lineage row needs: store entries no model row names and temporary
    directories of processes that are gone. Nothing a model row (and so its lineage) uses is ever removed."""
    from flows.registry_access import open_registry
    from registry.gc import collect, freed_bytes

    findings = collect(open_registry(expect_mirror=False), apply=apply)
    frees = freed_bytes(findings, done_only=apply)
    if as_json:
        print_json({"apply": apply, "findings": [f.as_dict() for f in findings], "bytes": frees})
        return
    if findings:
        shown = table("kind", "subject", "MB", "removed" if apply else "would remove")
        for f in findings:
            shown.add_row(f.kind, f.subject, f"{f.bytes / 1e6:.1f}",
                          "yes" if f.fixed else (f"failed: {f.error}" if f.error else ("no" if apply else "yes")))
        stdout.print(shown)
    verb = "freed" if apply else "would free"
    hint = "" if apply or not findings else "; run `mergeyard gc --apply`"
    stdout.print(f"{verb} {frees / 1e6:.1f} MB ({len(findings)} item{'s' * (len(findings) != 1)}){hint}", highlight=False)
