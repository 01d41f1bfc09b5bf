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


def transformers_accuracy(finetune, merged_dir, tokenizer_dir, test_csv) -> float:
    """The task's accuracy as transformers computes it: the fine-tune's task model, the merged encoder loaded into
    it by load_state_dict, the base's tokenizer; nothing of mergeyard's evaluation path."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(finetune).eval()
    encoder = load_file(str(merged_dir / "model.safetensors"))
    _, unexpected = model.bert.load_state_dict(encoder, strict=False)
    assert set(unexpected) <= {"embeddings.position_ids"}
    rows = list(csv.DictReader(open(test_csv)))
    tokens = AutoTokenizer.from_pretrained(tokenizer_dir)([r["text"] for r in rows], padding=True, truncation=True,
                                                          max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**tokens).logits.argmax(-1)
    labels = torch.tensor([model.config.label2id[r["label"]] for r in rows])
    return float((predicted == labels).float().mean())


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

    # mergeyard's numbers are transformers' own
    from flows.registry_access import open_registry
    from pathlib import Path

    merged = Path(open_registry().resolve("text-task_arithmetic").store_path)
    for task in ("sentiment", "chain"):
        assert accuracies(reports["task_arithmetic"])[task] == pytest.approx(
            transformers_accuracy(s.finetuned[task], merged, s.base, s.root / "data" / f"{task}-test.csv"))

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
