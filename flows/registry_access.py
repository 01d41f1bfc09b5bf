"""Opening the registry from settings: the one place flows and the CLI build it."""

from __future__ import annotations

from flows.settings import Settings, get_settings
from registry.registry import Registry, RegistryConfig


def registry_config(settings: Settings | None = None) -> RegistryConfig:
    s = settings or get_settings()
    return RegistryConfig(
        database_url=s.lineage_database_url,
        store_root=s.store_dir,
        scratch=s.scratch_dir,
        mlflow_tracking_uri=s.mlflow_uri,
        mlflow_artifact_root=s.mlflow_artifacts_dir,
        hf_cache=s.hf_cache,
        digest_cache=s.digest_cache,
    )


def open_registry(settings: Settings | None = None, *, expect_mirror: bool = True) -> Registry:
    """The registry (its interrupted runs failed on opening). `expect_mirror=False`: a lost MLflow store is not an
    error (what `doctor` opens it for)."""
    registry = Registry(registry_config(settings))
    if not expect_mirror and registry.mirror is not None:
        registry.mirror.expect_existing = None
    return registry
