"""Merged models that load and serve: transformers loads every output with its tokenizer, a text merge exports as
a task model with a chosen head, the promoted MLflow version is a pyfunc model `mlflow models serve` serves, and
lm-evaluation-harness results come in marked imported."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from tiny_models import tiny_bert_family, tiny_llama_family

TASKS = {"sentiment": ["neg", "pos"], "topic": ["film", "food", "other"]}
TEXTS = ["the movie was very good", "the food was awful", "i love this film", "we hate the service"]


@pytest.fixture
def merged_text(tmp_path, cli):
    base, fts = tiny_bert_family(tmp_path / "models", TASKS)
    recipe = tmp_path / "ta.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(base),
                                      "models": [str(p) for p in fts.values()], "parameters": {"lambda": 0.5}}))
    merged = json.loads(cli("merge", recipe, "--name", "tickets", "--out", tmp_path / "out", "--json").stdout)
    return {"base": base, "finetuned": fts, "out": tmp_path / "out", "merged": merged}


def transformers_labels(model_dir: Path) -> list[str]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokens = AutoTokenizer.from_pretrained(model_dir)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return [model.config.id2label[i] for i in model(**tokens).logits.argmax(-1).tolist()]


def test_a_merge_loads_in_transformers_and_exports_as_a_task_model(merged_text, cli, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from merging.checkpoints.checkpoint import Checkpoint

    for directory in (merged_text["out"], Path(merged_text["merged"]["store_path"])):
        encoder = AutoModel.from_pretrained(directory)
        assert type(encoder).__name__ == "BertModel" and AutoTokenizer.from_pretrained(directory)(TEXTS[0])["input_ids"]
        merged = Checkpoint(directory)
        name = "encoder.layer.1.output.dense.weight"
        assert torch.equal(encoder.state_dict()[name], merged.read(name))  # the merged tensors, not a fresh init
    cli("export", "tickets", "--head", "ft-topic", "--out", tmp_path / "topic")
    from transformers import AutoModelForSequenceClassification

    task_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "topic")
    assert task_model.config.id2label == {0: "film", 1: "food", 2: "other"}
    assert torch.equal(task_model.bert.state_dict()[name], Checkpoint(merged_text["out"]).read(name))
    refused = cli("export", "tickets", "--head", "tickets", "--out", tmp_path / "nope", ok=False)
    assert refused.exit_code == 1 and "has no registered head" in refused.stderr and not (tmp_path / "nope").exists()


def mlflow_serve(model_uri: str, tracking_uri: str, request: dict, timeout: float = 180) -> dict:
    """`mlflow models serve` in a subprocess on a free localhost port, one POST to /invocations, stopped by its PID."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
                               "--env-manager", "local", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        body = json.dumps(request).encode()
        deadline = time.monotonic() + timeout
        while True:
            try:
                call = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                              headers={"Content-Type": "application/json"})
                return json.loads(urllib.request.urlopen(call, timeout=30).read())
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()[-2000:]
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_promoted_version_is_a_pyfunc_model(merged_text, cli, tmp_path, mlflow_store):
    import mlflow
    import pandas as pd

    cli("promote", "tickets", "--to", "staging")
    for task in ("ft-sentiment", "ft-topic"):
        cli("export", "tickets", "--head", task, "--out", tmp_path / task)
    expected = {task: transformers_labels(tmp_path / task) for task in ("ft-sentiment", "ft-topic")}
    mlflow.set_tracking_uri(mlflow_store[0])
    model = mlflow.pyfunc.load_model("models:/tickets@staging")
    predicted = model.predict(pd.DataFrame({"text": TEXTS}))
    assert {c: predicted[c].tolist() for c in predicted.columns} == expected
    assert model.predict(pd.DataFrame({"text": TEXTS}), params={"task": "ft-topic"}).columns.tolist() == ["ft-topic"]
    # bytes that changed in the store (the artifacts are hard links to it) are never served
    from flows.registry_access import open_registry

    stored = Path(open_registry().resolve("tickets").store_path) / "model.safetensors"
    st = stored.stat()
    raw = bytearray(stored.read_bytes())
    raw[-2] ^= 0x40
    stored.write_bytes(bytes(raw))
    os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(Exception, match="not the ones registered"):
        mlflow.pyfunc.load_model("models:/tickets@staging")


def test_ingest_mlflow_alias_works_against_the_default_home_with_no_environment(tmp_path):
    """`mergeyard` with nothing set: ./.mergeyard holds the registry and MLflow; the alias resolves from there."""
    base, fts = tiny_bert_family(tmp_path / "models", {"sentiment": TASKS["sentiment"]})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MERGEYARD_"))}
    work = tmp_path / "work"
    work.mkdir()

    def run(*args):
        done = subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    run("ingest", base, "--name", "minibert")
    run("promote", "minibert", "--to", "staging")
    again = json.loads(run("ingest", "mlflow://minibert@staging", "--json"))
    assert again["created"] is False and again["name"] == "minibert"  # the same bytes: the same model
    assert (work / ".mergeyard" / "mlflow.db").is_file()


def test_a_causal_lm_merge_loads_generates_and_keeps_its_embeddings_tied(tmp_path, cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, fts = tiny_llama_family(tmp_path / "models")
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "base": str(base), "models": [str(p) for p in fts],
                                      "parameters": {"density": 0.5}}))
    cli("merge", recipe, "--name", "tiny-lm", "--out", tmp_path / "lm")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, not a copy
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm")
    ids = tokenizer("the cat sat", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 4
    cli("promote", "tiny-lm", "--to", "staging")
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    served = mlflow.pyfunc.load_model("models:/tiny-lm@staging")
    out = served.predict(pd.DataFrame({"prompt": ["the cat sat"]}), params={"max_new_tokens": 4})
    expected = tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out["generated"].tolist() == [expected]


LM_EVAL_RESULTS = {  # the layout lm-evaluation-harness 0.4 writes (results_<date>.json), trimmed
    "results": {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.7129, "acc_stderr,none": 0.0093, "acc_norm,none": 0.6658,
                     "acc_norm_stderr,none": 0.0097},
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.3412, "exact_match_stderr,strict-match": 0.0131,
                  "exact_match,flexible-extract": 0.3518, "exact_match_stderr,flexible-extract": "N/A"},
    },
    "group_subtasks": {"arc_easy": [], "gsm8k": []},
    "configs": {"arc_easy": {"task": "arc_easy", "dataset_path": "allenai/ai2_arc"}},
    "versions": {"arc_easy": 1.0, "gsm8k": 3.0},
    "n-shot": {"arc_easy": 0, "gsm8k": 5},
    "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True}},
    "n-samples": {"arc_easy": {"original": 2376, "effective": 2376}},
    "config": {"model": "hf", "model_args": "pretrained=/models/tickets", "batch_size": "8", "limit": None},
    "git_hash": "4e7e0d47f", "date": 1764763200.0, "lm_eval_version": "0.4.9", "transformers_version": "5.24.0",
    "model_name": "/models/tickets",
}


def test_imported_lm_eval_results_satisfy_a_gate_only_where_it_allows_imported(merged_text, cli, tmp_path):
    results = tmp_path / "results_2026-12-03T12-00-00.json"
    results.write_text(json.dumps(LM_EVAL_RESULTS))
    recorded = json.loads(cli("evaluate", "tickets", "--import", results, "--json").stdout)
    rows = {(r["task"], r["metric"]): r["value"] for r in recorded["rows"]}
    assert rows[("arc_easy", "acc")] == 0.7129 and rows[("gsm8k", "exact_match,strict-match")] == 0.3412
    assert ("gsm8k", "exact_match_stderr,flexible-extract") not in rows  # "N/A" is not a number
    assert recorded["imported"]["harness_version"] == "0.4.9" and len(recorded["imported"]["file_sha256"]) == 64
    gate = {"metric": "acc", "required_suites": [{"suite": "lm-eval", "tasks": ["arc_easy"]}], "min_average": 0.7}
    strict, lenient = tmp_path / "strict.yaml", tmp_path / "lenient.yaml"
    strict.write_text(yaml.safe_dump(gate))
    lenient.write_text(yaml.safe_dump({**gate, "allow_imported": True}))
    refused = json.loads(cli("promote", "tickets", "--to", "production", "--gate", strict, "--json", ok=False).stdout)
    assert refused["decision"] == "refused" and refused["checks"][0]["threshold"] == "allow_imported: true"
    passed = json.loads(cli("promote", "tickets", "--to", "production", "--gate", lenient, "--json").stdout)
    assert passed["decision"] == "promoted" and passed["checks"][0]["observed"] == 0.7129
    from flows.registry_access import open_registry
    from registry.schema import Evaluation

    registry = open_registry()
    with registry.Session() as s:
        imported = s.query(Evaluation).filter(Evaluation.imported.is_(True)).all()
    assert imported and all(e.provenance["harness"] == "lm-evaluation-harness" for e in imported)
    bad = tmp_path / "not-results.json"
    bad.write_text(json.dumps({"accuracy": 0.9}))
    refused = cli("evaluate", "tickets", "--import", bad, ok=False)
    assert refused.exit_code == 1 and "not an lm-evaluation-harness results file" in refused.stderr
