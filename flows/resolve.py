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
    """Each input digest → its stored copy, checked by a stat (or, where the stat differs, its bytes)."""
    def resolve(digest: str) -> Path:
        info = registry.find_digest(digest)
        if info is None:
            raise ModelNotFoundError(f"input {digest} is not in the registry")
        try:
            return registry.checked_input(info)
        except StoreDamagedError as exc:
            raise StoreDamagedError(str(exc).replace("the stored copy of ", "the stored copy of input ", 1)) from None

    return resolve


class VerifiedInputs:
    """A merge's (or a rebuild's) stored inputs: each handed out after `store_resolver`'s check and hashed in full
    on a thread of its own while the engine reads it; `check` — which the engine calls before it commits anything —
    raises StoreDamagedError naming the input whose bytes changed in place (bit rot keeps a file's size and time).
    Use as a context manager: the hashing stops with it."""

    def __init__(self, registry: Registry):
        from concurrent.futures import ThreadPoolExecutor

        self.registry, self._resolve = registry, store_resolver(registry)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mergeyard-verify")
        self._pending: dict[str, object] = {}

    def __call__(self, digest: str) -> Path:
        path = self._resolve(digest)
        if digest not in self._pending:
            self._pending[digest] = self._pool.submit(self.registry.verify_bytes, self.registry.find_digest(digest))
        return path

    def check(self) -> None:
        for future in self._pending.values():
            try:
                future.result()
            except StoreDamagedError as exc:
                raise StoreDamagedError(str(exc).replace("the stored copy of ", "the stored copy of input ", 1)) \
                    from None

    def __enter__(self) -> "VerifiedInputs":
        return self

    def __exit__(self, *exc) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True)
