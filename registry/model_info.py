"""A model row as the rest of mergeyard sees it: a plain snapshot, safe to use after its session closed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from registry.schema import Model


@dataclass(frozen=True)
class ModelInfo:
    """A snapshot of one model row (safe to use after its session closed)."""

    id: int
    digest: str
    name: str
    kind: str
    source_uri: str
    resolved_revision: str | None
    files: list[dict]
    architecture: str | None
    base_model_id: int | None
    num_params: int
    dtype: str
    size_bytes: int
    store_path: str
    mlflow_model_id: str | None
    mlflow_version: str | None
    created_at: datetime

    @classmethod
    def of(cls, row: Model, store_root: Path) -> "ModelInfo":
        """`store_path` joined to the store this registry reads (rows hold it relative, so a moved home works)."""
        values = {f: getattr(row, f) for f in cls.__dataclass_fields__}
        values["store_path"] = str(Path(store_root) / row.store_path)
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat()
        return d


@dataclass(frozen=True)
class Parent:
    """A parent of a merged model, for lineage edges."""

    model: ModelInfo
    role: str  # base | candidate | selected
    weight: float | None = None
    step: int | None = None
    details: dict | None = None
