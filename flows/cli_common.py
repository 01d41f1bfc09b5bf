"""What every CLI module shares: the console and the one-line error handling."""

from __future__ import annotations

from functools import wraps
from typing import Callable

import typer
from rich.console import Console

from merging.errors import MergeyardError
from flows.progress import stderr

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
