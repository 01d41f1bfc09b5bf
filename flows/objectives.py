"""What data-informed methods learn from: each of their data requests (merging.objective) built from the suite it
names (a name or a suite file). The suite reads the model's config and tokenizer from the merge's base where it
names no model itself. Nothing here knows which method asked."""

from __future__ import annotations

from pathlib import Path

from evaluation.calibration import SuiteCalibration
from evaluation.evaluator import CalibrationScore
from evaluation.objectives import FewShotCrossEntropy, PredictionEntropy
from evaluation.statistics import SuiteStatistics
from flows.suites import suite_for
from merging.objective import CalibrationRequest, ObjectiveRequest, ScoreRequest, StatisticsRequest


def build_request(request, device: str = "cpu", model_dirs: list[Path] | Path | None = None, registry=None):
    """An `ObjectiveRequest` → an objective (or one per task); a `CalibrationRequest` → calibration inputs; a
    `StatisticsRequest` → what measures Fisher and Gram statistics; a `ScoreRequest` → the suite's metric on its
    calibration split (what `auto` coefficients are chosen by)."""
    tasks = list(request.tasks) if request.tasks else None
    suite = suite_for(request.suite, tasks, registry=registry).for_model(model_dirs)
    if isinstance(request, CalibrationRequest):
        return SuiteCalibration(suite, tasks, request.samples)
    if isinstance(request, StatisticsRequest):
        return SuiteStatistics(suite, tasks, request.budget, device)
    if isinstance(request, ScoreRequest):
        return CalibrationScore(suite, request.budget, device)
    if not isinstance(request, ObjectiveRequest):
        raise TypeError(f"no builder for a {type(request).__name__}")
    kind = FewShotCrossEntropy if request.loss == "cross_entropy" else PredictionEntropy
    if request.per_task:
        return {t: kind(suite, tasks=[t], samples_per_task=request.budget, device=device,
                        minibatch=request.minibatch) for t in suite.tasks}
    return kind(suite, samples_per_task=request.budget, device=device, minibatch=request.minibatch)
