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


def preflight(settings, suite: str, tasks: list[str] | None, refs: list[str]) -> None:
    """What can be checked in a second before a flow run starts (a server, a sweep) only to fail on it: the suite
    (a suite file is read whole, data and heads), its tasks, and that the registered models named exist."""
    from evaluation.suites import check_tasks, is_suite_file
    from flows.resolve import is_source, resolve_input

    if is_suite_file(suite):
        from flows.registry_access import open_registry
        from flows.suites import suite_for

        suite_for(suite, tasks, registry=open_registry(settings))
    else:
        check_tasks(suite, tasks)
    names = [ref for ref in refs if not is_source(ref)]
    if names:  # each must then be a registered model
        from flows.registry_access import open_registry

        registry = open_registry(settings)
        for ref in names:
            resolve_input(registry, ref)
