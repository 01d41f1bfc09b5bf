"""Evaluating a registered model on a suite and recording the results (DB rows + an MLflow run)."""

from __future__ import annotations

from pathlib import Path

from evaluation.evaluator import SuiteResult, evaluate_checkpoint
from evaluation.imported import ImportedResults, read_lm_eval_results
from flows.resolve import refuse_adapter, resolve_input
from flows.suites import bound_to, suite_for
from registry.promotion import IMPORTED_SUITE
from registry.registry import ModelInfo, Registry


def evaluation_metrics(result: SuiteResult) -> dict[str, float]:
    """An evaluation as MLflow metrics: `TASK/METRIC` for each row, and the average accuracy where the suite has
    accuracies (a suite of perplexity tasks has none)."""
    metrics = {f"{task}/{metric}": value for task, metric, value in result.rows()}
    if result.average_accuracy is not None:
        metrics["average/accuracy"] = result.average_accuracy
    return metrics


def evaluate_model(registry: Registry, ref: str, suite_ref: str, *, tasks: list[str] | None = None,
                   zoo_manifest: Path | None = None, device: str = "cpu", record: bool = True,
                   progress=None) -> tuple[ModelInfo, SuiteResult]:
    """`suite_ref` is a suite name or file. The suite is read (and so checked) before the model is resolved, so
    a bad suite file ingests and records nothing."""
    suite = suite_for(suite_ref, tasks, zoo_manifest, registry=registry)
    model = resolve_input(registry, ref)
    refuse_adapter(model, "evaluated")
    result = evaluate_checkpoint(model.store_path, bound_to(suite, registry, model), device=device, progress=progress,
                                 label=model.name)
    if record:
        run_id = None
        if registry.mirror is not None:
            metrics = evaluation_metrics(result)
            run_id = registry.mirror.log_evaluation(model.mlflow_model_id, model.digest, suite.name, suite.digest, metrics)
            producing = registry.producing_run(model)
            if producing is not None and producing.mlflow_run_id:  # the merge run shows what it produced scores
                registry.mirror.log_metrics(producing.mlflow_run_id, {f"{suite.name}/{k}": v for k, v in metrics.items()})
        registry.record_evaluations(model, suite.name, suite.digest, result.rows(), run_id=run_id)
    return model, result


def import_results(registry: Registry, ref: str, results_file: Path) -> tuple[ModelInfo, ImportedResults]:
    """An lm-evaluation-harness results file recorded for a model, marked imported (its tasks, metrics, harness
    version and the file's sha256); gates accept it only with `allow_imported: true`."""
    results = read_lm_eval_results(results_file)  # read first: a bad file ingests and records nothing
    model = resolve_input(registry, ref)
    digest = f"{IMPORTED_SUITE}:sha256:{results.provenance['file_sha256']}"
    run_id = None
    if registry.mirror is not None:
        metrics = {f"{task}/{metric}": value for task, metric, value in results.rows}
        run_id = registry.mirror.log_evaluation(model.mlflow_model_id, model.digest, IMPORTED_SUITE, digest, metrics,
                                                extra_tags={"mergeyard.imported": results.provenance["harness"],
                                                            "mergeyard.harness_version":
                                                                str(results.provenance["harness_version"])})
    registry.record_evaluations(model, IMPORTED_SUITE, digest, results.rows, run_id=run_id, imported=True,
                                provenance=results.provenance)
    return model, results
