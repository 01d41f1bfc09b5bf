"""Nothing half-written under a final name: directories are built beside their target and renamed into place.

A rename within one filesystem is atomic, so a reader sees either nothing or the complete directory; a crash
leaves only a hidden `.NAME.tmp-*` sibling (`TEMP_MARK` in its name), which is what cleanup looks for.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMP_MARK = ".tmp-"


def temp_beside(target: Path) -> Path:
    """A new, empty hidden directory next to `target` (same filesystem, so the final rename is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}{TEMP_MARK}{uuid.uuid4().hex[:8]}"
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
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
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
