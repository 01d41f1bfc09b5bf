"""A tiny text suite for the tests: two tiny BERT fine-tunes, their data, and a suite file beside them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tiny_models import tiny_bert_family

TASKS = {"sentiment": ["neg", "pos"], "topic": ["film", "food", "other"]}
SENTIMENT = [("the movie was very good", "pos"), ("the food was awful", "neg"), ("i love this film", "pos"),
             ("this is the worst", "neg"), ("it is so nice", "pos"), ("we hate the service", "neg")]
TOPIC = [("the movie was good", "film"), ("the food was bad", "food"), ("a happy day", "other"),
         ("i love this film", "film"), ("we hate the service", "food"), ("it is so nice", "other")] * 3


def write_csv(path: Path, header: str, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return path


@pytest.fixture
def tiny_text(tmp_path):
    """Tiny BERT base + two sequence-classification fine-tunes, their data, and a suite file beside them."""
    base, fts = tiny_bert_family(tmp_path / "models", TASKS)
    write_csv(tmp_path / "data" / "sentiment.csv", "review,stars", SENTIMENT)
    (tmp_path / "data" / "topic.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in TOPIC))
    suite = {"name": "tickets", "family": "text-classification", "tasks": [
        {"name": "sentiment", "eval": "data/sentiment.csv", "calibration": "data/sentiment.csv", "text": "review",
         "label": "stars", "head": "models/ft-sentiment"},
        {"name": "topic", "eval": "data/topic.jsonl", "split": {"eval": 0.5, "calibration": 0.3, "seed": 0},
         "head": "models/ft-topic", "metric": "macro_f1"}]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return {"root": tmp_path, "base": base, "finetuned": fts, "suite": path, "spec": suite}


