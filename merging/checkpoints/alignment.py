"""Which tensors of one checkpoint are which tensors of another.

Users hold fine-tunes saved by a task class (`BertForSequenceClassification`
names its encoder `bert.encoder…`, and adds `classifier.*`) and a base saved
as the bare encoder (`encoder…`). Such a fine-tune *wraps* the base: every
tensor of the base appears in it under one prefix (transformers calls it the
`base_model_prefix`), and what is left over is the task's head. The engine
merges the shared part and leaves the heads alone; validation accepts the
fine-tune as compatible with its base.

Non-float tensors (position ids, step counters) are buffers, not weights:
they are never merged, they must be equal wherever both sides have them, and
one side lacking a buffer is not a mismatch (transformers 5 no longer saves
`embeddings.position_ids`, which older checkpoints hold).

The match is found from names and shapes alone, with no model code: the
prefix is the one under which every float tensor of the reference is found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol

import torch

from merging.checkpoints.checkpoint import Checkpoint
from merging.errors import IncompatibleModelsError
from merging.checkpoints.safetensors_format import DTYPE_NAMES


class EntryLike(Protocol):
    """What matching needs of a tensor: a safetensors header entry, or `TensorSpec` of an in-memory one."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def is_float(self) -> bool: ...


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]

    @property
    def is_float(self) -> bool:
        return self.dtype in ("F64", "F32", "F16", "BF16")


def state_entries(state: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """A state dict's tensors as matching sees them (names, dtypes, shapes)."""
    return {k: TensorSpec(DTYPE_NAMES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in state.items()}


@dataclass(frozen=True)
class Alignment:
    """How `model` holds `reference`: `reference` name n is `model` name prefix + n."""

    prefix: str = ""
    # the model's tensors that are not the reference's (a task model's head), by the model's names
    head: tuple[str, ...] = ()
    # non-float tensors of the reference the model does not have (taken from the reference)
    missing_buffers: tuple[str, ...] = field(default=(), compare=False)

    @property
    def wraps(self) -> bool:
        return bool(self.prefix)

    def as_dict(self) -> dict:
        return {"prefix": self.prefix, "head": list(self.head)}


def _prefixes(names: set[str]) -> list[str]:
    """'' and every first dotted component: the wrappers a task model may put around its base."""
    firsts = sorted({n.split(".", 1)[0] + "." for n in names if "." in n})
    return ["", *firsts]


def align(reference: Checkpoint, model: Checkpoint, *, reference_label: str | None = None,
          model_label: str | None = None) -> Alignment:
    """How `model` holds every float tensor of `reference`, or an error in plain words naming both and the
    first tensor that does not fit."""
    return align_entries(reference.entries, model.entries, reference_label or str(reference.path),
                         model_label or str(model.path))


def align_entries(ref: Mapping[str, EntryLike], have: Mapping[str, EntryLike], ref_label: str,
                  model_label: str) -> Alignment:
    """`align` on name → entry maps (a checkpoint's header, or `state_entries` of a module's state dict)."""
    floats = sorted(n for n, e in ref.items() if e.is_float)
    best, best_hits = "", -1
    for prefix in _prefixes(set(have)):
        hits = sum(1 for n in floats if prefix + n in have)
        if hits > best_hits:  # '' first: an exact match wins a tie
            best, best_hits = prefix, hits
    missing = [n for n in floats if best + n not in have]
    if missing:
        where = f" (nor as {best + missing[0]!r})" if best else ""
        more = f", and {len(missing) - 1} more of its tensors are missing" if len(missing) > 1 else ""
        raise IncompatibleModelsError(
            f"{model_label} does not fit {ref_label}: it has no tensor {missing[0]!r}{where}{more}; "
            "merged models must share one architecture")
    for name in sorted(ref):
        other = have.get(best + name)
        if other is None:
            continue
        mine = ref[name]
        if other.shape != mine.shape:
            raise IncompatibleModelsError(
                f"tensor {name!r} is {list(mine.shape)} in {ref_label} but {list(other.shape)} in {model_label}; "
                "merged models must share one architecture")
        if other.is_float != mine.is_float:
            raise IncompatibleModelsError(
                f"tensor {name!r} is {mine.dtype} in {ref_label} but {other.dtype} in {model_label} "
                "(a float tensor cannot merge with an integer one)")
    mapped = {best + n for n in ref}
    leftover = sorted(n for n in have if n not in mapped)
    float_leftover = [n for n in leftover if have[n].is_float]
    if float_leftover and not best:
        # Without a wrapper the extra weights are not a head but another architecture.
        more = f" (and {len(float_leftover) - 1} more)" if len(float_leftover) > 1 else ""
        raise IncompatibleModelsError(
            f"{model_label} has tensor {float_leftover[0]!r}{more} that {ref_label} lacks; "
            "merged models must share one architecture")
    # A wrapper's own buffers (e.g. `bert.embeddings.position_ids` where the base saved none) are neither
    # merged nor a head; everything else outside the reference is the task's head.
    head = tuple(n for n in leftover if have[n].is_float or not n.startswith(best))
    missing_buffers = tuple(n for n in sorted(ref) if not ref[n].is_float and best + n not in have)
    return Alignment(best, head, missing_buffers)


def aligned_view(model: Checkpoint, reference: Checkpoint, alignment: Alignment) -> Checkpoint:
    """`model` seen under `reference`'s names, holding only the tensors the two share."""
    return model.renamed({n: alignment.prefix + n for n in reference.entries if alignment.prefix + n in model.entries})


def check_buffers_equal(reference: Checkpoint, others: list[Checkpoint], labels: dict[int, str]) -> None:
    """Non-float tensors are copied from the reference, never merged: every input that has one must agree."""
    for name, entry in reference.entries.items():
        if entry.is_float:
            continue
        mine = None
        for other in others:
            if name not in other.entries:
                continue
            mine = reference.read(name) if mine is None else mine
            if not torch.equal(mine, other.read(name).to(mine.dtype)):
                raise IncompatibleModelsError(
                    f"non-float tensor {name!r} differs between {labels.get(id(reference), reference.path)} and "
                    f"{labels.get(id(other), other.path)}: buffers are not merged, so they must be equal")


def align_all(reference: Checkpoint, others: list[Checkpoint],
              labels: list[str] | None = None) -> list[tuple[Checkpoint, Alignment]]:
    """Each of `others` seen under `reference`'s names, with how it holds them; `labels` (the reference's first)
    name the inputs in messages. The reference itself, if among the others, is its own view."""
    labels = labels or [str(reference.path), *(str(o.path) for o in others)]
    out = []
    for label, other in zip(labels[1:], others):
        if other is reference:
            out.append((reference, Alignment()))
            continue
        alignment = align(reference, other, reference_label=labels[0], model_label=label)
        out.append((aligned_view(other, reference, alignment), alignment))
    return out


def aligned_inputs(reference: Checkpoint, others: list[Checkpoint], labels: list[str] | None = None) -> list[Checkpoint]:
    """`align_all`'s views alone."""
    return [view for view, _ in align_all(reference, others, labels)]
