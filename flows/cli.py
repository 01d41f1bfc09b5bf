"""The `mergeyard` command line (typer + rich), one module per command group:

    flows/cli_merge.py     merge, digest, methods, export, extract-lora, version
    flows/cli_registry.py  ingest, models list, lineage, promote, audit, reproduce, db
    flows/cli_doctor.py    doctor, gc
    flows/cli_evaluate.py  evaluate, score
    flows/cli_pipeline.py  demo, run, serve
    flows/cli_map.py       map (sweep, pick, list, show)
    flows/cli_zoo.py       zoo pretrain, build
    flows/cli_recipe.py    recipe convert

Conventions and exit codes live in flows/cli_common.py. Importing a command module registers its commands on
the app (flows/cli_app.py); nothing heavier than typer is imported until a command runs.
"""

from __future__ import annotations

import sys

from flows.deferred_imports import defer

# Commands that must start at once and never compute with torch or scipy (listing methods, hashing a file): for
# them those packages are imported only if something does touch them (flows/deferred_imports.py).
QUICK = {"methods", "digest", "version", "--version", "--help", "-h"}

from flows import cli_doctor, cli_evaluate, cli_merge, cli_pipeline, cli_registry, cli_zoo  # noqa: F401  (register commands)
from flows.cli_app import app
from flows.cli_map import map_app
from flows.cli_recipe import recipe_app

app.add_typer(map_app, name="map")
app.add_typer(recipe_app, name="recipe")


def main() -> None:
    """The console script: `--dask` with no value means a local Dask cluster."""
    args = sys.argv[1:]
    if not args or args[0] in QUICK:
        defer()
    for i, arg in enumerate(args):
        if arg == "--dask" and (i + 1 == len(args) or args[i + 1].startswith("-") or args[i + 1].endswith((".yaml", ".yml"))):
            args.insert(i + 1, "local")
            break
    app(args=args, prog_name="mergeyard")


if __name__ == "__main__":
    main()
