"""MAP's records in the lineage database: the sample cache and the Pareto fronts.

A sample is one task-arithmetic merge evaluated on a suite, keyed by what
determines its result: base and candidate digests, the coefficient vector
(rounded to 1e-8 so a float's last bits do not split the cache) and the
suite digest. Any later sweep (a second run, a larger design, the bayesian
variant's extra points) reuses every sample it shares.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from registry.errors import RegistryError
from registry.schema import MapSample, ParetoFront


def sample_key(base: str, candidates: list[str], coefficients: list[float], suite_digest: str) -> str:
    payload = json.dumps([base, list(candidates), [round(float(c), 8) for c in coefficients], suite_digest])
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def cached_sample(registry, key: str) -> dict | None:
    with registry.Session() as s:
        row = s.scalar(select(MapSample).where(MapSample.key == key))
        return dict(row.metrics) if row else None


def record_sample(registry, key: str, base: str, candidates: list[str], coefficients: list[float], suite_name: str,
                  suite_digest: str, metrics: dict, seconds: float) -> None:
    """Idempotent: a sample another worker recorded first is left as it is (its bytes were the same merge)."""
    try:
        with registry.Session.begin() as s:
            s.add(MapSample(key=key, base_digest=base, candidates=list(candidates),
                            coefficients=[round(float(c), 8) for c in coefficients], suite_name=suite_name,
                            suite_digest=suite_digest, metrics=metrics, seconds=seconds))
    except IntegrityError:
        if cached_sample(registry, key) is None:
            raise


def count_samples(registry, suite_digest: str | None = None) -> int:
    from sqlalchemy import func

    with registry.Session() as s:
        q = select(func.count()).select_from(MapSample)
        if suite_digest:
            q = q.where(MapSample.suite_digest == suite_digest)
        return s.scalar(q)


@dataclass(frozen=True)
class FrontRecord:
    id: int
    suite_name: str
    suite_digest: str
    base_digest: str
    candidates: list[str]
    tasks: list[str]
    variant: str
    settings: dict[str, Any]
    surrogates: dict[str, Any]
    points: list[dict[str, Any]]
    real_evaluations: int
    mlflow_run_id: str | None
    created_at: datetime

    @classmethod
    def of(cls, row: ParetoFront) -> "FrontRecord":
        return cls(**{f: getattr(row, f) for f in cls.__dataclass_fields__})

    def as_dict(self) -> dict:
        d = dict(vars(self))
        d["created_at"] = self.created_at.isoformat()
        return d


def record_front(registry, **fields) -> FrontRecord:
    with registry.Session.begin() as s:
        row = ParetoFront(**fields)
        s.add(row)
        s.flush()
        return FrontRecord.of(row)


def set_front_mlflow_run(registry, front_id: int, run_id: str) -> None:
    with registry.Session.begin() as s:
        s.get(ParetoFront, front_id).mlflow_run_id = run_id


def get_front(registry, front_id: int) -> FrontRecord:
    with registry.Session() as s:
        row = s.get(ParetoFront, front_id)
        if row is None:
            raise RegistryError(f"no Pareto front {front_id}; `mergeyard map list` shows them")
        return FrontRecord.of(row)


def list_fronts(registry) -> list[FrontRecord]:
    with registry.Session() as s:
        return [FrontRecord.of(r) for r in s.scalars(select(ParetoFront).order_by(ParetoFront.id))]
