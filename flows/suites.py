"""Suites as the flows open them: by name or file, with the registry resolving the models a suite names,
and bound to the model they score (whose directory, or its base's, holds the config and tokenizer)."""

from __future__ import annotations

from pathlib import Path

from evaluation.suite import Suite
from evaluation.suites import is_suite_file, load_suite
from registry.registry import ModelInfo, Registry


def suite_for(ref: str, tasks: list[str] | None, zoo_manifest: Path | None = None, *,
              registry: Registry | None = None) -> Suite:
    """The suite `ref` (a built-in or plugin name, or a suite file) restricted to `tasks`. A suite file's heads and
    `model:` may name registered models or sources where a registry is given."""
    resolve = None
    hf_cache = None
    if registry is not None:
        from flows.resolve import resolve_input

        def resolve(model_ref: str) -> Path:
            return Path(resolve_input(registry, model_ref).store_path)

        hf_cache = registry.config.hf_cache
    return load_suite(ref, str(zoo_manifest) if zoo_manifest else None, only=tuple(tasks) if tasks else None,
                      resolve=resolve, hf_cache=hf_cache)


def model_directories(registry: Registry, model: ModelInfo | None) -> list[Path]:
    """Where a model's config and tokenizer may be: its own store directory, then its bases' down its lineage (a
    fine-tune saved without its tokenizer has its base's)."""
    seen, out = set(), []
    while model is not None and model.id not in seen:
        seen.add(model.id)
        out.append(Path(model.store_path))
        model = registry.get(model.base_model_id) if model.base_model_id else None
    return out


def bound_to(suite: Suite, registry: Registry, model: ModelInfo | None) -> Suite:
    """The suite reading preprocessing from `model`'s directory (or its bases') where it names no model itself."""
    return suite.for_model(model_directories(registry, model))


def suite_label(ref: str) -> str:
    """How a suite reference reads in titles: a file by its path, a name as it is."""
    return str(Path(ref)) if is_suite_file(ref) else ref
