"""A team's own models and tasks, end to end, on a real pretrained model: all-MiniLM-L6-v2 fine-tuned (in the
fixture) on four real labelled text tasks; ingest → score → merge (task arithmetic, TIES, FW-hard) → evaluate on
a suite file → gate → promote → reproduce to the same digest. The CLI is what a user types."""

from __future__ import annotations

import csv
import json
from statistics import mean

import pytest
import torch
import yaml

from text_fixture import MAX_LENGTH, build_text_suite


@pytest.fixture(scope="module")
def text_suite():
    return build_text_suite()


def accuracies(report: dict) -> dict[str, float]:
    return {t["task"]: t["accuracy"] for t in report["tasks"]}


def transformers_predictions(task_model_dir, test_csv) -> tuple[list[str], list[str]]:
    """(predicted labels, true labels) as transformers computes them from a directory it loads on its own (the
    exported task model: config, labels, tokenizer, weights), with nothing of mergeyard's evaluation path."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(task_model_dir).eval()
    rows = list(csv.DictReader(open(test_csv)))
    tokens = AutoTokenizer.from_pretrained(task_model_dir)([r["text"] for r in rows], padding=True, truncation=True,
                                                           max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**tokens).logits.argmax(-1).tolist()
    return [model.config.id2label[i] for i in predicted], [r["label"] for r in rows]


def test_real_minilm_fine_tunes_from_ingest_to_a_reproduced_promotion(text_suite, cli, tmp_path):
    s = text_suite
    cli("ingest", s.base, "--name", "minilm")
    for task, path in s.finetuned.items():  # as saved by AutoModelForSequenceClassification: bert.-prefixed
        ingested = json.loads(cli("ingest", path, "--name", f"ft-{task}", "--base", "minilm", "--json").stdout)
        assert ingested["created"]
    heads = [m for m in json.loads(cli("models", "list", "--json").stdout) if m["kind"] == "head"]
    assert len(heads) == 4

    # relevance to one task: its own fine-tune's task vector aligns best with the descent direction at the base
    scores = json.loads(cli("score", *(f"ft-{t}" for t in s.finetuned), "--suite", s.suite, "--tasks", "department",
                            "--base", "minilm", "--json").stdout)
    assert scores[0]["name"] == "ft-department", scores

    n = len(s.finetuned)
    merges = {
        "task_arithmetic": {"lambda": 0.4},
        "ties": {"density": 0.3, "lambda": 1.0, "aggregate": "sum", "trim_scope": "per_tensor"},
        # FW-hard on the suite file's calibration data; step 1 and atoms at N·λ (README: what to set)
        "fw_hard": {"suite": str(s.suite), "iterations": 3, "step_size": 1.0, "lambda": 0.4, "scale": 0.4 * n,
                    "budget": 16},
    }
    reports = {}
    for method, params in merges.items():
        recipe = tmp_path / f"{method}.yaml"  # the pretrained directory and the fine-tunes exactly as on disk
        recipe.write_text(yaml.safe_dump({"method": method, "base": str(s.base),
                                          "models": [str(p) for p in s.finetuned.values()], "parameters": params}))
        cli("merge", recipe, "--name", f"text-{method}")
        reports[method] = json.loads(cli("evaluate", f"text-{method}", "--suite", s.suite, "--json").stdout)
    base = json.loads(cli("evaluate", "minilm", "--suite", s.suite, "--json").stdout)
    assert len({r["suite_digest"] for r in [base, *reports.values()]}) == 1
    # merging moved the encoder towards every task: each merge beats the pretrained encoder with the same heads
    for method, report in reports.items():
        assert mean(accuracies(report).values()) > mean(accuracies(base).values()) + 0.05, (method, report, base)

    # every output loads in transformers with its tokenizer, and predicts exactly the labels mergeyard's own
    # evaluation scored: row by row, for every method
    from evaluation.evaluator import evaluate_checkpoint
    from flows.registry_access import open_registry
    from flows.suites import bound_to, suite_for
    from transformers import AutoModel, AutoTokenizer

    registry = open_registry()
    suite = suite_for(str(s.suite), ["department"], registry=registry)
    for method in merges:
        model = registry.resolve(f"text-{method}")
        assert type(AutoModel.from_pretrained(model.store_path)).__name__ == "BertModel"
        AutoTokenizer.from_pretrained(model.store_path)
        cli("export", f"text-{method}", "--head", "ft-department", "--out", tmp_path / f"export-{method}")
        predicted, labels = transformers_predictions(tmp_path / f"export-{method}",
                                                     s.root / "data" / "department-test.csv")
        hits = evaluate_checkpoint(model.store_path, bound_to(suite, registry, model)).tasks[0].hits.tolist()
        assert hits == [p == y for p, y in zip(predicted, labels)], method

    # a gate naming the suite file; promoted to production; every merge rebuilds to its digest
    best = max(reports, key=lambda m: mean(accuracies(reports[m]).values()))
    gate = tmp_path / "gate.yaml"
    gate.write_text(yaml.safe_dump({"name": "production", "required_suites": [str(s.suite)],
                                    "min_average": round(mean(accuracies(reports[best]).values()) - 0.01, 4),
                                    "min_per_task": 0.3, "lineage": {"allowed_sources": ["file"]}}))
    for method in merges:
        assert json.loads(cli("reproduce", f"text-{method}", "--json").stdout)["ok"]
    decision = json.loads(cli("promote", f"text-{best}", "--to", "production", "--gate", gate, "--json").stdout)
    assert decision["decision"] == "promoted"
    assert json.loads(cli("lineage", f"text-{best}@production", "--format", "json").stdout)["model"] == decision["model"]

    # served from MLflow: the promoted version is a pyfunc model, one label column per task's head, and
    # `mlflow models serve` answers /invocations with the same labels
    import os

    import mlflow
    import pandas as pd

    from test_serving import mlflow_serve

    cli("promote", f"text-{best}", "--to", "staging")
    texts = [r["text"] for r in csv.DictReader(open(s.root / "data" / "department-test.csv"))][:8]
    cli("export", f"text-{best}", "--head", "ft-department", "--out", tmp_path / "best-department")
    expected = transformers_predictions(tmp_path / "best-department", s.root / "data" / "department-test.csv")[0][:8]
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    served = mlflow.pyfunc.load_model(f"models:/text-{best}@staging").predict(pd.DataFrame({"text": texts}))
    assert sorted(served.columns) == sorted(f"ft-{t}" for t in s.finetuned)
    assert served["ft-department"].tolist() == expected
    answer = mlflow_serve(f"models:/text-{best}@staging", os.environ["MLFLOW_TRACKING_URI"],
                          {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]},
                           "params": {"task": "ft-department"}})
    assert [row["ft-department"] for row in answer["predictions"]] == expected
    # and it comes back in by its alias: the same bytes, the same model
    back = json.loads(cli("ingest", f"mlflow://text-{best}@staging", "--json").stdout)
    assert back["created"] is False and back["digest"] == decision["model"]
