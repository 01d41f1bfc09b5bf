"""Nothing half-written under a final name: directories are built beside their target and renamed into place.

A rename within one filesystem is atomic, so a reader sees either nothing or the complete directory; a crash
leaves only a hidden `.NAME.tmp-<owner>-*` sibling (`TEMP_MARK` and the process's owner token in its name), which
is what `mergeyard doctor` looks for: it removes one whose process is gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from merging.runtime.processes import owner_token

TEMP_MARK = ".tmp-"
OLD_MARK = ".old-"  # a replaced target on its way out


def scratch_dir(parent: Path, prefix: str) -> Path:
    """A new working directory under `parent` named with its owner, so cleanup after a crash can tell whose it is."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{owner_token()}-", dir=parent))


def temp_beside(target: Path) -> Path:
    """A new, empty hidden directory next to `target` (same filesystem, so the final rename is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}{TEMP_MARK}{owner_token()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def move_into_place(tmp: Path, target: Path, *, replace: bool = False) -> bool:
    """Rename `tmp` to `target`. An existing target is swapped out and removed when `replace`, else left alone and
    `tmp` removed: returns False then (another process put it there first)."""
    target = Path(target)
    old = None
    if target.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        old = target.parent / f".{target.name}{OLD_MARK}{owner_token()}-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        if old is not None:
            os.rename(old, target)
        if target.exists() and not replace:  # lost a race to a concurrent writer of the same target
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True


@contextmanager
def atomic_directory(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yields a temporary directory to fill; on success it becomes `target`, on any failure it is removed."""
    tmp = temp_beside(target)
    try:
        yield tmp
        move_into_place(tmp, target, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
