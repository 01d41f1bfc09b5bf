"""The causal-lm family on a tiny randomly initialised Llama built from a config: multiple-choice log-likelihood
accuracy and perplexity, checked against transformers run directly; merges and objectives go through it too."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from tiny_models import CORPUS, tiny_llama_family

CHOICES = [("the movie was", ["very good", "the mat", "warm today"], 0),
           ("the cat sat on", ["the mat", "a song", "the worst"], 0),
           ("a bird sang", ["a song", "the food", "so nice"], 0),
           ("the dog ran in", ["the park", "the mat"], 0),
           ("we hate", ["the service", "a happy day", "the sun"], 0),
           ("the sun is", ["warm today", "the worst", "a sad story"], 0)]


@pytest.fixture
def tiny_lm(tmp_path):
    base, fts = tiny_llama_family(tmp_path / "models")
    data = tmp_path / "data"
    data.mkdir()
    (data / "choices.jsonl").write_text("".join(json.dumps({"context": c, "choices": ch, "label": y}) + "\n"
                                                for c, ch, y in CHOICES))
    (data / "corpus.txt").write_text("\n\n".join(CORPUS))
    suite = {"name": "lm-mini", "family": "causal-lm", "model": "models/llama-base", "options": {"batch_size": 4},
             "tasks": [{"name": "choice", "eval": "data/choices.jsonl", "calibration": "data/choices.jsonl",
                        "metric": "choice_accuracy"},
                       {"name": "corpus", "eval": "data/corpus.txt", "calibration": "data/corpus.txt",
                        "metric": "perplexity"}]}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return {"base": base, "finetuned": fts, "suite": path}


def direct_scores(model_dir):
    """Each choice's summed log-likelihood and each document's token NLL, one unpadded sequence at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731

    def logprobs(ids):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        return out[:-1].gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)

    choice_scores = []
    for context, choices, _ in CHOICES:
        prompt = [tok.bos_token_id] + encode(context)
        row = []
        for choice in choices:
            cont = encode(choice)
            row.append(float(logprobs(prompt + cont)[len(prompt) - 1:].sum()))
        choice_scores.append(row)
    nll, tokens = 0.0, 0
    for doc in CORPUS:
        lp = logprobs([tok.bos_token_id] + encode(doc))
        nll -= float(lp.sum())
        tokens += len(lp)
    return choice_scores, nll / tokens


def test_choice_accuracy_and_perplexity_match_transformers_run_directly(tiny_lm):
    from evaluation.evaluator import evaluate_checkpoint
    from evaluation.suites import load_suite

    suite = load_suite(str(tiny_lm["suite"]))
    result = {t.task: t for t in evaluate_checkpoint(tiny_lm["finetuned"][0], suite).tasks}
    scores, mean_nll = direct_scores(tiny_lm["finetuned"][0])
    labels = [y for _, _, y in CHOICES]
    hits = [max(range(len(row)), key=row.__getitem__) == y for row, y in zip(scores, labels)]
    choice = result["choice"]
    assert choice.metric == "choice_accuracy" and choice.value == pytest.approx(sum(hits) / len(hits))
    ce = [-(row[y] - math.log(sum(math.exp(v) for v in row))) for row, y in zip(scores, labels)]
    assert choice.loss == pytest.approx(sum(ce) / len(ce), rel=1e-4)
    corpus = result["corpus"]
    assert corpus.accuracy is None and corpus.loss == pytest.approx(mean_nll, rel=1e-4)
    assert corpus.value == pytest.approx(math.exp(mean_nll), rel=1e-4)


def test_the_objective_gradient_matches_a_finite_difference(tiny_lm):
    from evaluation.evaluator import load_state
    from evaluation.objectives import FewShotCrossEntropy
    from evaluation.suites import load_suite

    objective = FewShotCrossEntropy(load_suite(str(tiny_lm["suite"])), samples_per_task=4)
    state = {k: v.double().float() for k, v in load_state(tiny_lm["base"]).items()}
    assert "lm_head.weight" not in objective.names  # tied: the embedding is the one tensor
    loss, grad = objective.loss_and_grad(state)
    g = torch.Generator().manual_seed(0)
    direction = {n: torch.randn(state[n].shape, generator=g) for n in objective.names}
    h = 1e-3
    plus = objective.loss({n: v + h * direction[n] if n in direction else v for n, v in state.items()})
    minus = objective.loss({n: v - h * direction[n] if n in direction else v for n, v in state.items()})
    analytic = sum(float((grad[n] * direction[n]).sum()) for n in objective.names)
    assert (plus - minus) / (2 * h) == pytest.approx(analytic, rel=2e-2)
    assert loss == pytest.approx(objective.loss(state), rel=1e-6)


def test_llm_merges_evaluate_on_the_suite_and_fw_optimises_it(tiny_lm, cli, tmp_path):
    for method, params in (("task_arithmetic", {"lambda": 0.5}),
                           ("fw_hard", {"suite": str(tiny_lm["suite"]), "iterations": 2, "step_size": 1.0,
                                        "budget": 4})):
        recipe = tmp_path / f"{method}.yaml"
        recipe.write_text(yaml.safe_dump({"method": method, "base": str(tiny_lm["base"]),
                                          "models": [str(p) for p in tiny_lm["finetuned"]], "parameters": params}))
        merged = json.loads(cli("merge", recipe, "--name", f"lm-{method}", "--json").stdout)
        from merging.checkpoints.checkpoint import Checkpoint

        assert "lm_head.weight" not in Checkpoint(merged["store_path"]).entries  # tied weights stay tied
        report = json.loads(cli("evaluate", f"lm-{method}", "--suite", tiny_lm["suite"], "--json").stdout)
        assert {t["task"]: t["metric"] for t in report["tasks"]} == {"choice": "choice_accuracy",
                                                                     "corpus": "perplexity"}
    assert json.loads(cli("reproduce", "lm-fw_hard", "--json").stdout)["ok"]
    # a gate on a lower-is-better metric
    gate = tmp_path / "gate.yaml"
    gate.write_text(yaml.safe_dump({"metric": "perplexity", "required_suites": [str(tiny_lm["suite"])],
                                    "max_average": 1e9}))
    assert json.loads(cli("promote", "lm-task_arithmetic", "--to", "staging", "--gate", gate,
                          "--json").stdout)["decision"] == "promoted"
