"""What every CLI module shares: the app, one set of conventions, and the one-line error handling.

Exit codes (documented in `mergeyard --help` and the README):

    0  ok
    1  a user error: bad file, bad recipe, unknown model, ... (one line on stderr starting `error:`)
    2  a usage error: an unknown option, a missing argument (click's)
    3  a gate refused a promotion
    4  a rebuilt model's digest differs from the recorded one
    5  the audit log fails verification (`audit --verify`)
    6  `doctor` found something it has not repaired (run it with --fix, or do what its table says)

Every command takes `--json` (machine-readable stdout); progress bars show only on a terminal and never with
`--json`; `--tasks` is repeatable and comma-separated wherever a suite's tasks can be chosen; tables fold long
names instead of cutting them, and `--wide` prints full digests.
"""

from __future__ import annotations

import errno
import json
import sys
from functools import wraps
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from evaluation.suites import built_in_names
from merging.errors import DeviceError, MergeyardError, OutputExistsError, PreferenceError
from flows.progress import stderr

stdout = Console()

EXIT_OK, EXIT_USER_ERROR, EXIT_USAGE, EXIT_GATE_REFUSED, EXIT_MISMATCH, EXIT_TAMPERED = 0, 1, 2, 3, 4, 5
EXIT_UNHEALTHY = 6
EXIT_CODES = """Exit codes: 0 ok; 1 a user error (one line on stderr); 2 a usage error; 3 a gate refused the
promotion; 4 a rebuilt model's digest differs from the recorded one; 5 the audit log fails verification;
6 `doctor` left something unrepaired."""


def make_app(**options: Any) -> typer.Typer:
    """A Typer (sub)app with mergeyard's defaults: help text is plain (no rich markup, so `[/PRETRAINED]` in a
    help string is text), no completion commands, no tracebacks for what users cause."""
    defaults = dict(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)
    return typer.Typer(**{**defaults, **options})


# what to type instead, for the errors whose messages (from layers that know no flags) a flag resolves
HINTS = {OutputExistsError: "choose another --out or pass --overwrite", DeviceError: "pass --device cpu",
         PreferenceError: "write --prefer as 'task_a=2,task_b=1'"}


def outside_home(out, settings):
    """An --out inside MERGEYARD_HOME is refused: the store, MLflow's artifacts and scratch are written only through
    mergeyard's own temporary-then-rename path (`merge --out` into a store entry replaced a registered model's bytes)."""
    from pathlib import Path

    if out is None:
        return None
    home, target = Path(settings.home).resolve(), Path(out).resolve()
    if target == home or home in target.parents:
        raise MergeyardError(f"--out {out} is inside MERGEYARD_HOME ({home}), which only mergeyard writes; "
                             "choose a directory outside it")
    return out


def user_errors(fn: Callable) -> Callable:
    """Turn MergeyardError into one line on stderr (with the flag that helps, where one does) and exit status 1."""

    def fail(text: str):
        text = " ".join(text.splitlines())  # one line, whatever a message quotes
        # escaped: a message may hold brackets (`hf://ORG/NAME[@REVISION]`, a shape `[16, 32]`)
        stderr.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER_ERROR) from None

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MergeyardError as exc:
            hint = next((h for kind, h in HINTS.items() if isinstance(exc, kind)), None)
            fail(f"{exc} ({hint})" if hint else str(exc))
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            fail(f"no space left on the device holding {exc.filename or 'a file being written'}; nothing half-written "
                 "was kept (`mergeyard doctor` lists anything a crash left): free space and run it again")
        except Exception as exc:  # noqa: BLE001  (only a database lock that outlasted every wait becomes one line)
            if "database is locked" not in str(exc) and "lock timeout" not in str(exc).lower():
                raise
            fail("a database stayed locked by another process longer than mergeyard waits (120 s): nothing was "
                 f"recorded; run it again once the other job is done ({type(exc).__name__})")
        except KeyboardInterrupt:
            stderr.print("interrupted; nothing was written")
            raise typer.Exit(130) from None

    return wrapper


# ---- the options every command spells the same way ------------------------------------------------------------

JSON = typer.Option(False, "--json", help="print the result as JSON on stdout")
WIDE = typer.Option(False, "--wide", help="print full digests")
SUITE_HELP = f"a suite file (.yaml) or a built-in suite: {built_in_names()}"
TASKS = typer.Option(None, "--tasks", help="only these tasks of the suite (repeatable, or comma-separated)")
DEVICE = typer.Option(None, "--device", help="cpu or cuda (default: MERGEYARD_DEVICE or cpu)")
DASK_HELP = "run mapped tasks on Dask: an ADDRESS (tcp://host:8786), or no value for a local cluster"
MERGE_DASK_HELP = ("run the merge plan's units on Dask: an ADDRESS (tcp://host:8786; workers must see the inputs' "
                   "files), or no value for a local cluster of 2 processes; the digest is the one process's")


def split_tasks(values: Optional[list[str]]) -> list[str] | None:
    """`--tasks a --tasks b,c` → [a, b, c]; none given → None (all of the suite's)."""
    found = [v.strip() for value in values or [] for v in value.split(",") if v.strip()]
    return found or None


def show_progress(as_json: bool) -> bool:
    """The one rule for progress bars: on a terminal, and not when stdout is JSON."""
    return sys.stderr.isatty() and not as_json


def digest_text(digest: str | None, wide: bool) -> str:
    return "" if digest is None else digest if wide else digest[:19]


def table(*columns: str, title: str | None = None) -> Table:
    """A rich table whose cells wrap onto more lines instead of being cut (a model name is never shortened)."""
    out = Table(title=title)
    for column in columns:
        out.add_column(column, overflow="fold")
    return out


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


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
