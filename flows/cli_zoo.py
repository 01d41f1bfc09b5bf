"""`mergeyard zoo pretrain | build`: the offline benchmark zoo."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli_app import app
from flows.cli_common import JSON, make_app, print_json, show_progress, stdout, table, user_errors
from flows.progress import progress_bars

zoo_app = make_app(help="The offline benchmark zoo (procedural tasks, a small CLIP, its fine-tunes).")
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("pretrain")
@user_errors
def zoo_pretrain(
    steps: int = typer.Option(4000, help="contrastive pre-training steps (batch 256)"),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, help="asset directory (default: the one committed in evaluation/zoo/assets)"),
    as_json: bool = JSON,
) -> None:
    """Pre-train the zoo CLIP deterministically and write it as the float16 asset (tens of CPU minutes)."""
    import time

    from evaluation.zoo.asset import ASSET_DIR, save_asset
    from evaluation.zoo.train import pretrain

    started = time.perf_counter()
    with progress_bars(enabled=show_progress(as_json)) as progress:
        clip = pretrain(steps, batch=256, lr=2e-3, per_class=400, noise=10.0, seed=seed, progress=progress)
    record = save_asset(clip, {"command": f"mergeyard zoo pretrain --steps {steps} --seed {seed}", "steps": steps,
                               "seed": seed, "seconds": round(time.perf_counter() - started, 1)}, out or ASSET_DIR)
    if as_json:
        print_json(record)
    else:
        stdout.print(f"wrote the zoo CLIP ({record['bytes'] / 1e6:.1f} MB): {record['digest']}")


@zoo_app.command("build")
@user_errors
def zoo_build(
    small: bool = typer.Option(False, help="4 tasks, short fine-tunes (about a minute; what the tests use)"),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, help="output directory (default MERGEYARD_HOME/zoo)"),
    as_json: bool = JSON,
) -> None:
    """Write the base image tower and one fine-tune per task, with a manifest (reused when unchanged)."""
    from evaluation.zoo.build import build_zoo
    from flows.settings import get_settings

    target = out or get_settings().zoo_dir
    with progress_bars(enabled=show_progress(as_json)) as progress:
        manifest = build_zoo(target, small=small, seed=seed, progress=progress)
    if as_json:
        print_json(manifest)
        return
    shown = table("task", "zero-shot", "fine-tuned", "digest", title=f"zoo at {target}")
    for task, entry in manifest["finetuned"].items():
        shown.add_row(task, f"{100 * manifest['zero_shot'][task]:.1f}", f"{100 * entry['accuracy']:.1f}", entry["digest"][:19])
    stdout.print(shown)
