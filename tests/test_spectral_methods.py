"""The SVD family (tsv, iso_c, iso_cts, cart) against float64 references written from the papers' formulas
(tests/dense_reference.py), on odd shapes, rank edge cases and bf16 inputs, and the same bytes in every process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dense_reference as ref
from conftest import load_all, random_family
from merging.engine import run_merge
from merging.recipes.recipe import parse_recipe

# odd shapes: tall, wide and square weight matrices, a bias, an embedding table (averaged, not decomposed), a conv
SHAPES = {"blk.0.attn.w": (7, 5), "blk.0.mlp.w": (5, 11), "blk.0.mlp.b": (5,), "blk.1.w": (6, 6),
          "embeddings.word_embeddings.weight": (13, 5), "conv.weight": (2, 3, 2, 2)}
METHODS = {
    "tsv": (lambda b, ms, ws, p: ref.tsv(b, ms, ws, p.get("alpha", 1.0), p.get("rank_fraction")), {"alpha": 0.9}),
    "iso_c": (lambda b, ms, ws, p: ref.iso_c(b, ms, ws, p.get("alpha", 1.0)), {"alpha": 1.3}),
    "iso_cts": (lambda b, ms, ws, p: ref.iso_cts(b, ms, ws, p.get("alpha", 1.0), p.get("common_fraction", 0.8)),
                {"alpha": 1.1, "common_fraction": 0.6}),
    "cart": (lambda b, ms, ws, p: ref.cart(b, ms, ws, p.get("lambda", 2.0), p.get("rank_ratio", 0.12)),
             {"lambda": 1.5, "rank_ratio": 0.4}),
}


def merge(tmp_path, method, base_path, model_paths, params, weights=None):
    recipe = parse_recipe({"method": method, "base": str(base_path) if base_path else None, "parameters": params,
                           "models": [{"model": str(p), "weight": w}
                                      for p, w in zip(model_paths, weights or [1.0] * len(model_paths))]})
    out = tmp_path / f"out-{method}-{len(list(tmp_path.iterdir()))}"
    result = run_merge(recipe, out, max_shard_bytes=4096)
    return load_all(out), result


def close(got, want, dtype):
    assert set(want) == set(got)
    for name, w in want.items():
        assert got[name].dtype == dtype, name
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[name].double(), w.to(dtype).double(), rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_equals_its_float64_reference(tmp_path, write_family, method, dtype):
    base, models = random_family(3, seed=5, dtype=dtype, spread=0.2, shapes=SHAPES)
    bp, mps = write_family(base, models, "sharded")
    weights = [1.0, 0.6, 1.4]
    reference, params = METHODS[method]
    got, _ = merge(tmp_path, method, bp, mps, params, weights)
    close(got, reference(base, models, weights, params), dtype)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("case", ["one task", "more tasks than the rank", "rank over the dimension"])
def test_rank_edge_cases_equal_the_reference(tmp_path, write_family, method, case):
    n, params = {"one task": (1, {}), "more tasks than the rank": (7, {}),
                 "rank over the dimension": (3, {"tsv": {"rank_fraction": 1.0}, "cart": {"rank_ratio": 1.0},
                                                 "iso_cts": {"common_fraction": 0.0}}.get(method, {}))}[case]
    shapes = {"blk.0.w": (3, 4), "blk.0.b": (4,), "blk.1.w": (5, 2)}
    base, models = random_family(n, seed=9, spread=0.3, shapes=shapes)
    bp, mps = write_family(base, models, "file")
    got, _ = merge(tmp_path, method, bp, mps, params)
    close(got, METHODS[method][0](base, models, [1.0] * n, params), torch.float32)


def test_closed_forms(tmp_path, write_family):
    """Cases whose answer is known without the papers' algorithms."""
    shapes = {"blk.0.w": (8, 6), "blk.0.b": (6,)}
    base, (model,) = random_family(1, seed=3, spread=0.5, shapes=shapes)
    bp, (mp,) = write_family(base, [model], "file")
    tau = model["blk.0.w"].double() - base["blk.0.w"].double()
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    # T identical tasks: TSV-M keeps each one's top r/T directions; stacked T times and orthogonalised on its range,
    # they are the rank-r/T truncation of τ itself
    got, _ = merge(tmp_path, "tsv", bp, [mp] * 3, {})
    truncated = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]  # r = 6, T = 3: k = 2
    torch.testing.assert_close(got["blk.0.w"].double(), base["blk.0.w"].double() + truncated, rtol=1e-5, atol=1e-5)
    # one task: TSV-M keeps all of it, so it is the fine-tune; Iso-C gives every singular value their mean
    got, _ = merge(tmp_path, "tsv", bp, [mp], {})
    torch.testing.assert_close(got["blk.0.w"], model["blk.0.w"], rtol=1e-5, atol=1e-5)
    got, _ = merge(tmp_path, "iso_c", bp, [mp], {})
    merged = got["blk.0.w"].double() - base["blk.0.w"].double()
    torch.testing.assert_close(torch.linalg.svdvals(merged), s.mean().expand(6), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged @ vh.T @ torch.diag(1 / s) @ u.T @ tau, merged, rtol=1e-4, atol=1e-5)  # same U, V
    # CART at full rank adds back every centred task vector, which sum to zero: it is weight averaging
    others = [{k: v + 0.3 * torch.randn(v.shape) for k, v in base.items()} for _ in range(2)]
    paths = write_family(base, [model, *others], "file")[1]
    got, _ = merge(tmp_path, "cart", bp, paths, {"rank_ratio": 1.0, "lambda": 3.0})
    avg, _ = merge(tmp_path, "average", None, paths, {})
    for name in shapes:
        torch.testing.assert_close(got[name], avg[name], rtol=1e-5, atol=1e-5)


def test_not_a_matrix_is_averaged_and_an_embedding_is_not_decomposed(tmp_path, write_family):
    shapes = {"model.embed_tokens.weight": (9, 4), "blk.0.w": (4, 4)}
    base, models = random_family(2, seed=4, shapes=shapes)
    bp, mps = write_family(base, models, "file")
    got, _ = merge(tmp_path, "iso_c", bp, mps, {"alpha": 2.0})
    mean_tau = sum(m["model.embed_tokens.weight"] - base["model.embed_tokens.weight"] for m in models) / 2
    torch.testing.assert_close(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"] + 2.0 * mean_tau)


SCRIPT = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[3]))
from merging.engine import run_merge
from merging.recipes.recipe import parse_recipe
print(json.dumps(run_merge(parse_recipe(json.loads(sys.argv[1])), sys.argv[2]).digest))
"""


@pytest.mark.parametrize("method", sorted(METHODS))
def test_same_bytes_in_every_process_whatever_its_threads(tmp_path, write_family, method):
    shapes = {"blk.0.w": (96, 64), "blk.0.b": (64,), "blk.1.w": (64, 80)}
    base, models = random_family(4, seed=8, spread=0.2, shapes=shapes)
    bp, mps = write_family(base, models, "file")
    recipe = {"method": method, "base": str(bp), "models": [str(p) for p in mps], "parameters": METHODS[method][1]}
    root = Path(__file__).resolve().parent.parent
    digests = {json.loads(subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(recipe), str(tmp_path / f"o{t}"),
                                          str(t)], capture_output=True, text=True, check=True, cwd=root).stdout)
               for t in (1, 2)}
    digests.add(run_merge(parse_recipe(recipe), tmp_path / "here").digest)
    assert len(digests) == 1
