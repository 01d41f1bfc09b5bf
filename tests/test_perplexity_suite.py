"""A suite whose tasks are all perplexity (a causal LM's held-out text): a pipeline's merge step evaluates it,
mirrors it to MLflow and ranks merges by it (lowest first); MAP refuses it in one line."""

from __future__ import annotations

import pytest
import yaml

from tiny_models import CORPUS, tiny_llama_family


@pytest.fixture
def perplexity_suite(tmp_path):
    base, fts = tiny_llama_family(tmp_path / "models")
    (tmp_path / "corpus.txt").write_text("\n\n".join(CORPUS))
    suite = {"name": "lm-text", "family": "causal-lm", "model": "models/llama-base", "options": {"batch_size": 4},
             "tasks": [{"name": "corpus", "eval": "corpus.txt", "calibration": "corpus.txt", "metric": "perplexity"}]}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return base, fts, path


def test_a_perplexity_only_suite_is_merged_evaluated_mirrored_and_ranked(registry, perplexity_suite):
    from sqlalchemy import select

    from flows.resolve import resolve_input as ingest
    from flows.steps import best_merge, evaluate_or_reuse, merge_evaluate_commit, summary
    from registry.schema import Evaluation
    from flows.suites import suite_for
    from merging.recipes.recipe import parse_recipe

    base, fts, path = perplexity_suite
    suite = suite_for(str(path), None, registry=registry)
    outcomes = {}
    for lam in (0.2, 1.5):
        recipe = parse_recipe({"method": "task_arithmetic", "base": str(base), "models": [str(p) for p in (fts.values() if isinstance(fts, dict) else fts)],
                               "parameters": {"lambda": lam}})
        outcomes[lam] = merge_evaluate_commit(registry, recipe, f"lm-{int(10 * lam)}", suite)
    for outcome in outcomes.values():
        assert outcome.scores.accuracy == {} and outcome.scores.perplexity["corpus"] > 1
        metric, value = summary(vars(outcome.scores))
        assert metric == "perplexity" and value == outcome.scores.perplexity["corpus"]
        with registry.Session() as session:
            run_id = session.scalar(select(Evaluation.run_id).where(Evaluation.model_id == outcome.model.id))
        metrics = registry.mirror.client.get_run(run_id).data.metrics  # the merge run shows what its merge scored
        assert "lm-text/corpus/perplexity" in metrics and not any("accuracy" in k for k in metrics)
    # a parent is evaluated (and mirrored) on its own, as a pipeline's evaluate step does
    parent = evaluate_or_reuse(registry, registry.find_digest(outcomes[0.2].model.digest), suite)
    assert parent.reused  # recorded with the merge, read back
    base_model = ingest(registry, str(base))
    scored = evaluate_or_reuse(registry, base_model, suite)
    with registry.Session() as session:
        run_id = session.scalar(select(Evaluation.run_id).where(Evaluation.model_id == base_model.id))
    metrics = registry.mirror.client.get_run(run_id).data.metrics
    assert scored.perplexity["corpus"] > 1 and "corpus/perplexity" in metrics and "average/accuracy" not in metrics
    merges = [{"digest": o.model.digest, **dict(zip(("metric", "average"), summary(vars(o.scores))))}
              for o in outcomes.values()]
    lowest = min(outcomes.values(), key=lambda o: o.scores.perplexity["corpus"])
    assert best_merge(merges)["digest"] == lowest.model.digest


def test_map_refuses_a_suite_it_cannot_chart(perplexity_suite):
    from evaluation.suites import load_suite
    from flows.map_flow import refuse_unscorable
    from merging.errors import MergeyardError

    with pytest.raises(MergeyardError, match="task 'corpus' of suite 'lm-text' is scored by perplexity"):
        refuse_unscorable(load_suite(str(perplexity_suite[2])))
