"""Suite files and the text-classification family on tiny BERTs built in the test: a user's own tasks, data and
heads; every bad file is one line, exit 1, nothing recorded; gates check exactly the suite digest they name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tiny_suite import SENTIMENT, TOPIC, tiny_text, write_csv  # noqa: F401  (tiny_text: a fixture)

def direct_predictions(finetune: Path, encoder_state: dict, texts: list[str], tokenizer_dir: Path) -> torch.Tensor:
    """What transformers itself predicts: the fine-tune's task model with `encoder_state` loaded into its encoder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(finetune).eval()
    missing, unexpected = model.bert.load_state_dict(encoder_state, strict=False)
    assert not missing and set(unexpected) <= {"embeddings.position_ids"}
    tokens = AutoTokenizer.from_pretrained(tokenizer_dir)(texts, padding=True, truncation=True, max_length=128,
                                                          return_tensors="pt")
    with torch.no_grad():
        return model(**tokens).logits


def test_the_evaluator_scores_as_transformers_does_the_merged_encoder_plus_each_task_head(tiny_text):
    from evaluation.evaluator import evaluate_checkpoint, load_state
    from evaluation.suites import load_suite

    suite = load_suite(str(tiny_text["suite"])).for_model(tiny_text["base"])
    assert suite.tasks["sentiment"].classes == ("neg", "pos") and suite.tasks["topic"].metric == "macro_f1"
    assert len(suite.tasks["topic"].test) == 9 and len(suite.tasks["topic"].fewshot) == 5  # the split's fractions
    # a fine-tune as the user saved it: `bert.`-prefixed encoder and its own classifier; it is scored through
    # each task's head, the standard protocol of task-vector papers
    ft = tiny_text["finetuned"]["sentiment"]
    result = evaluate_checkpoint(ft, suite)
    state = {k.removeprefix("bert."): v for k, v in load_state(ft).items() if k.startswith("bert.")}
    texts = [t for t, _ in SENTIMENT]
    logits = direct_predictions(ft, state, texts, tiny_text["base"])
    labels = torch.tensor([["neg", "pos"].index(y) for _, y in SENTIMENT])
    sentiment = result.tasks[0]
    assert sentiment.accuracy == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert sentiment.loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    # the topic task is scored by the topic fine-tune's head over the sentiment fine-tune's encoder
    topic = suite.tasks["topic"]
    logits = direct_predictions(tiny_text["finetuned"]["topic"], state, list(topic.test.rows), tiny_text["base"])
    assert result.tasks[1].accuracy == pytest.approx(float((logits.argmax(-1) == topic.test.labels).float().mean()))


def test_a_suite_digest_covers_the_data_not_where_it_lies(tiny_text, tmp_path):
    import shutil

    from evaluation.suites import load_suite

    digest = load_suite(str(tiny_text["suite"])).digest
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(tmp_path, moved)
    assert load_suite(str(moved / "suite.yaml")).digest == digest
    write_csv(moved / "data" / "sentiment.csv", "review,stars", SENTIMENT[:-1] + [("it is so nice", "neg")])
    assert load_suite(str(moved / "suite.yaml")).digest != digest  # an edited CSV is a new suite
    assert load_suite(str(tiny_text["suite"]), only=("topic",)).digest != digest  # so is a subset of the tasks


def _bad_suites(t) -> dict[str, tuple[dict, str]]:
    spec = t["spec"]
    root = t["root"]
    write_csv(root / "data" / "unknown-label.csv", "review,stars", SENTIMENT + [("a sad story", "meh")])
    write_csv(root / "data" / "empty.csv", "review,stars", [])
    sentiment = spec["tasks"][0]
    return {
        "missing column": ({**spec, "tasks": [{**sentiment, "text": "body"}]},
                           "data/sentiment.csv has no column 'body'"),
        "label not in the head's classes": ({**spec, "tasks": [{**sentiment, "eval": "data/unknown-label.csv"}]},
                                            "row 7 of data/unknown-label.csv has label 'meh', not one of the head's "
                                            "classes (neg, pos)"),
        "empty task": ({**spec, "tasks": [{**sentiment, "eval": "data/empty.csv"}]}, "data/empty.csv holds no rows"),
        "two tasks with one name": ({**spec, "tasks": [sentiment, {**spec["tasks"][1], "name": "sentiment"}]},
                                    "two tasks are named 'sentiment'"),
        "unknown family": ({**spec, "family": "text-clasification"},
                           "unknown model family 'text-clasification'; known: causal-lm, image-classification, "
                           "text-classification"),
        "unknown key": ({**spec, "taks": []}, "taks (line"),
        "missing data file": ({**spec, "tasks": [{**sentiment, "eval": "data/nope.csv"}]},
                              "data/nope.csv: no such file or directory"),
        "metric the family does not measure": ({**spec, "tasks": [{**sentiment, "metric": "perplexity"}]},
                                               "metric 'perplexity' is not one a text-classification suite measures"),
    }


@pytest.mark.parametrize("case", ["missing column", "label not in the head's classes", "empty task",
                                  "two tasks with one name", "unknown family", "unknown key", "missing data file",
                                  "metric the family does not measure"])
def test_a_bad_suite_file_is_one_line_exit_1_and_records_nothing(tiny_text, cli, case):
    spec, expected = _bad_suites(tiny_text)[case]
    bad = tiny_text["root"] / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec, sort_keys=False))
    for command in (["evaluate", tiny_text["finetuned"]["sentiment"], "--suite", bad],
                    ["score", tiny_text["finetuned"]["sentiment"], "--suite", bad, "--base", tiny_text["base"]]):
        result = cli(*command, ok=False)
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    from flows.registry_access import open_registry
    from registry.schema import Evaluation, Model, RelevanceScore

    registry = open_registry()
    assert [registry.count(t) for t in (Model, Evaluation, RelevanceScore)] == [0, 0, 0]


def test_yaml_errors_name_the_line(tiny_text, cli):
    bad = tiny_text["root"] / "broken.yaml"
    bad.write_text("name: x\nfamily: text-classification\ntasks:\n  - name: a\n   eval: b.csv\n")
    result = cli("evaluate", tiny_text["base"], "--suite", bad, ok=False)
    assert result.exit_code == 1 and "broken.yaml line 5" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1  # one line


def test_task_models_merge_as_the_user_has_them_and_each_head_is_registered(tiny_text, cli, tmp_path):
    """The recipe names the pretrained directory and the sequence-classification fine-tunes as they are on disk."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(tiny_text["base"]),
                                      "models": [str(p) for p in tiny_text["finetuned"].values()],
                                      "parameters": {"lambda": 0.5}}))
    merged = json.loads(cli("merge", recipe, "--name", "tickets-ta", "--json").stdout)
    from merging.checkpoints.checkpoint import Checkpoint

    out = Checkpoint(merged["store_path"])
    base = Checkpoint(tiny_text["base"])
    assert set(out.entries) == set(base.entries)  # the encoder, under the base's names; no head
    fts = [Checkpoint(p) for p in tiny_text["finetuned"].values()]
    name = "encoder.layer.0.attention.self.query.weight"
    expected = base.read(name) + 0.5 * sum(f.read("bert." + name) - base.read(name) for f in fts)
    assert torch.allclose(out.read(name), expected, atol=1e-6)
    listed = json.loads(cli("models", "list", "--json").stdout)
    heads = [m for m in listed if m["kind"] == "head"]
    assert sorted(h["name"] for h in heads) == ["ft-sentiment-head", "ft-topic-head"]
    graph = json.loads(cli("lineage", heads[0]["digest"], "--format", "json").stdout)
    assert [e["role"] for e in graph["edges"]] == ["head"]
    assert json.loads(cli("reproduce", "tickets-ta", "--json").stdout)["ok"]
    # evaluated on the suite file: the merged encoder plus each task's head, tokenizer from the base in lineage
    report = json.loads(cli("evaluate", "tickets-ta", "--suite", tiny_text["suite"], "--json").stdout)
    assert [t["task"] for t in report["tasks"]] == ["sentiment", "topic"]
    assert report["tasks"][1]["metric"] == "macro_f1" and "macro_f1" in report["tasks"][1]["metrics"]


def test_ingest_with_base_accepts_a_task_model_and_a_missing_position_ids_buffer(tiny_text, cli, tmp_path):
    """transformers 5 no longer saves `embeddings.position_ids`; an older base holds it."""
    from safetensors.torch import load_file, save_file

    base_file = tiny_text["base"] / "model.safetensors"
    state = load_file(str(base_file))
    assert "embeddings.position_ids" not in state
    old_base = tmp_path / "old-base"
    old_base.mkdir()
    save_file({**state, "embeddings.position_ids": torch.arange(64).unsqueeze(0)}, str(old_base / "model.safetensors"))
    cli("ingest", old_base, "--name", "old-base")
    ingested = json.loads(cli("ingest", tiny_text["finetuned"]["topic"], "--base", "old-base", "--json").stdout)
    assert ingested["created"] and ingested["base_model_id"] is not None
    # a buffer both have but with other values is a clear error naming it
    other = tmp_path / "other-ft"
    other.mkdir()
    ft = load_file(str(tiny_text["finetuned"]["sentiment"] / "model.safetensors"))
    save_file({**ft, "bert.embeddings.position_ids": torch.arange(64).flip(0).unsqueeze(0)}, str(other / "model.safetensors"))
    refused = cli("ingest", other, "--base", "old-base", ok=False)
    assert refused.exit_code == 1 and "non-float tensor 'embeddings.position_ids' differs" in refused.stderr
    # a shape mismatch names both sides and the tensor, in plain words
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_file({**ft, "bert.pooler.dense.weight": torch.zeros(16, 32)}, str(wrong / "model.safetensors"))
    refused = cli("ingest", wrong, "--base", "old-base", ok=False)
    assert "tensor 'pooler.dense.weight' is [32, 32] in old-base" in refused.stderr and "[16, 32] in" in refused.stderr


def test_a_gate_naming_a_suite_file_is_not_satisfied_by_a_subset_evaluation(tiny_text, cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "average", "base": str(tiny_text["base"]),
                                      "models": [str(p) for p in tiny_text["finetuned"].values()]}))
    cli("merge", recipe, "--name", "tickets-avg")
    gate = tmp_path / "gates" / "production.yaml"
    gate.parent.mkdir()
    gate.write_text(yaml.safe_dump({"required_suites": ["../suite.yaml"], "min_average": 0.0}))  # beside the gate
    cli("evaluate", "tickets-avg", "--suite", tiny_text["suite"], "--tasks", "sentiment")
    refused = json.loads(cli("promote", "tickets-avg", "--to", "production", "--gate", gate, "--json", ok=False).stdout)
    assert refused["decision"] == "refused" and refused["checks"][0]["rule"] == "evaluated on tickets"
    cli("evaluate", "tickets-avg", "--suite", tiny_text["suite"])
    passed = json.loads(cli("promote", "tickets-avg", "--to", "production", "--gate", gate, "--json").stdout)
    assert passed["decision"] == "promoted" and passed["checks"][0]["rule"] == "tickets average accuracy"


def test_a_pipeline_and_a_map_sweep_run_on_a_suite_file(tiny_text, prefect_api, tmp_path):
    """Prefect flow parameters take the suite file's path (relative to the pipeline file), FW-Merging optimises it,
    the gate names it, MAP charts it."""
    from flows.config import load_pipeline
    from flows.map_flow import MapConfig, map_flow
    from flows.pipeline import pinned_settings, pipeline_flow
    from merging.algorithms.map import MapParams

    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "tickets-nightly", "suite": "suite.yaml", "base": "models/base",
        "candidates": ["models/ft-sentiment", "models/ft-topic"],
        "merges": [{"method": "task_arithmetic", "parameters": {"lambda": 0.5}},
                   {"method": "fw_hard", "parameters": {"iterations": 2, "step_size": 1.0, "budget": 4}}],
        "promotion": {"alias": "staging", "gate": {"required_suites": ["suite.yaml"], "min_average": 0.0}},
    }))
    report = pipeline_flow(load_pipeline(pipeline), pinned_settings())
    assert report["suite"] == str(tiny_text["suite"].resolve()) and report["tasks"] == ["sentiment", "topic"]
    assert {m["method"] for m in report["merges"]} == {"task_arithmetic", "fw_hard"}
    assert report["promotion"]["decision"] == "promoted"
    assert [c["rule"] for c in report["promotion"]["checks"]] == ["tickets average accuracy"]
    front = map_flow(MapConfig(suite=str(tiny_text["suite"]), base=str(tiny_text["base"]),
                               candidates=[str(p) for p in tiny_text["finetuned"].values()],
                               params=MapParams(population=12, generations=5)), pinned_settings())
    assert front["tasks"] == ["sentiment", "topic"] and front["real_evaluations"] == 12 and front["points"]
