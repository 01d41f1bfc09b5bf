"""The lineage database: SQLAlchemy 2.x models. Alembic migrations own the DDL.

A model is identified by its content digest. Merge runs produce models from
parents through weighted lineage edges, so a merge of merges is a DAG. The
promotion event log is append-only (refused in the application here and by
database triggers created in the migration).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, false
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JsonType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
IdType = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    digest: Mapped[str] = mapped_column(String(80), unique=True, nullable=False)
    name: Mapped[str] = mapped_column(String(255), nullable=False, index=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # "ingested" | "merged"
    source_uri: Mapped[str] = mapped_column(Text, nullable=False)
    resolved_revision: Mapped[str | None] = mapped_column(String(255))
    files: Mapped[list[dict[str, Any]]] = mapped_column(JsonType, nullable=False)  # [{path, sha256, bytes}]
    architecture: Mapped[str | None] = mapped_column(String(255))
    base_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    num_params: Mapped[int] = mapped_column(BigInteger, nullable=False)
    dtype: Mapped[str] = mapped_column(String(16), nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    store_path: Mapped[str] = mapped_column(Text, nullable=False)  # relative to the store root (its entry's name)
    # {tensor: "dtype:shape:crc32"} recorded at ingest, so a damaged stored copy names the tensors that changed
    tensor_checksums: Mapped[dict[str, str] | None] = mapped_column(JsonType)
    mlflow_model_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_version: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)

    base_model: Mapped[Model | None] = relationship(remote_side=[id])


class MergeRun(Base):
    __tablename__ = "merge_runs"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    method: Mapped[str] = mapped_column(String(64), nullable=False)
    recipe_json: Mapped[str] = mapped_column(Text, nullable=False)
    recipe_hash: Mapped[str] = mapped_column(String(80), nullable=False, index=True)
    seed: Mapped[int] = mapped_column(BigInteger, nullable=False)
    mergeyard_version: Mapped[str] = mapped_column(String(64), nullable=False)
    code_revision: Mapped[str | None] = mapped_column(String(64))
    environment: Mapped[dict[str, Any]] = mapped_column(JsonType, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)  # running | succeeded | failed
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    seconds: Mapped[float | None] = mapped_column(Float)
    output_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"), index=True)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    # the process doing the run, and when it last said it was alive: a `running` run whose process is gone is
    # marked failed (interrupted) by the next command that opens the registry (registry.recovery)
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # what the method decided beyond the weights (MuDSC's matchings and calibration digest, FW's losses,
    # the MAP front and preference a picked point came from)
    details: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    # the merge plan the run executed (merging.engine.plan) and its digest: `reproduce` compares a rebuild's
    plan_digest: Mapped[str | None] = mapped_column(String(80))
    plan_json: Mapped[str | None] = mapped_column(Text)


class LineageEdge(Base):
    __tablename__ = "lineage_edges"
    __table_args__ = (Index("ix_lineage_child", "child_id"), Index("ix_lineage_parent", "parent_id"))

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("models.id"), nullable=False)
    child_id: Mapped[int] = mapped_column(ForeignKey("models.id"), nullable=False)
    merge_run_id: Mapped[int | None] = mapped_column(ForeignKey("merge_runs.id"))
    role: Mapped[str] = mapped_column(String(32), nullable=False)  # base | candidate | selected
    step: Mapped[int | None] = mapped_column(Integer)  # iteration for selected-at-step-k
    weight: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict[str, Any] | None] = mapped_column(JsonType)


class Evaluation(Base):
    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_model_suite", "model_id", "suite_name"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), nullable=False)
    suite_name: Mapped[str] = mapped_column(String(128), nullable=False)
    suite_digest: Mapped[str] = mapped_column(String(80), nullable=False)
    task: Mapped[str] = mapped_column(String(128), nullable=False)
    metric: Mapped[str] = mapped_column(String(64), nullable=False)
    value: Mapped[float] = mapped_column(Float, nullable=False)
    run_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    # measured elsewhere (an lm-evaluation-harness results file) and recorded as given: gates accept such rows
    # only where they say `allow_imported: true`
    imported: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false(), nullable=False)
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JsonType)  # harness, version, file sha256, ...


class RelevanceScore(Base):
    __tablename__ = "relevance_scores"
    __table_args__ = (Index("ix_relevance_candidate_suite", "candidate_id", "suite_name"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("models.id"), nullable=False)
    suite_name: Mapped[str] = mapped_column(String(128), nullable=False)
    suite_digest: Mapped[str] = mapped_column(String(80), nullable=False)
    method: Mapped[str] = mapped_column(String(64), nullable=False)
    value: Mapped[float] = mapped_column(Float, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)


class PromotionEvent(Base):
    """Append-only: one row per promotion attempt, passed or refused, each hash-chained to the one before
    (registry.audit_chain)."""

    __tablename__ = "promotion_events"
    __table_args__ = (Index("ix_promotion_name_alias", "model_name", "alias", "id"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), nullable=False)
    model_name: Mapped[str] = mapped_column(String(255), nullable=False)  # aliases are per name: NAME@ALIAS
    alias: Mapped[str] = mapped_column(String(64), nullable=False)
    previous_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    decision: Mapped[str] = mapped_column(String(16), nullable=False)  # promoted | refused
    gate: Mapped[dict[str, Any]] = mapped_column(JsonType, nullable=False)  # rules and the numbers compared
    actor: Mapped[str] = mapped_column(String(255), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    # the chain: its place (unique, so two writers cannot both take one), the previous event's hash, its own
    seq: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    event_hash: Mapped[str | None] = mapped_column(String(64))


class Reproduction(Base):
    """Outcome of `mergeyard reproduce`: gates can require a verified rebuild."""

    __tablename__ = "reproductions"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), nullable=False, index=True)
    ok: Mapped[bool] = mapped_column(Boolean, nullable=False)
    rebuilt_digest: Mapped[str | None] = mapped_column(String(80))
    details: Mapped[dict[str, Any]] = mapped_column(JsonType, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)


class MapSample(Base):
    """One evaluated task-arithmetic merge of a MAP sweep, reused by any later sweep with the same key
    (candidate digests, base, coefficient vector, suite digest)."""

    __tablename__ = "map_samples"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(80), unique=True, nullable=False)
    base_digest: Mapped[str] = mapped_column(String(80), nullable=False)
    candidates: Mapped[list[str]] = mapped_column(JsonType, nullable=False)  # digests, in coefficient order
    coefficients: Mapped[list[float]] = mapped_column(JsonType, nullable=False)
    suite_name: Mapped[str] = mapped_column(String(128), nullable=False)
    suite_digest: Mapped[str] = mapped_column(String(80), nullable=False, index=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JsonType, nullable=False)  # {metric: {task: value}}
    seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)


class ParetoFront(Base):
    """A MAP result: the surrogates fitted per task, their held-out errors, and the front found on them."""

    __tablename__ = "map_fronts"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    suite_name: Mapped[str] = mapped_column(String(128), nullable=False)
    suite_digest: Mapped[str] = mapped_column(String(80), nullable=False)
    base_digest: Mapped[str] = mapped_column(String(80), nullable=False)
    candidates: Mapped[list[str]] = mapped_column(JsonType, nullable=False)
    tasks: Mapped[list[str]] = mapped_column(JsonType, nullable=False)
    variant: Mapped[str] = mapped_column(String(16), nullable=False)  # plain | bayesian | nested
    settings: Mapped[dict[str, Any]] = mapped_column(JsonType, nullable=False)
    surrogates: Mapped[dict[str, Any]] = mapped_column(JsonType, nullable=False)
    points: Mapped[list[dict[str, Any]]] = mapped_column(JsonType, nullable=False)
    real_evaluations: Mapped[int] = mapped_column(Integer, nullable=False)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
