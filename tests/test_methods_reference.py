"""Every merge method against the dense reference of tests/dense_reference.py."""

from __future__ import annotations

import pytest
import torch

import dense_reference as ref
from conftest import load_all, random_family
from merging.engine import run_merge
from merging.algorithms.random_mask import stream_key
from merging.recipes.recipe import parse_recipe

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def merge(tmp_path, method, base_path, model_paths, params, weights=None, chunk_elems=1 << 22, out_dtype=None, seed=0):
    recipe = parse_recipe({
        "method": method,
        "base": str(base_path) if base_path else None,
        "models": [{"model": str(p), "weight": w} for p, w in zip(model_paths, weights or [1.0] * len(model_paths))],
        "parameters": params,
        "out_dtype": out_dtype,
        "seed": seed,
    })
    out = tmp_path / f"out-{method}-{len(list(tmp_path.iterdir()))}"
    result = run_merge(recipe, out, chunk_elems=chunk_elems, max_shard_bytes=2048)
    return load_all(out), result


def assert_matches(got, expected, dtype, exact):
    assert set(expected) <= set(got)
    for name, want in expected.items():
        have = got[name]
        assert have.dtype == dtype, name
        want = want.to(dtype)
        if exact:
            assert torch.equal(have, want), f"{name}: max |Δ| {(have.float() - want.float()).abs().max()}"
        else:
            torch.testing.assert_close(have.float(), want.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                       atol=1e-5 if dtype == torch.float32 else 1e-2, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["file", "sharded"])
def test_average_and_task_arithmetic(tmp_path, write_family, dtype, layout):
    base, models = random_family(3, seed=1, dtype=dtype)
    bp, mps = write_family(base, models, layout)
    weights = [0.5, 1.0, 2.0]
    got, _ = merge(tmp_path, "average", None, mps, {}, weights)
    assert_matches(got, ref.average(models, weights), dtype, exact=False)
    got, _ = merge(tmp_path, "task_arithmetic", bp, mps, {"lambda": 0.3}, weights)
    assert_matches(got, ref.task_arithmetic(base, models, weights, 0.3), dtype, exact=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_elems", [1 << 22, 40])  # whole tensors, and row chunks of ≤ 40 elements
@pytest.mark.parametrize("aggregate", ["mean", "sum"])
def test_ties_global_equals_dense_reference_exactly(tmp_path, write_family, dtype, chunk_elems, aggregate):
    base, models = random_family(4, seed=2, dtype=dtype)
    bp, mps = write_family(base, models, "sharded")
    weights = [1.0, 0.7, 1.3, 1.0]
    params = {"density": 0.25, "trim_scope": "global", "aggregate": aggregate, "lambda": 0.8}
    got, _ = merge(tmp_path, "ties", bp, mps, params, weights, chunk_elems=chunk_elems, out_dtype="float32")
    expected = ref.ties_global(base, models, weights, 0.25, aggregate, 0.8)
    assert_matches(got, expected, torch.float32, exact=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_elems", [1 << 22, 40])
def test_ties_per_tensor_matches_mergekit_semantics(tmp_path, write_family, dtype, chunk_elems):
    base, models = random_family(3, seed=3, dtype=dtype)
    bp, mps = write_family(base, models, "file")
    weights = [1.0, 0.5, 2.0]
    params = {"density": 0.3, "trim_scope": "per_tensor", "aggregate": "mean", "lambda": 1.0}
    got, _ = merge(tmp_path, "ties", bp, mps, params, weights, chunk_elems=chunk_elems, out_dtype="float32")
    expected = ref.ties_per_tensor(base, models, weights, 0.3, "mean", 1.0)
    assert_matches(got, expected, torch.float32, exact=True)


def tied_family():
    """Task vectors on a coarse grid of values: many |τ| equal to the trim threshold."""
    g = torch.Generator().manual_seed(7)
    shapes = {"a": (12, 10), "b": (30,), "c": (5, 5)}
    base = {k: torch.randint(-4, 5, s, generator=g).float() for k, s in shapes.items()}
    models = [{k: v + 0.5 * torch.randint(-3, 4, v.shape, generator=g).float() for k, v in base.items()}
              for _ in range(3)]
    return base, models


@pytest.mark.parametrize("chunk_elems", [1 << 22, 7])
def test_ties_threshold_ties(tmp_path, write_family, chunk_elems):
    base, models = tied_family()
    bp, mps = write_family(base, models)
    for scope, reference in (("global", ref.ties_global), ("per_tensor", ref.ties_per_tensor)):
        params = {"density": 0.35, "trim_scope": scope}
        got, _ = merge(tmp_path, "ties", bp, mps, params, chunk_elems=chunk_elems)
        assert_matches(got, reference(base, models, [1.0] * 3, 0.35), torch.float32, exact=True)


def test_global_and_per_tensor_differ_where_they_should(tmp_path, write_family):
    # Tensor "big" changes a lot, "small" barely: a global top-20% takes almost all of it from "big",
    # a per-tensor top-20% takes 20% of each.
    g = torch.Generator().manual_seed(5)
    base = {"big": torch.zeros(100), "small": torch.zeros(100)}
    models = [{"big": torch.randn(100, generator=g), "small": 1e-3 * torch.randn(100, generator=g)} for _ in range(2)]
    bp, mps = write_family(base, models)
    global_, _ = merge(tmp_path, "ties", bp, mps, {"density": 0.2, "trim_scope": "global"})
    local, _ = merge(tmp_path, "ties", bp, mps, {"density": 0.2, "trim_scope": "per_tensor"})
    assert int((global_["small"] != 0).sum()) == 0
    assert int((local["small"] != 0).sum()) > 0
    assert int((global_["big"] != 0).sum()) > int((local["big"] != 0).sum())


def test_ties_global_negative_majority_patches_zero_sum_parameters(tmp_path, write_family):
    # Most parameters elect a negative sign; at four positions the two task vectors cancel exactly
    # (sum 0). The paper gives those the majority sign, i.e. keeps the negative entry: the engine
    # writes them assuming a positive majority and must patch them afterwards.
    base = {"w": torch.zeros(64), "v": torch.zeros(8)}
    m1 = {"w": -torch.linspace(1, 2, 64), "v": torch.tensor([0.5, -0.5, 0.25, -1.0, 0, 0, 0, 0])}
    m2 = {"w": -torch.linspace(1.5, 2.5, 64), "v": torch.tensor([-0.5, 0.5, -0.25, 1.0, 0, 0, 0, 0])}
    bp, mps = write_family(base, [m1, m2])
    got, result = merge(tmp_path, "ties", bp, mps, {"density": 1.0, "trim_scope": "global"})
    expected = ref.ties_global(base, [m1, m2], [1.0, 1.0], 1.0)
    assert torch.equal(expected["v"][:4], torch.tensor([-0.5, -0.5, -0.25, -1.0]))
    assert_matches(got, expected, torch.float32, exact=True)
    from merging.checkpoints.digest import checkpoint_digest

    assert result.digest == checkpoint_digest(result.out_dir)  # recomputed after the patch


def dare_keys(seed, n_models, names):
    return [{name: stream_key(seed, i, name) for name in names} for i in range(n_models)]


@pytest.mark.parametrize("method,ties", [("dare_linear", False), ("dare_ties", True)])
@pytest.mark.parametrize("chunk_elems", [1 << 22, 40])
def test_dare_against_reference(tmp_path, write_family, method, ties, chunk_elems):
    shapes = {"a": (9, 8), "b": (20,), "c": (3, 4, 2)}
    base, models = random_family(3, seed=11, shapes=shapes)
    bp, mps = write_family(base, models)
    weights = [1.0, 0.5, 1.5]
    params = {"drop_rate": 0.6, "lambda": 0.9}
    got, _ = merge(tmp_path, method, bp, mps, params, weights, chunk_elems=chunk_elems, seed=42)
    keys = dare_keys(42, 3, shapes)
    expected = ref.dare(base, models, weights, 0.6, keys, lam=0.9, ties=ties)
    assert_matches(got, expected, torch.float32, exact=False)


def test_dare_seed_changes_the_mask_and_is_reproducible(tmp_path, write_family):
    base, models = random_family(2, seed=12)
    bp, mps = write_family(base, models)
    a1, r1 = merge(tmp_path, "dare_linear", bp, mps, {"drop_rate": 0.5}, seed=1)
    a2, r2 = merge(tmp_path, "dare_linear", bp, mps, {"drop_rate": 0.5}, seed=1)
    b1, r3 = merge(tmp_path, "dare_linear", bp, mps, {"drop_rate": 0.5}, seed=2)
    assert r1.digest == r2.digest != r3.digest
    assert not torch.equal(a1["emb.weight"], b1["emb.weight"])


@pytest.mark.parametrize("aggregate", ["mean", "sum"])
@pytest.mark.parametrize("numel,block", [(5, 2), (1000 * 1001, 4096), (3 * 4096, 4096)])
def test_the_agreeing_merge_gives_the_same_bits_in_cache_sized_blocks(aggregate, numel, block):
    """Blocking is an optimisation only: each element is the whole-tensor formula's, bit for bit."""
    from merging.algorithms.consensus import disjoint_merge_weighted, elect_sign_weighted, merge_agreeing

    g = torch.Generator().manual_seed(numel)
    base = torch.randn(numel, generator=g)
    weighted = [torch.randn(numel, generator=g) * (torch.rand(numel, generator=g) > 0.5) for _ in range(6)]
    weights = [0.3, 0.2, 1.0, 0.5, 0.7, 1.0]
    whole = base + 0.7 * disjoint_merge_weighted(weighted, weights, elect_sign_weighted(weighted), aggregate)
    assert torch.equal(merge_agreeing(base, weighted, weights, aggregate, 0.7, block=block), whole)
