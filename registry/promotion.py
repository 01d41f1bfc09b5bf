"""Promotion: a gate decides, an append-only event records the decision and its numbers.

A gate is YAML:

    name: production
    metric: accuracy               # which evaluation metric the thresholds apply to
    required_suites: [ta8-mini]    # each must have been evaluated on this model
    min_average: 0.60              # per required suite, mean over its tasks
    min_per_task: 0.30             # or {task: threshold, ...}
    max_regression: 0.01           # vs the alias's current holder, per suite average
    lineage:
      allowed_sources: [file, hf, open_clip, mlflow]   # every root ancestor's source scheme
      require_reproduced: true     # the latest `mergeyard reproduce` of a merged model succeeded

Both outcomes are events; a passed gate also moves the MLflow alias.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select

from registry.errors import RegistryError
from registry.lineage import lineage
from registry.registry import ModelInfo, Registry
from registry.schema import Model, PromotionEvent
from registry.sources import scheme_of


class LineageRules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allowed_sources: list[str] | None = None
    require_reproduced: bool = False


class Gate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "default"
    metric: str = "accuracy"
    required_suites: list[str] = Field(default_factory=list)
    min_average: float | None = None
    min_per_task: float | dict[str, float] | None = None
    max_regression: float | None = Field(None, ge=0)
    lineage: LineageRules = Field(default_factory=LineageRules)


def load_gate(path: str | Path) -> Gate:
    try:
        return Gate.model_validate(yaml.safe_load(Path(path).read_text()) or {})
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read gate ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise RegistryError(f"{path}: invalid gate: {problems}") from None


@dataclass
class Check:
    rule: str
    passed: bool
    observed: Any
    threshold: Any
    detail: str = ""


@dataclass
class Decision:
    model: ModelInfo
    alias: str
    passed: bool
    checks: list[Check]
    previous: ModelInfo | None
    event_id: int

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model.digest, "name": self.model.name, "alias": self.alias,
                "decision": "promoted" if self.passed else "refused", "event_id": self.event_id,
                "previous": self.previous.digest if self.previous else None,
                "checks": [asdict(c) for c in self.checks]}


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def evaluate_gate(registry: Registry, model: ModelInfo, gate: Gate, previous: ModelInfo | None) -> list[Check]:
    checks: list[Check] = []
    for suite in gate.required_suites:
        scores = registry.latest_evaluations(model.id, suite, gate.metric)
        if not scores:
            checks.append(Check(f"evaluated on {suite}", False, None, "required", f"no {gate.metric} on {suite}"))
            continue
        average = _mean(scores)
        if gate.min_average is not None:
            checks.append(Check(f"{suite} average {gate.metric}", average >= gate.min_average, round(average, 6),
                                gate.min_average))
        if gate.min_per_task is not None:
            for task, value in sorted(scores.items()):
                floor = gate.min_per_task.get(task) if isinstance(gate.min_per_task, dict) else gate.min_per_task
                if floor is not None:
                    checks.append(Check(f"{suite}/{task} {gate.metric}", value >= floor, round(value, 6), floor))
        if gate.max_regression is not None and previous is not None:
            before = registry.latest_evaluations(previous.id, suite, gate.metric)
            if before:
                allowed = _mean(before) - gate.max_regression
                checks.append(Check(f"{suite} no regression vs {previous.digest[:19]}", average >= allowed,
                                    round(average, 6), round(allowed, 6), f"holder's average {_mean(before):.6f}"))
            else:
                checks.append(Check(f"{suite} no regression", False, round(average, 6), None,
                                    f"the current holder {previous.digest[:19]} has no {suite} evaluation to compare"))
    rules = gate.lineage
    if rules.allowed_sources is not None:
        with registry.Session() as s:
            graph = lineage(s, model.id)
        roots = [n for n in graph.nodes.values() if n.kind == "ingested"]
        bad = sorted({scheme_of(n.source_uri) for n in roots} - set(rules.allowed_sources))
        checks.append(Check("ancestors from allowed sources", not bad, sorted({scheme_of(n.source_uri) for n in roots}),
                            rules.allowed_sources, f"not allowed: {', '.join(bad)}" if bad else ""))
    if rules.require_reproduced and model.kind == "merged":
        latest = registry.latest_reproduction(model.id)
        checks.append(Check("reproduced bit for bit", bool(latest and latest.ok),
                            None if latest is None else latest.rebuilt_digest, model.digest,
                            "never reproduced: run `mergeyard reproduce`" if latest is None else ""))
    return checks


def promote(registry: Registry, model_ref: str, alias: str, gate: Gate, actor: str, reason: str | None = None) -> Decision:
    """Run the gate and record the event; on success move the alias (DB event + MLflow alias)."""
    model = registry.resolve(model_ref)
    with registry.Session() as s:
        holder = registry.alias_holder(s, model.name, alias)
    previous = registry.get(holder) if holder is not None else None
    checks = evaluate_gate(registry, model, gate, previous)
    passed = all(c.passed for c in checks)
    record = {"gate": gate.model_dump(), "checks": [asdict(c) for c in checks]}
    move_alias = passed and registry.mirror is not None and model.mlflow_version
    moved = False
    try:
        with registry.Session.begin() as s:
            event = PromotionEvent(model_id=model.id, model_name=model.name, alias=alias, previous_model_id=holder,
                                   decision="promoted" if passed else "refused", gate=record, actor=actor, reason=reason)
            s.add(event)
            s.flush()
            event_id = event.id
            if move_alias:  # inside the transaction: if MLflow refuses, no event claims the move
                registry.mirror.set_alias(model.name, alias, model.mlflow_version)
                moved = True
    except BaseException:
        if moved:  # the event did not commit: put the alias back where the log says it is
            if previous is not None and previous.mlflow_version:
                registry.mirror.set_alias(model.name, alias, previous.mlflow_version)
            else:
                registry.mirror.delete_alias(model.name, alias)
        raise
    return Decision(model, alias, passed, checks, previous, event_id)


@dataclass
class AuditRow:
    id: int
    time: str
    model: str
    name: str
    alias: str
    decision: str
    previous: str | None
    actor: str
    reason: str | None
    checks: list[dict] = field(default_factory=list)


def audit(registry: Registry, model_ref: str | None = None, alias: str | None = None) -> list[AuditRow]:
    with registry.Session() as s:
        query = select(PromotionEvent).order_by(PromotionEvent.id)
        if model_ref:
            model = registry.resolve(model_ref)
            query = query.where((PromotionEvent.model_id == model.id) | (PromotionEvent.previous_model_id == model.id))
        if alias:
            query = query.where(PromotionEvent.alias == alias)
        events = s.scalars(query).all()
        ids = {e.model_id for e in events} | {e.previous_model_id for e in events if e.previous_model_id}
        digests = {m.id: m.digest for m in s.scalars(select(Model).where(Model.id.in_(ids)))}
        return [AuditRow(e.id, e.created_at.isoformat(), digests[e.model_id], e.model_name, e.alias, e.decision,
                         digests.get(e.previous_model_id), e.actor, e.reason, e.gate.get("checks", [])) for e in events]
