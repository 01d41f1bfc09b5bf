"""Settings from the environment (`MERGEYARD_*`); everything lives under MERGEYARD_HOME.

With no configuration that is `./.mergeyard/`; nothing is written outside it
unless a setting says so.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # populate_by_name: settings travel to Prefect tasks and Dask workers as data, by their field names
    model_config = SettingsConfigDict(env_prefix="MERGEYARD_", extra="ignore", populate_by_name=True)

    home: Path = Field(Path(".mergeyard"), description="root of every file mergeyard writes")
    device: str = Field("cpu", description="default compute device for merges (cpu or cuda)")
    max_shard_bytes: int = Field(5_000_000_000, gt=0, description="largest output shard, in bytes")
    database_url: str | None = Field(None, description="lineage DB URL (default: SQLite under home)")
    mlflow_tracking_uri: str | None = Field(
        None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "MERGEYARD_MLFLOW_TRACKING_URI"),
        description="MLflow tracking + registry URI (default: SQLite under home)",
    )
    hf_cache: Path | None = Field(None, description="Hugging Face hub cache to read (default: huggingface_hub's)")

    @property
    def models_dir(self) -> Path:
        """Merged checkpoints, one directory per model."""
        return self.home / "models"

    @property
    def lineage_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'lineage.db').resolve()}"

    @property
    def mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def mlflow_artifacts_dir(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def store_dir(self) -> Path:
        """Content-addressed copies of every registered model."""
        return self.home / "store"

    @property
    def digest_cache(self) -> Path:
        """Digests of files already hashed, by file identity (merging/checkpoints/digest_cache.py)."""
        from merging.checkpoints.digest_cache import CACHE_FILE

        return self.home / CACHE_FILE

    @property
    def scratch_dir(self) -> Path:
        return self.home / "tmp"

    @property
    def zoo_dir(self) -> Path:
        """The offline benchmark zoo's base and fine-tuned checkpoints."""
        return self.home / "zoo"

    @property
    def demo_dir(self) -> Path:
        """Checkpoints and outputs of `mergeyard demo`."""
        return self.home / "demo"

    @property
    def zoo_manifest(self) -> Path:
        return self.zoo_dir / "manifest.json"

    @property
    def results_dir(self) -> Path:
        """Prefect's persisted task results (what its caches return) live with the registry they describe."""
        return self.home / "prefect-results"

    def pinned(self) -> "Settings":
        """These settings with nothing left to the process that reads them: the home absolute, the lineage
        database and MLflow spelled out, so a Prefect task or Dask worker elsewhere opens the same registry."""
        return self.model_copy(update={"home": Path(self.home).resolve(), "database_url": self.lineage_database_url,
                                       "mlflow_tracking_uri": self.mlflow_uri})


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings; what libraries cache (matplotlib's font cache, which the zoo's renderer and MAP's
    plots fill) goes under MERGEYARD_HOME too, so nothing is written outside it."""
    import os

    settings = Settings()
    os.environ.setdefault("MPLCONFIGDIR", str((Path(settings.home) / "cache" / "matplotlib").resolve()))
    return settings
