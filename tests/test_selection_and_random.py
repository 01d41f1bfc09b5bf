"""Exact rank selection and the counter-based random numbers, against plain computations."""

from __future__ import annotations

import pytest
import torch

import dense_reference as ref
from merging.algorithms.random_mask import stream_key, uniform
from merging.algorithms.selection import RankSelector


def select(values: torch.Tensor, rank: int, pieces: int) -> RankSelector:
    sel = RankSelector(rank, values.numel())
    chunks = values.abs().chunk(pieces)
    for c in chunks:
        sel.feed_coarse(c)
    sel.settle_coarse()
    for c in reversed(chunks):  # order of the second pass does not matter
        sel.feed_fine(c)
    sel.settle_fine()
    return sel


@pytest.mark.parametrize("kind", ["normal", "tiny", "ties", "zeros", "huge-range"])
def test_rank_selector_matches_sort(kind):
    g = torch.Generator().manual_seed(0)
    n = 5000
    values = {
        "normal": torch.randn(n, generator=g),
        "tiny": torch.randn(n, generator=g) * 1e-30,  # subnormal neighbourhood
        "ties": torch.randint(-3, 4, (n,), generator=g).float() * 0.25,
        "zeros": torch.zeros(n),
        "huge-range": torch.randn(n, generator=g) * torch.logspace(-20, 20, n),
    }[kind]
    ordered = torch.sort(values.abs()).values
    for rank in (1, 2, n // 3, n // 2, n - 1, n):
        sel = select(values, rank, pieces=7)
        want = ordered[rank - 1]
        assert sel.value == float(want), (kind, rank)
        assert sel.n_less == int((values.abs() < want).sum())
        assert sel.n_equal == int((values.abs() == want).sum())
        assert sel.n_greater == int((values.abs() > want).sum())


def test_rank_selector_rejects_bad_rank_and_short_feed():
    with pytest.raises(ValueError):
        RankSelector(0, 10)
    sel = RankSelector(1, 10)
    sel.feed_coarse(torch.ones(5))
    with pytest.raises(RuntimeError, match="fed 5"):
        sel.settle_coarse()


def test_uniform_matches_python_integer_definition():
    key = stream_key(7, 0, "blk.0.w")
    for offset in (0, 12345, (1 << 33) + 5):  # the last one exercises the high index word
        got = uniform(key, offset, 64)
        want = torch.tensor([ref.uniform_at(key, offset + j) for j in range(64)], dtype=torch.float32)
        assert torch.equal(got, want)


def test_uniform_is_chunking_invariant_and_uniform():
    key = stream_key(1, 2, "x")
    whole = uniform(key, 0, 1_000_000)
    pieces = torch.cat([uniform(key, o, 1000) for o in range(0, 1_000_000, 1000)])
    assert torch.equal(whole, pieces)
    assert 0.0 <= float(whole.min()) and float(whole.max()) < 1.0
    assert abs(float(whole.mean()) - 0.5) < 2e-3
    hist = torch.histc(whole, bins=10, min=0, max=1) / whole.numel()
    assert float((hist - 0.1).abs().max()) < 3e-3
    assert not torch.equal(whole[:1000], uniform(stream_key(1, 3, "x"), 0, 1000))


def test_all_finite_fast_path_and_overflow_fallback():
    from merging.checkpoints.finite import all_finite

    assert all_finite(torch.randn(1000))
    big = torch.full((1000,), 3e38)  # finite, but the sum overflows: must fall back to the exact check
    assert all_finite(big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(1000)
        t[567] = bad
        assert not all_finite(t)
        assert not all_finite(t.half()) and not all_finite(t.bfloat16())
    mixed = torch.tensor([float("inf"), float("-inf")])  # sums to NaN
    assert not all_finite(mixed)
    assert all_finite(torch.arange(5))  # integers are always finite
