"""`mergeyard export`: a registered model as a directory transformers loads, optionally with a task's head.

A merge of sequence-classification fine-tunes is an encoder; with `--head FINETUNE` the directory is that
fine-tune's task model around the merged encoder (its config, labels and classifier), which
`AutoModelForSequenceClassification.from_pretrained` loads. Written to a temporary directory beside the target and
renamed into place whole.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from merging.runtime.atomic import atomic_directory
from merging.checkpoints.checkpoint import Checkpoint
from merging.errors import MergeyardError, OutputExistsError
from registry.registry import ModelInfo, Registry
from registry.serving import write_task_model
from registry.errors import StoreDamagedError
from registry.store import MANIFEST, ORIGIN, ModelStore


def export_model(registry: Registry, ref: str, out: Path, head: str | None = None, overwrite: bool = False) -> tuple[ModelInfo, ModelInfo | None]:
    registry.refuse_managed(out)
    model = registry.resolve(ref)
    head_info = None
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; write elsewhere or allow overwriting it")
    if head is not None:
        task_model = registry.resolve(head)
        found = registry.head_of(task_model)
        if found is None:
            raise MergeyardError(f"{task_model.name} has no registered head: ingest it with `--base BASE` (or merge it "
                                 "with its base), which registers the head of a task model")
        head_info, prefix = found
    registry.checked_input(model)
    if head_info is not None:
        registry.checked_input(head_info)
    with registry.tracked_output(out), atomic_directory(out, replace=overwrite) as tmp:
        if head_info is not None:
            registry.verify_bytes(model)  # read from the store into a new model, not copied: checked first
            registry.verify_bytes(head_info)
            write_task_model(Path(model.store_path), Path(head_info.store_path), prefix.rstrip("."), tmp)
        else:
            shutil.copytree(model.store_path, tmp, ignore=shutil.ignore_patterns(MANIFEST, ORIGIN, ModelStore.DAMAGED),
                            dirs_exist_ok=True)
            _check_copy(registry, model, tmp)  # the bytes that leave are the bytes recorded, or nothing is written
    return model, head_info


def _check_copy(registry: Registry, model: ModelInfo, copy: Path) -> None:
    """Each copied file's sha256 against the one recorded when it was stored (read back from the page cache)."""
    import hashlib

    bad = []
    for f in model.files:
        if f.get("sha256") is None:  # by reference: the user's files, verified by their digest where they changed
            continue
        h = hashlib.sha256()
        with open(copy / f["path"], "rb") as fh:
            while block := fh.read(8 << 20):
                h.update(block)
        if h.hexdigest() != f["sha256"]:
            bad.append(f["path"])
    if bad:
        registry.store.mark_damaged(model.digest, bad)
        raise StoreDamagedError(f"the stored copy of {model.name} ({model.digest[:19]}) has changed: {', '.join(bad)} "
                                "no longer match the sha256 recorded when it was stored; nothing was exported; ingest "
                                "the original again (or `mergeyard reproduce` a merged model) to restore it")


def open_model(ref: str) -> tuple[Checkpoint, str]:
    """A model to read, and how to name it: a local checkpoint by its path (nothing is registered), else a
    registered model's stored copy (checked intact, as a merge input is)."""
    from flows.registry_access import open_registry
    from flows.resolve import local_source, store_resolver

    path = local_source(ref)
    if path is not None:
        return Checkpoint(path), str(path)
    registry = open_registry()
    info = registry.resolve(ref)
    return Checkpoint(store_resolver(registry)(info.digest)), f"{info.name} ({info.digest[:19]})"
