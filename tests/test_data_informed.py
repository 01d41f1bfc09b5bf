"""Data-informed baselines through the family interface: RegMean against the least-squares solution computed
independently, Fisher merging with equal Fishers against averaging, AdaMerging's coefficient gradient against a
finite difference, learned merges that reproduce bit for bit without data, and merges from registered
statistics in a fresh home equal to the same merges computed from the data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from tiny_suite import tiny_text  # noqa: F401  (a fixture)


def test_regmean_on_one_linear_layer_is_the_least_squares_solution():
    from merging.methods.regmean import regmean_layer

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(25, 6, generator=g, dtype=torch.float64)]
    ws = [torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)]
    merged = regmean_layer(ws, [x.T @ x for x in xs], [1.0, 1.0], alpha=1.0)
    # independently: one least-squares problem over both models' inputs and outputs stacked (numpy)
    X = np.concatenate([x.numpy() for x in xs])
    Y = np.concatenate([x.numpy() @ w.double().numpy().T for x, w in zip(xs, ws)])
    expected = np.linalg.lstsq(X, Y, rcond=None)[0].T
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-5, atol=1e-6)
    # α < 1 shrinks the Grams' off-diagonal: the normal equations with G̃ = αG + (1−α)diag(G), by hand
    alpha = 0.5
    grams = [x.numpy().T @ x.numpy() for x in xs]
    tilde = [alpha * gm + (1 - alpha) * np.diag(np.diag(gm)) for gm in grams]
    by_hand = np.linalg.solve(sum(tilde), sum(t @ w.double().numpy().T for t, w in zip(tilde, ws))).T
    np.testing.assert_allclose(regmean_layer(ws, [torch.from_numpy(gm) for gm in grams], [1.0, 1.0], alpha).numpy(),
                               by_hand, rtol=1e-5, atol=1e-6)


def test_fisher_merging_with_equal_fishers_is_weighted_averaging():
    from merging.methods.fisher import fisher_average

    g = torch.Generator().manual_seed(1)
    models = [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)} for _ in range(3)]
    same = {"w": torch.rand(4, 3, generator=g) + 0.1, "b": torch.rand(3, generator=g) + 0.1}
    weights = [1.0, 2.0, 0.5]
    out = fisher_average(models, [same] * 3, weights, ["w", "b"], normalize=True, floor=0.0)
    for n in ("w", "b"):
        expected = sum(w * m[n] for w, m in zip(weights, models)) / sum(weights)
        torch.testing.assert_close(out[n], expected, rtol=1e-6, atol=1e-6)
    # and unequal Fishers pull each element towards the model that is surer of it
    sure = [{"w": torch.full((4, 3), 1e6), "b": torch.ones(3)}, {"w": torch.ones(4, 3), "b": torch.ones(3)}]
    pulled = fisher_average(models[:2], sure, [1.0, 1.0], ["w"], normalize=False, floor=0.0)["w"]
    torch.testing.assert_close(pulled, models[0]["w"], rtol=1e-5, atol=1e-5)


def test_adamerging_coefficient_gradient_matches_a_finite_difference(tiny_text):
    from evaluation.objectives import PredictionEntropy
    from evaluation.suites import load_suite
    from merging.algorithms.adamerging import coefficient_gradient, merged, task_vectors
    from merging.checkpoints.alignment import aligned_inputs
    from merging.checkpoints.checkpoint import Checkpoint

    base = Checkpoint(tiny_text["base"])
    models = aligned_inputs(base, [Checkpoint(p) for p in tiny_text["finetuned"].values()])
    names = [n for n in base.names if base.entries[n].is_float]
    objective = PredictionEntropy(load_suite(str(tiny_text["suite"])).for_model(tiny_text["base"]), samples_per_task=6)
    taus = task_vectors(base, models, names, "task_arithmetic", 1.0)
    column = {n: i for i, n in enumerate(names)}  # layer-wise: one coefficient per tensor
    base_state = {n: base.read(n).float() for n in base.names}
    lam = torch.full((2, len(names)), 0.3)
    _, grad = objective.loss_and_grad(merged(base_state, taus, lam, column))
    analytic = coefficient_gradient(grad, taus, column, (2, len(names)))
    h = 1e-2  # the loss is float32: a step that moves it well above its rounding
    largest = analytic.abs().flatten().topk(3).indices.tolist()  # the coefficients whose gradient is resolvable
    for k, j in [divmod(i, len(names)) for i in largest]:
        up, down = lam.clone(), lam.clone()
        up[k, j] += h
        down[k, j] -= h
        numeric = (objective.loss(merged(base_state, taus, up, column)) -
                   objective.loss(merged(base_state, taus, down, column))) / (2 * h)
        assert numeric == pytest.approx(float(analytic[k, j]), rel=5e-2, abs=1e-6), (k, names[j])


def _recipe(path, method, tiny, **params):
    path.write_text(yaml.safe_dump({"method": method, "base": str(tiny["base"]),
                                    "models": [str(p) for p in tiny["finetuned"].values()],
                                    "parameters": {"suite": str(tiny["suite"]), **params}}))
    return path


@pytest.mark.parametrize("method,params", [
    ("adamerging", {"granularity": "task", "steps": 4, "lr": 0.05}),
    ("adamerging", {"granularity": "layer", "steps": 4, "lr": 0.05, "on": "ties"}),
    ("fisher", {"budget": 4}),
    ("regmean", {"budget": 4}),
    ("regmean", {"budget": 4, "variant": "regmean++"}),
], ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_each_learned_merge_reproduces_bit_for_bit(tiny_text, cli, tmp_path, method, params):
    merged = json.loads(cli("merge", _recipe(tmp_path / "r.yaml", method, tiny_text, **params), "--name", "m",
                            "--json").stdout)
    from flows.registry_access import open_registry

    registry = open_registry()
    run = registry.producing_run(registry.resolve("m"))
    recorded = json.loads(run.recipe_json)["parameters"]
    if method == "adamerging":  # learned once: the record holds the coefficients, and reproduce needs no data
        assert recorded["coefficients"] is not None
        shutil.rmtree(tiny_text["root"] / "data")
    again = json.loads(cli("reproduce", "m", "--json").stdout)
    assert again["ok"] and again["rebuilt_digest"] == merged["digest"]
    assert cli("lineage", "m").stdout  # the method's summary renders


def test_merges_from_registered_statistics_in_a_fresh_home_equal_the_merges_from_data(tiny_text, cli, tmp_path,
                                                                                      monkeypatch):
    fts = list(tiny_text["finetuned"].values())
    digests = {}
    exported = {}
    for method, stat in (("fisher", "fisher"), ("regmean", "gram")):
        digests[method] = json.loads(cli("merge", _recipe(tmp_path / f"{method}.yaml", method, tiny_text, budget=4,
                                                          model_tasks=["sentiment", "topic"]),
                                         "--name", f"{method}-from-data", "--json").stdout)["digest"]
        for task, path in zip(("sentiment", "topic"), fts):
            cli("ingest", path, "--base", tiny_text["base"])
            measured = json.loads(cli("measure", path, "--suite", tiny_text["suite"], "--stat", stat, "--tasks", task,
                                      "--samples", 4, "--json").stdout)
            out = tmp_path / "published" / f"{stat}-{task}"
            cli("export", measured["digest"], "--out", out)
            exported.setdefault(method, []).append(out)
    graph = json.loads(cli("lineage", "ft-sentiment-fisher", "--format", "json").stdout)
    assert [e["role"] for e in graph["edges"]] == ["measured"]
    # a fresh home holding no suite data: the models and their published statistics, nothing else
    monkeypatch.setenv("MERGEYARD_HOME", str(tmp_path / "fresh-home"))
    from flows.settings import get_settings

    get_settings.cache_clear()
    shutil.rmtree(tiny_text["root"] / "data")
    for method in ("fisher", "regmean"):
        stats = [json.loads(cli("ingest", p, "--json").stdout) for p in exported[method]]
        assert all(s["kind"] == "statistics" for s in stats)
        recipe = tmp_path / f"{method}-stats.yaml"
        recipe.write_text(yaml.safe_dump({"method": method, "base": str(tiny_text["base"]),
                                          "models": [str(p) for p in fts],
                                          "parameters": {"statistics": [s["digest"] for s in stats]}}))
        again = json.loads(cli("merge", recipe, "--name", f"{method}-from-stats", "--json").stdout)
        assert again["digest"] == digests[method], method
        assert json.loads(cli("reproduce", f"{method}-from-stats", "--json").stdout)["ok"]
