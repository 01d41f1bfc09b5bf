"""The `mergeyard` command line (typer + rich).

Errors a user can cause print as one line on stderr and exit with status 1;
nothing half-written is left behind (the engine writes via temp + rename).
"""

from __future__ import annotations

import json
import sys
from functools import wraps
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from merging.errors import MergeyardError
from merging.version import __version__
from flows.progress import progress_bars, stderr
from flows.settings import get_settings

app = typer.Typer(
    name="mergeyard",
    help="Model merging with lineage: merge safetensors checkpoints, digest them, (soon) register and promote them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stdout = Console()


def user_errors(fn: Callable) -> Callable:
    """Turn MergeyardError into one line on stderr and exit status 1."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MergeyardError as exc:
            stderr.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            stderr.print("interrupted; nothing was written")
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@user_errors
def merge(
    recipe: Path = typer.Argument(..., help="recipe YAML (method, base, models, parameters)"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (must not exist unless --overwrite)"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: MERGEYARD_DEVICE or cpu)"),
    max_shard_bytes: Optional[int] = typer.Option(None, help="largest output shard in bytes (default 5e9)"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory once the merge succeeded"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Merge checkpoints as RECIPE says; print the output's digest."""
    from merging.engine import run_merge
    from merging.recipe import load_recipe

    settings = get_settings()
    parsed = load_recipe(recipe)
    with progress_bars(enabled=sys.stderr.isatty() or not as_json) as progress:
        result = run_merge(
            parsed, out, device=device or settings.device,
            max_shard_bytes=max_shard_bytes or settings.max_shard_bytes, overwrite=overwrite, progress=progress,
        )
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        stdout.print(f"merged with [bold]{result.method}[/] into {result.out_dir} in {result.seconds:.2f} s")
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


@app.command()
@user_errors
def methods(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """List the merge methods with their parameters and papers."""
    from merging.methods import all_methods

    listing = []
    for spec in all_methods():
        params = {
            (f.alias or name): {"default": f.default, "description": f.description or ""}
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


@app.command()
@user_errors
def demo(as_json: bool = typer.Option(False, "--json", help="print the results as JSON")) -> None:
    """Make a base and four fine-tuned checkpoints under MERGEYARD_HOME/demo and merge them with every method."""
    from flows.demo import run_demo

    home = get_settings().home
    with progress_bars(enabled=not as_json) as progress:
        rows = run_demo(home, progress=progress)
    if as_json:
        print(json.dumps([{**r.result.as_dict(), "distance_to_base": r.distance_to_base} for r in rows], indent=2))
        return
    table = Table("method", "seconds", "‖θ − θ_base‖", "digest", title=f"mergeyard demo ({home / 'demo'})")
    for r in rows:
        table.add_row(r.method, f"{r.result.seconds:.2f}", f"{r.distance_to_base:.4f}", r.result.digest[:23] + "…")
    stdout.print(table)
    stdout.print(f"outputs, each with a model card: {home / 'demo' / 'merged'}")
    stdout.print("next: write a recipe (see README.md) and run `mergeyard merge RECIPE --out DIR`")


@app.command()
def version() -> None:
    """Print the mergeyard version."""
    print(__version__)


if __name__ == "__main__":
    app()
