"""What data-informed recipes learn from, built from the suite their parameters name (a name or a suite
file): objectives for fw_hard and fw_soft, calibration data for mudsc. The suite reads its model's config
and tokenizer from the merge's base where it names no model itself."""

from __future__ import annotations

from pathlib import Path

from evaluation.objectives import FewShotCrossEntropy, PredictionEntropy
from flows.suites import suite_for


def objective_for(params, device: str = "cpu", model_dirs: list[Path] | Path | None = None, registry=None):
    """fw_hard: one objective over the suite's tasks. fw_soft: (per-task objectives for the selections,
    the objective its coefficients learn on). mudsc: the calibration inputs and the suite's architecture."""
    from merging.fw import FWSoftParams
    from merging.methods.mudsc import MuDSCRecipeParams

    if isinstance(params, MuDSCRecipeParams):
        from evaluation.calibration import SuiteCalibration

        spec = params.calibration
        tasks = list(spec.tasks) if spec.tasks else None
        return SuiteCalibration(suite_for(spec.suite, tasks, registry=registry).for_model(model_dirs), tasks, spec.samples)
    suite = suite_for(params.suite, list(params.tasks) if params.tasks else None,
                      registry=registry).for_model(model_dirs)
    kind = FewShotCrossEntropy if params.loss == "cross_entropy" else PredictionEntropy
    if isinstance(params, FWSoftParams):
        per_task = {t: FewShotCrossEntropy(suite, tasks=[t], samples_per_task=params.budget, device=device)
                    for t in suite.tasks}
        return per_task, kind(suite, samples_per_task=params.budget, device=device)
    return kind(suite, samples_per_task=params.budget, device=device)
