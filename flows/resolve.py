"""Models as flows take them: a source to ingest (a path or a URI) or a registered model, and the store's copy of
an input named by its digest."""

from __future__ import annotations

from pathlib import Path

from merging.checkpoints.lora import ADAPTER_ARCHITECTURE, is_peft_adapter
from merging.references import parse_ref
from registry.errors import ModelNotFoundError, StoreDamagedError, RegistryError
from registry.registry import ModelInfo, Registry


def is_source(ref: str) -> bool:
    """A recipe input that names bytes to ingest (a URI or an existing path), not a registry reference."""
    return parse_ref(ref).is_source


def local_source(ref: str) -> Path | None:
    """The path a recipe input names when it is a local checkpoint to read or ingest (a path, or a file:// URI),
    else None (a registry reference, or a source that is fetched)."""
    parsed = parse_ref(ref)
    if not parsed.is_source or parsed.scheme not in (None, "file"):
        return None
    return parsed.path or Path(ref)


def resolve_input(registry: Registry, ref: str, by_reference: bool = False, base: ModelInfo | None = None) -> ModelInfo:
    """A recipe input: a source to ingest (URI or existing path; `by_reference`: a local one is recorded where it is,
    not copied), else a registry reference. A LoRA adapter named by path is ingested on the recipe's `base`."""
    if is_source(ref):
        local = "://" not in ref or ref.startswith("file://")
        path = local_source(ref)
        adapter_base = base.digest if base is not None and path is not None and is_peft_adapter(path) else None
        return registry.ingest(ref, base=adapter_base, by_reference=by_reference and local)[0]
    try:
        return registry.resolve(ref)
    except ModelNotFoundError:
        raise RegistryError(f"recipe input {ref!r} is neither a path, a source URI nor a registered model") from None


def check_adapter_bases(base: ModelInfo | None, models: list[ModelInfo]) -> None:
    """A LoRA adapter is a task vector on the base it was trained on: a recipe on another base is refused."""
    for m in models:
        if m.architecture == ADAPTER_ARCHITECTURE and (base is None or m.base_model_id != base.id):
            raise RegistryError(f"{m.name} ({m.digest[:19]}) is a LoRA adapter of model id {m.base_model_id}, but the "
                                f"recipe's base is {base.name + ' (id ' + str(base.id) + ')' if base else 'missing'}; "
                                "merge it on the base it was trained on")


def refuse_adapter(model: ModelInfo, doing: str) -> None:
    """An adapter alone is not a model to run: its weights exist only merged onto a base."""
    if model.architecture == ADAPTER_ARCHITECTURE:
        raise RegistryError(f"{model.name} ({model.digest[:19]}) is a LoRA adapter and cannot be {doing} on its own; "
                            "merge it onto its base first (task_arithmetic, lambda 1) and use the merge")


def store_resolver(registry: Registry):
    def resolve(digest: str) -> Path:
        info = registry.find_digest(digest)
        if info is None:
            raise ModelNotFoundError(f"input {digest} is not in the registry")
        if registry.store.is_reference(digest):  # the user's own files: unchanged, or re-verified by their digest
            registry.verify_reference(info)
        elif not registry.store.looks_intact(digest):  # a stat per file: never merge from lost or changed bytes
            raise StoreDamagedError(f"the stored copy of input {info.name} ({digest[:19]}) is missing or changed "
                                    "since it was stored; ingest the original again to restore it "
                                    "(`mergeyard doctor` lists every such model)")
        return Path(info.store_path)

    return resolve
