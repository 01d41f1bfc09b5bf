"""`mergeyard merge | digest | methods | export | version`: merging and what comes out of it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli_app import app
from merging.errors import MergeyardError
from flows.cli_common import DEVICE, JSON, MERGE_DASK_HELP, outside_home, print_json, show_progress, stdout, table, user_errors
from flows.progress import progress_bars


@app.command()
@user_errors
def merge(
    recipe: Path = typer.Argument(..., help="recipe YAML (method, base, models, parameters)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write the merged checkpoint here (must not exist unless --overwrite)"),
    name: Optional[str] = typer.Option(None, help="registry name of the merged model (default merged-METHOD)"),
    device: Optional[str] = DEVICE,
    max_shard_bytes: Optional[int] = typer.Option(None, help="largest output shard in bytes (default 5e9)"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory once the merge succeeded"),
    by_reference: bool = typer.Option(False, "--by-reference", help="inputs named by local path are registered where they are, not copied into the store (see `ingest --by-reference`)"),
    dask: Optional[str] = typer.Option(None, "--dask", help=MERGE_DASK_HELP),
    as_json: bool = JSON,
) -> None:
    """Merge checkpoints as RECIPE says, register the result with its lineage, print its digest.

    Recipe inputs may be paths or source URIs (ingested first) or registered models (digest, name, NAME@ALIAS).
    """
    from flows.merge import merge_and_record
    from flows.registry_access import open_registry
    from flows.settings import get_settings
    from merging.recipes.recipe import load_recipe

    settings = get_settings()
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise MergeyardError(f"--max-shard-bytes {max_shard_bytes}: a shard holds a positive number of bytes")
    outside_home(out, settings)
    parsed = load_recipe(recipe)
    registry = open_registry(settings)
    with progress_bars(enabled=show_progress(as_json)) as progress:
        recorded = merge_and_record(
            parsed, registry, out=out, name=name, device=device or settings.device,
            max_shard_bytes=settings.max_shard_bytes if max_shard_bytes is None else max_shard_bytes,
            overwrite=overwrite, progress=progress,
            by_reference=by_reference, dask=dask,
        )
    result = recorded.result
    if as_json:
        print_json({**result.as_dict(), "out_dir": str(out) if out else None, "name": recorded.model.name,
                    "store_path": recorded.model.store_path, "merge_run": recorded.run_id})
    else:
        stdout.print(f"merged with [bold]{result.method}[/] in {result.seconds:.2f} s → {recorded.model.name} "
                     f"(run {recorded.run_id}){f', written to {out}' if out else ''}")
        stdout.print(result.digest, highlight=False)


@app.command()
@user_errors
def digest(
    path: Path = typer.Argument(..., help="a .safetensors file or a checkpoint directory (sharded or not)"),
    as_json: bool = JSON,
) -> None:
    """Print a checkpoint's content digest (independent of sharding and file names). Files hashed before, and
    unchanged since, are not read again (the home's digest cache, where a home exists)."""
    import os

    from merging.checkpoints.checkpoint import Checkpoint
    from merging.checkpoints.digest_cache import CACHE_FILE, DigestCache

    home = Path(os.environ.get("MERGEYARD_HOME", ".mergeyard"))  # not flows.settings: pydantic-settings is slow to import
    ckpt = Checkpoint(path)
    value = DigestCache(home / CACHE_FILE if home.is_dir() else None).digest(ckpt)
    if as_json:
        print_json({"path": str(path), "digest": value, "tensors": len(ckpt.entries), "params": ckpt.num_params,
                    "bytes": ckpt.nbytes})
    else:
        print(value)


def _plain_default(value):
    from pydantic import BaseModel

    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


@app.command()
@user_errors
def methods(as_json: bool = JSON) -> None:
    """List the merge methods with their parameters and papers."""
    from merging.methods import all_methods

    listing = []
    for spec in all_methods():
        params = {
            (f.alias or name): {"default": None if f.is_required() else
                                _plain_default(f.get_default(call_default_factory=True)),
                                "required": f.is_required(), "description": f.description or ""}
            for name, f in spec.params.model_fields.items()
        }
        listing.append({"name": spec.name, "summary": spec.summary, "paper": spec.paper,
                        "requires_base": spec.requires_base, "data_informed": spec.data_informed, "parameters": params})
    if as_json:
        print_json(listing)
        return
    shown = table("method", "parameters (default)", "paper", title="merge methods")
    for m in listing:
        params = ", ".join(f"{k} (required)" if v["required"] else f"{k}={v['default']}"
                           for k, v in m["parameters"].items())
        shown.add_row(f"[bold]{m['name']}[/]\n{m['summary']}", params, m["paper"])
    stdout.print(shown)


@app.command()
@user_errors
def export(
    model: str = typer.Argument(..., help="digest, name, or NAME@ALIAS"),
    out: Path = typer.Option(..., "--out", "-o", help="directory to write (must not exist unless --overwrite)"),
    head: Optional[str] = typer.Option(None, help="a fine-tuned task model (or its head) whose head to put on the encoder"),
    overwrite: bool = typer.Option(False, help="replace an existing directory"),
    as_json: bool = JSON,
) -> None:
    """Write a registered model as a directory transformers loads; with --head, as that fine-tune's task model
    (AutoModelForSequenceClassification) around the model's encoder."""
    from flows.export import export_model
    from flows.registry_access import open_registry
    from flows.settings import get_settings

    outside_home(out, get_settings())
    info, head_info = export_model(open_registry(), model, out, head, overwrite)
    if as_json:
        print_json({"model": info.digest, "name": info.name, "head": head_info.digest if head_info else None,
                    "out": str(out)})
    else:
        with_head = f" with the head of {head_info.name}" if head_info else ""
        stdout.print(f"wrote {info.name}{with_head} to {out}", highlight=False)


@app.command("extract-lora")
@user_errors
def extract_lora(
    model: str = typer.Argument(..., help="the fine-tuned or merged model: a path, or a digest, name or NAME@ALIAS"),
    base: str = typer.Option(..., "--base", help="the model it was made from: a path, or a registered model"),
    rank: int = typer.Option(..., "--rank", "-r", help="the adapter's rank r"),
    out: Path = typer.Option(..., "--out", "-o", help="directory to write the PEFT adapter to (must not exist unless --overwrite)"),
    overwrite: bool = typer.Option(False, help="replace an existing directory"),
    as_json: bool = JSON,
) -> None:
    """Write MODEL's difference from BASE as a PEFT LoRA adapter of rank R (a truncated SVD of each linear weight's
    change), loadable with peft.PeftModel.from_pretrained(base, OUT); prints each weight's approximation error."""
    from contextlib import nullcontext

    from flows.export import open_model
    from flows.registry_access import open_registry
    from flows.settings import get_settings
    from merging.algorithms.extract_lora import extract_lora as extract

    settings = get_settings()
    outside_home(out, settings)
    registry = open_registry(settings) if (settings.home / "lineage.db").exists() or settings.database_url else None
    if registry is not None:
        registry.refuse_managed(out)
    with progress_bars(enabled=show_progress(as_json)) as progress, \
            (registry.tracked_output(out) if registry is not None else nullcontext()):
        (model_ckpt, model_label), (base_ckpt, base_label) = open_model(model), open_model(base)
        result = extract(model_ckpt, base_ckpt, rank, out, base_name=base_label, overwrite=overwrite, progress=progress)
    if as_json:
        print_json({"out": str(out), "rank": rank, "modules": result.modules, "left_out": result.left_out,
                    "worst_relative_error": result.worst_relative_error})
        return
    stdout.print(f"wrote a rank-{rank} LoRA adapter of {model_label} over {base_label} to {out}: "
                 f"{len(result.modules)} weights, worst relative error {result.worst_relative_error:.2e}",
                 highlight=False)
    for name, diff in sorted(result.left_out.items()):
        stdout.print(f"  not in the adapter (not a linear weight): {name} differs by up to {diff:.3g}", highlight=False)


@app.command()
def version(as_json: bool = JSON) -> None:
    """Print the mergeyard version."""
    from merging.version import __version__

    print_json({"version": __version__}) if as_json else print(__version__)
