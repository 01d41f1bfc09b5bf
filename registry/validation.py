"""Checks a checkpoint passes before anything about it is recorded."""

from __future__ import annotations

import re

from merging.checkpoints.checkpoint import Checkpoint
from merging.checkpoints.alignment import Alignment, align_all, check_buffers_equal
from merging.checkpoints.digest import checkpoint_digest
from merging.checkpoints.finite import all_finite, raw_finite
from registry.errors import ValidationFailed

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_tensor_name(name: str) -> None:
    """Tensor names end up in file paths and URIs elsewhere: refuse traversal and control characters."""
    parts = re.split(r"[/\\]", name)
    if not name or len(name) > 1024 or _CONTROL.search(name) or name.startswith(("/", "\\")) or ".." in parts:
        raise ValidationFailed(f"tensor name {name!r} is not allowed (empty, too long, absolute, '..' or control characters)")


def validate_checkpoint(ckpt: Checkpoint, base: Checkpoint | None = None, *, label: str | None = None,
                        base_label: str | None = None) -> Alignment | None:
    """Readable headers (checked on open), safe names, finite values, the declared base's tensors (by name, or
    under a task model's wrapper prefix: the rest is its head). Returns how it holds the base."""
    check_names(ckpt)
    for name in ckpt.names:
        if ckpt.entries[name].is_float and not all_finite(ckpt.read(name)):
            raise _not_finite(ckpt, name)
    return check_base(ckpt, base, label=label, base_label=base_label)


def scan_checkpoint(ckpt: Checkpoint, checksums: dict[str, str], file_sha256: dict[str, str] | None = None) -> str:
    """`validate_checkpoint`'s checks of the checkpoint's own bytes and its digest (filling `checksums`), in one
    read: each block of bytes is hashed and checked for NaN/inf as it comes."""
    check_names(ckpt)

    def finite(name: str, dtype: str, block: memoryview) -> None:
        if not raw_finite(dtype, block):
            raise _not_finite(ckpt, name)

    return checkpoint_digest(ckpt, checksums, inspect=finite, file_sha256=file_sha256)


def check_names(ckpt: Checkpoint) -> None:
    if not ckpt.entries:
        raise ValidationFailed(f"{ckpt.path}: holds no tensors")
    for name in ckpt.names:
        check_tensor_name(name)


def check_base(ckpt: Checkpoint, base: Checkpoint | None, *, label: str | None = None,
               base_label: str | None = None) -> Alignment | None:
    """The declared base's tensors are there (by name, or under a wrapper prefix): how the checkpoint holds it."""
    if base is None:
        return None
    names = [base_label or str(base.path), label or str(ckpt.path)]
    ((view, alignment),) = align_all(base, [ckpt], names)
    check_buffers_equal(base, [view], {id(base): names[0], id(view): names[1]})
    return alignment


def _not_finite(ckpt: Checkpoint, name: str) -> ValidationFailed:
    return ValidationFailed(f"{ckpt.path}: tensor {name!r} holds NaN or infinity; nothing was recorded")
