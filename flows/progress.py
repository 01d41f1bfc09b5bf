"""Rich progress bars for long work, driven by the engine's (stage, done, total) callbacks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

ProgressFn = Callable[[str, int, int], None]  # merging.checkpoints.inputs' (stage, done, total); not imported: it imports torch

stderr = Console(stderr=True)


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[ProgressFn | None]:
    """Yields a callback that shows one bar per stage (on stderr, so --json stdout stays clean). The bars start
    with the first update, so a command that fails before any work prints its one error line and nothing else."""
    if not enabled:
        yield None
        return
    bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=stderr, transient=False)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if not tasks:
            bars.start()
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            bars.stop()
