"""mergekit's methods (slerp, nuslerp, multislerp, karcher, model_stock, breadcrumbs, della, sce, nearswap)
against the slow float64 references of tests/mergekit_reference.py, through the real engine and real files;
and mergekit's parameter forms (gradients over layers, filters, per-model values) against values worked out
by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mergekit_reference as ref
from conftest import load_all, random_family, save_checkpoint
from merging.engine import run_merge
from merging.errors import RecipeError
from merging.algorithms.random_mask import stream_key
from merging.recipes.recipe import parse_recipe

CHUNKS = [1 << 22, 40]  # whole tensors, and row chunks of ≤ 40 elements


def merge(tmp_path, method, base, models, params, weights=None, model_params=None, chunk_elems=1 << 22, seed=0):
    entries = []
    for i, p in enumerate(models):
        e = {"model": str(p), "weight": (weights or [1.0] * len(models))[i]}
        if model_params and model_params[i]:
            e["parameters"] = model_params[i]
        entries.append(e)
    recipe = parse_recipe({"method": method, "base": str(base) if base else None, "models": entries,
                           "parameters": params, "seed": seed})
    out = tmp_path / f"out-{method}-{len(list(tmp_path.iterdir()))}"
    run_merge(recipe, out, chunk_elems=chunk_elems)
    return load_all(out), recipe


def check(got, expected, atol=2e-5):
    for name, want in expected.items():
        np.testing.assert_allclose(got[name].double().numpy(), want, atol=atol, rtol=1e-5, err_msg=name)


def family(write_family, n, seed, spread=0.1):
    base, models = random_family(n, seed=seed, spread=spread)
    bp, mps = write_family(base, models)
    return base, models, bp, mps


@pytest.mark.parametrize("chunk_elems", CHUNKS)
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_row_by_row(tmp_path, write_family, chunk_elems, t):
    base, (model,), bp, (mp,) = family(write_family, 1, seed=3, spread=0.8)
    got, _ = merge(tmp_path, "slerp", bp, [mp], {"t": t}, chunk_elems=chunk_elems)
    check(got, {n: ref.slerp(ref.np64(base[n]), ref.np64(model[n]), t) for n in base})
    if t == 0.0:
        assert all(torch.allclose(got[n], base[n], atol=1e-6) for n in base)


@pytest.mark.parametrize("chunk_elems", CHUNKS)
@pytest.mark.parametrize("options", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp(tmp_path, write_family, chunk_elems, options, with_base):
    base, models, bp, mps = family(write_family, 2, seed=4, spread=0.5)
    got, _ = merge(tmp_path, "nuslerp", bp if with_base else None, mps, options, weights=[0.3, 0.9],
                   chunk_elems=chunk_elems)
    names = [n for n in base if options == {} or base[n].dim() >= 1]
    check(got, {n: ref.nuslerp([ref.np64(m[n]) for m in models], [0.3, 0.9],
                               ref.np64(base[n]) if with_base else None,
                               flatten=options.get("nuslerp_flatten", True),
                               row_wise=options.get("nuslerp_row_wise", False)) for n in names})


@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp(tmp_path, write_family, with_base):
    base, models, bp, mps = family(write_family, 3, seed=5, spread=0.5)
    got, _ = merge(tmp_path, "multislerp", bp if with_base else None, mps, {}, weights=[1.0, 2.0, 0.5], chunk_elems=40)
    check(got, {n: ref.multislerp([ref.np64(m[n]) for m in models], [1.0, 2.0, 0.5],
                                  ref.np64(base[n]) if with_base else None) for n in base})


def test_karcher_mean_meets_its_first_order_condition(tmp_path, write_family):
    base, models, bp, mps = family(write_family, 3, seed=6, spread=0.6)
    got, _ = merge(tmp_path, "karcher", None, mps, {"max_iter": 50, "tol": 1e-9})
    for n in base:
        if base[n].numel() < 2:
            continue
        points = [ref.np64(m[n]) for m in models]
        result = got[n].double().numpy()
        assert ref.karcher_residual(result, points) < 1e-4, n
        # rescaled by the mean norm of the points
        assert abs(np.linalg.norm(result) - np.mean([np.linalg.norm(p) for p in points])) < 1e-4 * np.linalg.norm(result)
    # one step from the Euclidean mean is not the Karcher mean: the iteration did something
    one, _ = merge(tmp_path, "karcher", None, mps, {"max_iter": 1})
    assert any(not torch.allclose(one[n], got[n], atol=1e-7) for n in base if base[n].numel() > 1)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(tmp_path, write_family, filter_wise):
    base, models, bp, mps = family(write_family, 3, seed=7)
    got, _ = merge(tmp_path, "model_stock", bp, mps, {"filter_wise": filter_wise}, chunk_elems=40)
    check(got, {n: ref.model_stock(ref.np64(base[n]), [ref.np64(m[n]) for m in models], filter_wise) for n in base})


@pytest.mark.parametrize("chunk_elems", CHUNKS)
def test_nearswap(tmp_path, write_family, chunk_elems):
    base, (model,), bp, (mp,) = family(write_family, 1, seed=8)
    got, _ = merge(tmp_path, "nearswap", bp, [mp], {"t": 0.05}, chunk_elems=chunk_elems)
    check(got, {n: ref.nearswap(ref.np64(base[n]), ref.np64(model[n]), 0.05) for n in base})


@pytest.mark.parametrize("topk", [1.0, 0.4])
def test_sce(tmp_path, write_family, topk):
    base, models, bp, mps = family(write_family, 3, seed=9)
    got, _ = merge(tmp_path, "sce", bp, mps, {"select_topk": topk}, chunk_elems=40)
    check(got, {n: ref.sce(ref.np64(base[n]), [ref.np64(m[n]) for m in models], topk) for n in base})


@pytest.mark.parametrize("method,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize("normalize,rescale", [(False, False), (True, True)])
def test_breadcrumbs(tmp_path, write_family, method, consensus, normalize, rescale):
    base, models, bp, mps = family(write_family, 3, seed=10)
    weights, densities, gammas = [0.5, 1.0, 0.8], [0.6, 0.3, 0.9], [0.05, 0.1, 0.0]
    got, _ = merge(tmp_path, method, bp, mps, {"normalize": normalize, "rescale": rescale, "lambda": 0.7},
                   weights=weights, model_params=[{"density": d, "gamma": g} for d, g in zip(densities, gammas)],
                   chunk_elems=40)
    check(got, {n: ref.breadcrumbs(ref.np64(base[n]), [ref.np64(m[n]) for m in models], weights, densities, gammas,
                                   consensus, normalize, rescale, 0.7) for n in base})


@pytest.mark.parametrize("method,consensus,normalize", [("della", True, True), ("della_linear", False, False)])
def test_della(tmp_path, write_family, method, consensus, normalize):
    base, models, bp, mps = family(write_family, 2, seed=11)
    weights, densities = [1.0, 0.6], [0.5, 0.4]
    got, _ = merge(tmp_path, method, bp, mps, {"epsilon": 0.2}, weights=weights,
                   model_params=[{"density": d} for d in densities], seed=5, chunk_elems=40)
    keys = {n: [stream_key(5, "della", i, n) for i in range(2)] for n in base}
    check(got, {n: ref.della(ref.np64(base[n]), [ref.np64(m[n]) for m in models], weights, densities, [0.2, 0.2],
                             keys[n], consensus, normalize) for n in base})


def test_della_keeps_density_and_favours_large_magnitudes(tmp_path):
    """Statistics on a large tensor: the kept fraction is the density, and the largest |τ| survive most."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(256, 512)}
    model = {"w": torch.randn(256, 512, generator=g)}
    bp, mp = save_checkpoint(base, tmp_path / "b.safetensors"), save_checkpoint(model, tmp_path / "m.safetensors")
    got, _ = merge(tmp_path, "della_linear", bp, [mp], {"density": 0.3, "epsilon": 0.2, "rescale": False})
    kept = got["w"] != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    magnitude = model["w"].abs()
    top, bottom = magnitude >= magnitude.quantile(0.9), magnitude <= magnitude.quantile(0.1)
    assert abs(kept[top].float().mean().item() - 0.48) < 0.02  # p ≈ 0.1 + 0.4·0.95
    assert abs(kept[bottom].float().mean().item() - 0.12) < 0.02
    again, _ = merge(tmp_path, "della_linear", bp, [mp], {"density": 0.3, "epsilon": 0.2, "rescale": False})
    assert torch.equal(again["w"], got["w"])  # the same seed, the same bytes


def test_della_refuses_a_density_epsilon_outside_zero_one(tmp_path, write_family):
    _, _, bp, mps = family(write_family, 1, seed=1)
    with pytest.raises(RecipeError, match="density ± epsilon"):
        merge(tmp_path, "della", bp, mps, {"density": 0.1, "epsilon": 0.15})


# ---- parameters as mergekit writes them ----

LAYERS = 4
LLAMA = {"model.embed_tokens.weight": (11, 8), "model.norm.weight": (8,), "lm_head.weight": (11, 8)}
for i in range(LAYERS):
    LLAMA |= {f"model.layers.{i}.self_attn.q_proj.weight": (8, 8), f"model.layers.{i}.mlp.up_proj.weight": (6, 8),
              f"model.layers.{i}.input_layernorm.weight": (8,)}


def llama_family(tmp_path, n):
    base, models = random_family(n, seed=12, shapes=LLAMA)
    bp = save_checkpoint(base, tmp_path / "base.safetensors")
    return base, models, bp, [save_checkpoint(m, tmp_path / f"m{i}.safetensors") for i, m in enumerate(models)]


def layer_t(name):
    """By hand: layer i of 4 sits at i/3; embeddings, final norm and head at 0."""
    for i in range(LAYERS):
        if f"layers.{i}." in name:
            return i / (LAYERS - 1)
    return 0.0


def test_gradient_interpolates_over_layers_and_filters_pick_by_name(tmp_path):
    base, (model,), bp, (mp,) = llama_family(tmp_path, 1)
    t_setting = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": [1.0, 0.5, 0.0]},
                 {"value": 0.25}]
    got, recipe = merge(tmp_path, "slerp", bp, [mp], {"t": t_setting})

    def t_for(name):
        t = layer_t(name)
        if "self_attn" in name:
            return t
        if "mlp" in name:
            return 1 - t if t <= 0.5 else 0.5 - (t - 0.5)  # [1, 0.5, 0] at 0, ½, 1, linear between
        return 0.25

    check(got, {n: ref.slerp(ref.np64(base[n]), ref.np64(model[n]), t_for(n)) for n in base})
    assert recipe.canonical()["parameters"]["t"] == [{"filter": "self_attn", "value": [0.0, 1.0]},
                                                     {"filter": "mlp", "value": [1.0, 0.5, 0.0]},
                                                     {"filter": None, "value": 0.25}]


def test_model_parameters_take_precedence_over_the_recipes_and_fall_through_unmatched_filters(tmp_path):
    base, models, bp, mps = llama_family(tmp_path, 2)
    own = [{"weight": [{"filter": "mlp", "value": 3.0}]}, {"weight": [0.0, 2.0]}]
    got, _ = merge(tmp_path, "task_arithmetic", bp, mps, {"lambda": [{"filter": "lm_head", "value": 0.5}, {"value": 1.0}]},
                   weights=[1.0, 1.0], model_params=own)
    for n in base:
        w0 = 3.0 if "mlp" in n else 1.0  # model 0's filter matches only mlp tensors; elsewhere its entry weight
        w1 = 2.0 * layer_t(n)
        lam = 0.5 if "lm_head" in n else 1.0
        want = base[n].double() + lam * (w0 * (models[0][n].double() - base[n].double())
                                         + w1 * (models[1][n].double() - base[n].double()))
        np.testing.assert_allclose(got[n].double().numpy(), want.numpy(), atol=1e-5, err_msg=n)


def test_per_model_density_in_ties_per_tensor(tmp_path, write_family):
    import dense_reference as dense

    base, models, bp, mps = family(write_family, 2, seed=13)
    got, _ = merge(tmp_path, "ties", bp, mps, {"trim_scope": "per_tensor", "density": 0.5},
                   model_params=[{"density": 0.2}, None])
    both_02 = dense.ties_per_tensor(base, models, [1.0, 1.0], 0.2)
    both_05 = dense.ties_per_tensor(base, models, [1.0, 1.0], 0.5)
    # model 0 trimmed at 0.2 and model 1 at 0.5: differs from both uniform densities, so each was applied
    assert any(not torch.allclose(got[n], both_02[n].float(), atol=1e-6) for n in base)
    assert any(not torch.allclose(got[n], both_05[n].float(), atol=1e-6) for n in base)
    only0 = merge(tmp_path, "ties", bp, mps[:1], {"trim_scope": "per_tensor", "density": 0.2})[0]
    solo = dense.ties_per_tensor(base, models[:1], [1.0], 0.2)
    for n in base:
        np.testing.assert_allclose(only0[n].numpy(), solo[n].float().numpy(), atol=1e-6)


@pytest.mark.parametrize("recipe,message", [
    ({"method": "ties", "parameters": {"density": [0.2, 0.5]}}, "whole model at once"),
    ({"method": "ties", "parameters": {"trim_scope": "per_tensor"}, "model_params": {"gamma": 0.1}}, "takes per model"),
    ({"method": "slerp", "parameters": {"t": [0.0, "x"]}}, "t"),
    ({"method": "slerp", "parameters": {"t": [{"filter": "mlp"}]}}, "filter"),
    ({"method": "slerp", "parameters": {"t": [{"filter": 3, "value": 1.0}]}}, "substring"),
    ({"method": "task_arithmetic", "parameters": {}, "model_params": {"weight": ["a", "b"]}}, "not a finite number"),
    ({"method": "slerp", "parameters": {}}, "t"),
])
def test_bad_settings_are_one_line_errors(tmp_path, write_family, recipe, message):
    _, _, bp, mps = family(write_family, 1, seed=1)
    data = {"method": recipe["method"], "base": str(bp), "parameters": recipe["parameters"],
            "models": [{"model": str(mps[0]), **({"parameters": recipe["model_params"]} if "model_params" in recipe
                                                 else {})}]}
    with pytest.raises(RecipeError, match=message) as info:
        parse_recipe(data)
    assert "\n" not in str(info.value)


def test_recipes_without_settings_keep_their_hash():
    """Wave-1 recipes hash as before: no `parameters` key appears on their models."""
    recipe = parse_recipe({"method": "task_arithmetic", "base": "b", "models": ["a"], "parameters": {"lambda": 0.3}})
    assert recipe.canonical()["models"] == [{"model": "a", "weight": 1.0}]
    assert not recipe.varying
