"""Evaluating a registered model on a suite and recording the results (DB rows + an MLflow run)."""

from __future__ import annotations

from pathlib import Path

from evaluation.evaluator import SuiteResult, evaluate_checkpoint
from flows.merge import resolve_input
from flows.suites import bound_to, suite_for
from registry.registry import ModelInfo, Registry


def evaluate_model(registry: Registry, ref: str, suite_ref: str, *, tasks: list[str] | None = None,
                   zoo_manifest: Path | None = None, device: str = "cpu", record: bool = True,
                   progress=None) -> tuple[ModelInfo, SuiteResult]:
    """`suite_ref` is a suite name or file. The suite is read (and so checked) before the model is resolved, so
    a bad suite file ingests and records nothing."""
    suite = suite_for(suite_ref, tasks, zoo_manifest, registry=registry)
    model = resolve_input(registry, ref)
    result = evaluate_checkpoint(model.store_path, bound_to(suite, registry, model), device=device, progress=progress,
                                 label=model.name)
    if record:
        run_id = None
        if registry.mirror is not None:
            metrics = {f"{task}/{metric}": value for task, metric, value in result.rows()}
            if result.average_accuracy is not None:
                metrics["average/accuracy"] = result.average_accuracy
            run_id = registry.mirror.log_evaluation(model.mlflow_model_id, model.digest, suite.name, suite.digest, metrics)
            producing = registry.producing_run(model)
            if producing is not None and producing.mlflow_run_id:  # the merge run shows what it produced scores
                registry.mirror.log_metrics(producing.mlflow_run_id, {f"{suite.name}/{k}": v for k, v in metrics.items()})
        registry.record_evaluations(model, suite.name, suite.digest, result.rows(), run_id=run_id)
    return model, result
