"""Promotion: a gate decides, an append-only event records the decision and its numbers.

A gate is YAML:

    name: production
    metric: accuracy               # which evaluation metric the thresholds apply to
    required_suites:               # each must have been evaluated on this model, on exactly that suite digest
      - suites/support.yaml        # a suite file (relative to the gate file) ...
      - ta8-mini                   # ... a built-in suite (all its tasks) ...
      - {suite: ta8-mini, tasks: [digits, letters]}   # ... some of its tasks ...
      - sha256:3f1c...             # ... or a suite digest
    min_average: 0.60              # per required suite, mean over its tasks
    min_per_task: 0.30             # or {task: threshold, ...}
    max_average: 12.0              # for metrics where lower is better (perplexity); max_per_task likewise
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

import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from merging.yaml_input import read_yaml, validation_problems

from merging.runtime.crashpoints import crashpoint
from registry.audit_chain import effective_witness, ChainReport, Problem, lock_chain as _lock_chain, log_name, seal, verify
from registry.errors import RegistryError
from registry.lineage import lineage
from registry.registry import ModelInfo, Registry
from registry.schema import Model, PromotionEvent
from registry.sources import scheme_of

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class LineageRules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allowed_sources: list[str] | None = None
    require_reproduced: bool = False


class SuiteRequirement(BaseModel):
    """Some tasks of a suite: the evaluation must be on exactly this subset's digest."""

    model_config = ConfigDict(extra="forbid")

    suite: str = Field(min_length=1)
    tasks: list[str] | None = None


LOWER_IS_BETTER = {"perplexity", "loss"}
# Results imported from lm-evaluation-harness are filed under this suite name; a gate names them by it and their
# tasks (`{suite: lm-eval, tasks: [arc_easy]}`) and accepts them only with `allow_imported: true`.
IMPORTED_SUITE = "lm-eval"


class Gate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "default"
    metric: str = "accuracy"
    required_suites: list[str | SuiteRequirement] = Field(default_factory=list)
    min_average: float | None = None
    min_per_task: float | dict[str, float] | None = None
    max_average: float | None = None
    max_per_task: float | dict[str, float] | None = None
    max_regression: float | None = Field(None, ge=0)
    allow_imported: bool = Field(False, description="accept evaluations imported from lm-evaluation-harness")
    lineage: LineageRules = Field(default_factory=LineageRules)

    def requirements(self) -> list[SuiteRequirement]:
        return [r if isinstance(r, SuiteRequirement) else SuiteRequirement(suite=r) for r in self.required_suites]

    @property
    def checks_something(self) -> bool:
        """Whether the gate has a rule: a required suite with a threshold or regression bound, or a lineage rule."""
        thresholds = (self.min_average, self.min_per_task, self.max_average, self.max_per_task, self.max_regression)
        return bool(self.required_suites) or any(t is not None for t in thresholds) or \
            self.lineage.allowed_sources is not None or self.lineage.require_reproduced

    def rebased(self, root: Path) -> "Gate":
        """Relative suite-file paths taken from `root` (the gate file's or pipeline's folder)."""
        def rebase(ref: str) -> str:
            candidate = root / ref
            return str(candidate.resolve()) if ref.endswith((".yaml", ".yml")) and candidate.is_file() else ref

        suites = [r.model_copy(update={"suite": rebase(r.suite)}) for r in self.requirements()]
        return self.model_copy(update={"required_suites": suites})


def load_gate(path: str | Path) -> Gate:
    doc = read_yaml(path, RegistryError, "gate")
    try:
        return Gate.model_validate(doc.data or {}).rebased(Path(path).resolve().parent)
    except ValidationError as exc:
        raise RegistryError(f"{path}: invalid gate: {validation_problems(exc, doc)}") from None


@dataclass(frozen=True)
class RequiredSuite:
    """A gate's suite, resolved: the digest its evaluation must carry and the tasks it must cover."""

    label: str  # as the gate names it
    digest: str | None
    tasks: tuple[str, ...] | None = None  # None: named by digest, the tasks are the evaluation's
    imported: str | None = None  # the suite name imported results are filed under (lm-eval), instead of a digest

    @staticmethod
    def by_digest(requirement: SuiteRequirement) -> "RequiredSuite":
        """A requirement that needs no suite opened: a digest, or imported harness results by name."""
        if requirement.suite == IMPORTED_SUITE:
            return RequiredSuite(IMPORTED_SUITE, None, tuple(requirement.tasks) if requirement.tasks else None,
                                 imported=IMPORTED_SUITE)
        if not DIGEST.match(requirement.suite):
            raise RegistryError(f"the gate names suite {requirement.suite!r}: a suite name or file must be opened to "
                                "know its digest (the CLI and the pipeline do; from Python, pass `suites=`)")
        return RequiredSuite(requirement.suite, requirement.suite, tuple(requirement.tasks) if requirement.tasks else None)


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


def _threshold_checks(label: str, scores: dict[str, float], gate: Gate) -> list[Check]:
    checks = []
    average = _mean(scores)
    if gate.min_average is not None:
        checks.append(Check(f"{label} average {gate.metric}", average >= gate.min_average, round(average, 6),
                            gate.min_average))
    if gate.max_average is not None:
        checks.append(Check(f"{label} average {gate.metric} at most", average <= gate.max_average, round(average, 6),
                            gate.max_average))
    for bound, rule, ok in ((gate.min_per_task, "", lambda v, t: v >= t), (gate.max_per_task, " at most",
                                                                          lambda v, t: v <= t)):
        if bound is None:
            continue
        for task, value in sorted(scores.items()):
            limit = bound.get(task) if isinstance(bound, dict) else bound
            if limit is not None:
                checks.append(Check(f"{label}/{task} {gate.metric}{rule}", ok(value, limit), round(value, 6), limit))
    return checks


def _records(registry: Registry, model: ModelInfo, required: RequiredSuite, metric: str) -> dict:
    """task → (value, row) of `metric` on the required suite: by digest, or imported results by name and tasks."""
    if not required.imported:
        return registry.evaluation_records(model.id, metric, digest=required.digest)
    records = registry.evaluation_records(model.id, metric, suite_name=required.imported)
    return {t: r for t, r in records.items() if required.tasks is None or t in required.tasks}


def evaluate_gate(registry: Registry, model: ModelInfo, gate: Gate, previous: ModelInfo | None,
                  suites: list[RequiredSuite] | None = None) -> list[Check]:
    """The gate's checks. `suites` are its required suites resolved to digests (by the caller, who can open
    suite files); without them only suites named by digest can be checked."""
    checks: list[Check] = []
    if suites is None:
        suites = [RequiredSuite.by_digest(r) for r in gate.requirements()]
    lower_better = gate.metric in LOWER_IS_BETTER
    for required in suites:
        label = required.label if not DIGEST.match(required.label) else required.label[:19]
        records = _records(registry, model, required, gate.metric)
        scores = {task: value for task, (value, _) in records.items()}
        if not scores:
            where = (f"{required.imported} results" if required.imported else f"suite digest {required.digest[:19]}"
                     " (an evaluation on other tasks or other data does not count)")
            checks.append(Check(f"evaluated on {label}", False, None, required.digest[:19] if required.digest else label,
                                f"no {gate.metric} on {where}: run `mergeyard evaluate`"))
            continue
        imported = sorted({row.provenance.get("file", "?") if row.provenance else "?"
                           for _, row in records.values() if row.imported})
        if imported and not gate.allow_imported:
            checks.append(Check(f"{label} measured by mergeyard", False, f"imported from {', '.join(imported)}",
                                "allow_imported: true", "imported evaluations count only where the gate allows them"))
            continue
        # every task records its loss; the gate's metric may be one only some tasks measure (perplexity)
        covered = set(scores) if required.imported else \
            set(scores) | set(registry.evaluations_on(model.id, required.digest, "loss"))
        if required.tasks is not None and not set(required.tasks) <= covered:
            missing = sorted(set(required.tasks) - covered)
            checks.append(Check(f"evaluated on every task of {label}", False, sorted(scores), list(required.tasks),
                                f"missing {', '.join(missing)}"))
            continue
        average = _mean(scores)
        checks += _threshold_checks(label, scores, gate)
        if gate.max_regression is not None and previous is not None:
            before = {task: value for task, (value, _) in _records(registry, previous, required, gate.metric).items()}
            if before:
                allowed = _mean(before) + (gate.max_regression if lower_better else -gate.max_regression)
                ok = average <= allowed if lower_better else average >= allowed
                checks.append(Check(f"{label} no regression vs {previous.digest[:19]}", ok,
                                    round(average, 6), round(allowed, 6), f"holder's average {_mean(before):.6f}"))
            else:
                checks.append(Check(f"{label} no regression", False, round(average, 6), None,
                                    f"the current holder {previous.digest[:19]} has no evaluation on this suite digest "
                                    "to compare"))
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


PROTECTED_ALIASES = ("production",)  # moving these takes a gate, or an explicit, recorded `no_gate`


def promote(registry: Registry, model_ref: str, alias: str, gate: Gate | None, actor: str, reason: str | None = None,
            suites: list[RequiredSuite] | None = None, *, no_gate: bool = False,
            protected: tuple[str, ...] = PROTECTED_ALIASES) -> Decision:
    """Run the gate and record the event, chained into the audit log; on success move the alias (DB event +
    MLflow alias). A protected alias (production) is refused without a gate unless `no_gate` says so, which the
    event records."""
    if gate is not None and alias in protected and not gate.checks_something:
        # an empty gate file would promote with no check and be recorded as gated
        raise RegistryError(f"the gate {gate.name!r} checks nothing (no required suite, threshold or lineage rule); "
                            f"moving {alias} takes a gate that does, or an explicit --no-gate, which is recorded")
    model = registry.resolve(model_ref)
    for _ in range(PROMOTION_ATTEMPTS):  # another promotion moved the alias meanwhile: judge against its holder
        with registry.Session() as s:
            holder = registry.alias_holder(s, model.name, alias)
        previous = registry.get(holder) if holder is not None else None
        checks, suites_used, gate_used = _judge(registry, model, alias, gate, previous, suites, protected, no_gate)
        passed = all(c.passed for c in checks)
        record = {"gate": gate_used.model_dump() if gate_used else None, "no_gate": gate is None and no_gate,
                  "suites": [asdict(r) for r in suites_used], "checks": [asdict(c) for c in checks]}
        move_alias = passed and registry.mirror is not None and model.mlflow_version
        try:
            event_id = _append(registry, model, alias, holder, previous, passed, record, actor, reason, move_alias)
        except (_HolderMoved, IntegrityError):  # (IntegrityError: a writer that took the place without the lock)
            continue
        return Decision(model, alias, passed, checks, previous, event_id)
    raise RegistryError(f"{model.name}@{alias} kept moving under {PROMOTION_ATTEMPTS} other promotions; try again")


PROMOTION_ATTEMPTS = 64


class _HolderMoved(Exception):
    """The alias moved between judging the gate and appending the event: the gate is judged again."""


def _judge(registry: Registry, model: ModelInfo, alias: str, gate: Gate | None, previous: ModelInfo | None,
           suites: list[RequiredSuite] | None, protected: tuple[str, ...], no_gate: bool):
    """(checks, suites, gate) for promoting `model` over `previous`."""
    if gate is None and alias in protected and not no_gate:
        return [Check(f"a gate for {alias}", False, None, "a gate",
                      f"moving {alias} takes a gate (or an explicit no-gate promotion, which is recorded)")], [], None
    gate = gate or Gate()
    suites = suites if suites is not None else [RequiredSuite.by_digest(r) for r in gate.requirements()]
    return evaluate_gate(registry, model, gate, previous, suites), suites, gate


def _append(registry: Registry, model: ModelInfo, alias: str, holder: int | None, previous: ModelInfo | None,
            passed: bool, record: dict, actor: str, reason: str | None, move_alias: bool) -> int:
    """One event sealed into the chain, the alias and the chain's witness moved in MLflow inside the same
    transaction (if the commit fails both are put back)."""
    mirror = registry.mirror
    moved, chain = False, ""
    try:
        with registry.Session.begin() as s:
            _lock_chain(s)
            if registry.alias_holder(s, model.name, alias) != holder:
                raise _HolderMoved()
            event = PromotionEvent(model_id=model.id, model_name=model.name, alias=alias, previous_model_id=holder,
                                   decision="promoted" if passed else "refused", gate=record, actor=actor, reason=reason)
            seal(s, event)
            s.add(event)
            s.flush()
            if mirror is not None:
                chain = log_name(registry)
                mirror.set_audit_pending(chain, event.seq, event.event_hash)
            if move_alias:  # inside the transaction: if MLflow refuses, no event claims the move
                mirror.set_alias(model.name, alias, model.mlflow_version)
                moved = True
            crashpoint("promote.before-commit")
            event_id, seq, head = event.id, event.seq, event.event_hash
        crashpoint("promote.committed")
        if mirror is not None:  # the witness moves only once the event is in the log
            mirror.set_audit_head(chain, seq, head)
            mirror.clear_audit_pending(chain)
        return event_id
    except BaseException:
        if mirror is not None and chain:
            mirror.clear_audit_pending(chain)
        if moved:  # the event did not commit: put the alias back where the log says it is
            if previous is not None and previous.mlflow_version:
                mirror.set_alias(model.name, alias, previous.mlflow_version)
            else:
                mirror.delete_alias(model.name, alias)
        raise


def audit_witness(registry: Registry) -> tuple[int, str] | None:
    """MLflow's witness of the chain's head (a pending head that committed counts: `effective_witness`)."""
    if registry.mirror is None:
        return None
    with registry.Session() as s:
        return effective_witness(s, registry.mirror, log_name(registry))


def verify_audit(registry: Registry) -> ChainReport:
    """The whole chain checked, against MLflow's witness of its head where there is one, and the aliases MLflow
    shows against the ones the log gives."""
    witness = audit_witness(registry)
    with registry.Session() as s:
        report = verify(s, witness)
        if report.ok and registry.mirror is not None:
            for name, alias in s.execute(select(PromotionEvent.model_name, PromotionEvent.alias).distinct()).all():
                holder = registry.alias_holder(s, name, alias)
                model = s.get(Model, holder) if holder is not None else None
                shown = registry.mirror.alias_version(name, alias)
                if (model.mlflow_version if model else None) != shown:
                    report.problems.append(Problem(0, None, "alias", f"{name}@{alias}: the log says version "
                                                   f"{model.mlflow_version if model else None}, MLflow says {shown}"))
    return report


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
    seq: int | None = None
    event_hash: str | None = None
    no_gate: bool = False


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
        return [AuditRow(e.id, e.created_at.isoformat(), digests.get(e.model_id, "?"), e.model_name, e.alias,
                         e.decision, digests.get(e.previous_model_id), e.actor, e.reason, (e.gate or {}).get("checks", []),
                         e.seq, e.event_hash, bool((e.gate or {}).get("no_gate"))) for e in events]
