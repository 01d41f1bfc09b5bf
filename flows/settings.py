"""Settings from the environment (`MERGEYARD_*`); everything lives under MERGEYARD_HOME.

With no configuration that is `./.mergeyard/`; nothing is written outside it
unless a setting says so.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MERGEYARD_", extra="ignore")

    home: Path = Field(Path(".mergeyard"), description="root of every file mergeyard writes")
    device: str = Field("cpu", description="default compute device for merges (cpu or cuda)")
    max_shard_bytes: int = Field(5_000_000_000, gt=0, description="largest output shard, in bytes")

    @property
    def models_dir(self) -> Path:
        """Merged checkpoints, one directory per model."""
        return self.home / "models"

    @property
    def demo_dir(self) -> Path:
        """Checkpoints and outputs of `mergeyard demo`."""
        return self.home / "demo"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
