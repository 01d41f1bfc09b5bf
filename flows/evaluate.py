"""Evaluating a registered model on a suite and recording the results (DB rows + an MLflow run)."""

from __future__ import annotations

from pathlib import Path

from evaluation.evaluator import SuiteResult, evaluate_checkpoint
from evaluation.suites import load_suite
from flows.merge import resolve_input
from registry.registry import ModelInfo, Registry


def evaluate_model(registry: Registry, ref: str, suite_name: str, *, tasks: list[str] | None = None,
                   zoo_manifest: Path | None = None, device: str = "cpu", record: bool = True,
                   progress=None) -> tuple[ModelInfo, SuiteResult]:
    model = resolve_input(registry, ref)
    suite = load_suite(suite_name, str(zoo_manifest) if zoo_manifest else None, only=tuple(tasks) if tasks else None)
    result = evaluate_checkpoint(model.store_path, suite, device=device, progress=progress)
    if record:
        run_id = None
        if registry.mirror is not None:
            metrics = {f"{task}/{metric}": value for task, metric, value in result.rows()}
            metrics["average/accuracy"] = result.average_accuracy
            run_id = registry.mirror.log_evaluation(model.mlflow_model_id, model.digest, suite.name, suite.digest, metrics)
            producing = registry.producing_run(model)
            if producing is not None and producing.mlflow_run_id:  # the merge run shows what it produced scores
                registry.mirror.log_metrics(producing.mlflow_run_id, {f"{suite.name}/{k}": v for k, v in metrics.items()})
        registry.record_evaluations(model, suite.name, suite.digest, result.rows(), run_id=run_id)
    return model, result
