"""The `mergeyard` app every command module registers on (see flows/cli.py for the list of modules)."""

from __future__ import annotations

from typing import Optional

import typer

from flows.cli_common import EXIT_CODES, make_app


def _print_version(value: bool) -> None:
    if value:
        from merging.version import __version__

        print(__version__)
        raise typer.Exit()


app = make_app(name="mergeyard", epilog=EXIT_CODES,
               help="Model merging with lineage: ingest, score, merge, evaluate and promote models, reproducibly.")


@app.callback()
def _defaults(version: Optional[bool] = typer.Option(None, "--version", callback=_print_version, is_eager=True,
                                                     help="print the version and exit")) -> None:
    """Defaults every command shares (cheap: `mergeyard version` must start at once)."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our own bars, or none
