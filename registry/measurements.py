"""What was measured about registered models: evaluations (native and imported), relevance scores,
reproductions. A part of `Registry` (a mixin over its sessions), kept apart so each file stays readable."""

from __future__ import annotations

from dataclasses import dataclass
from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.model_info import ModelInfo
from registry.schema import Evaluation, Model, RelevanceScore, Reproduction


@dataclass(frozen=True)
class SuiteEvaluation:
    """One model's scores on one suite: (task, metric, value) rows."""

    suite_name: str
    suite_digest: str
    rows: tuple[tuple[str, str, float], ...]
    imported: bool = False  # measured elsewhere (lm-evaluation-harness) and recorded as given
    provenance: dict | None = None

    def rows_for(self, model_id: int, run_id: str | None) -> list[Evaluation]:
        return [Evaluation(model_id=model_id, suite_name=self.suite_name, suite_digest=self.suite_digest, task=task,
                           metric=metric, value=float(value), run_id=run_id, imported=self.imported,
                           provenance=self.provenance) for task, metric, value in self.rows]


class Measurements:
    """Registry methods over evaluations, scores and reproductions (`Session` is the registry's)."""

    def record_evaluations(self, model: ModelInfo, suite_name: str, suite_digest: str,
                           rows: list[tuple[str, str, float]], run_id: str | None = None, *, imported: bool = False,
                           provenance: dict | None = None) -> None:
        """(task, metric, value) rows for one model and suite, in one transaction."""
        with self.Session.begin() as s:
            s.add_all(SuiteEvaluation(suite_name, suite_digest, tuple(rows), imported, provenance)
                      .rows_for(model.id, run_id))

    @staticmethod
    def _has_evaluation(s: Session, model_id: int, suite_digest: str) -> bool:
        return s.scalar(select(Evaluation.id).where(Evaluation.model_id == model_id,
                                                    Evaluation.suite_digest == suite_digest).limit(1)) is not None

    def evaluation_rows(self, model_id: int, suite_digest: str) -> list[tuple[str, str, float]]:
        """(task, metric, value) of this model's newest evaluation on exactly this suite digest; [] if none."""
        with self.Session() as s:
            rows = s.execute(select(Evaluation.task, Evaluation.metric, Evaluation.value)
                             .where(Evaluation.model_id == model_id, Evaluation.suite_digest == suite_digest)
                             .order_by(Evaluation.id)).all()
        newest = {(task, metric): value for task, metric, value in rows}
        return [(task, metric, value) for (task, metric), value in newest.items()]

    def latest_evaluations(self, model_id: int, suite_name: str, metric: str) -> dict[str, float]:
        """task → newest value of `metric` for this model on this suite."""
        with self.Session() as s:
            rows = s.execute(select(Evaluation.task, Evaluation.value)
                             .where(Evaluation.model_id == model_id, Evaluation.suite_name == suite_name,
                                    Evaluation.metric == metric).order_by(Evaluation.id)).all()
        return {task: value for task, value in rows}

    def evaluations_on(self, model_id: int, suite_digest: str, metric: str) -> dict[str, float]:
        """task → newest value of `metric` for this model on exactly this suite digest."""
        return {task: value for task, (value, _) in self.evaluation_records(model_id, metric, digest=suite_digest).items()}

    def evaluation_records(self, model_id: int, metric: str, *, digest: str | None = None,
                           suite_name: str | None = None) -> dict[str, tuple[float, Evaluation]]:
        """task → (newest value of `metric`, its row) for this model, on a suite digest or under a suite name."""
        query = select(Evaluation).where(Evaluation.model_id == model_id, Evaluation.metric == metric)
        if digest is not None:
            query = query.where(Evaluation.suite_digest == digest)
        if suite_name is not None:
            query = query.where(Evaluation.suite_name == suite_name)
        with self.Session() as s:
            rows = s.scalars(query.order_by(Evaluation.id)).all()
        return {row.task: (row.value, row) for row in rows}

    def record_scores(self, suite_name: str, suite_digest: str, method: str, scores: dict[int, float]) -> None:
        with self.Session.begin() as s:
            s.add_all([RelevanceScore(candidate_id=cid, suite_name=suite_name, suite_digest=suite_digest, method=method,
                                      value=float(v)) for cid, v in scores.items()])

    def scores(self, suite_name: str, method: str | None = None) -> dict[str, float]:
        """digest → newest relevance score of each candidate for a suite (optionally one scoring method)."""
        with self.Session() as s:
            query = (select(Model.digest, RelevanceScore.value).join(Model, Model.id == RelevanceScore.candidate_id)
                     .where(RelevanceScore.suite_name == suite_name).order_by(RelevanceScore.id))
            if method:
                query = query.where(RelevanceScore.method == method)
            return {digest: value for digest, value in s.execute(query)}

    def record_reproduction(self, model: ModelInfo, ok: bool, rebuilt_digest: str | None, details: dict) -> None:
        with self.Session.begin() as s:
            s.add(Reproduction(model_id=model.id, ok=ok, rebuilt_digest=rebuilt_digest, details=details))

    def latest_reproduction(self, model_id: int) -> Reproduction | None:
        with self.Session() as s:
            return s.scalar(select(Reproduction).where(Reproduction.model_id == model_id)
                            .order_by(Reproduction.id.desc()).limit(1))

