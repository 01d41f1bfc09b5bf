"""MAP: surrogate fits, the design, the Pareto search against worked examples, and the sweep end to end."""

from __future__ import annotations

import numpy as np
import pytest

from merging.errors import MergeyardError
from merging.algorithms.map import (Front, MapParams, Surrogate, _non_dominated, cross_validate, design, features, fit,
                         parse_preference, pareto_front, pick, quadratic_size, run_bayesian, run_map, run_nested)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_the_quadratic_has_n_plus_1_n_plus_2_over_2_monomials_in_a_fixed_order():
    c = np.array([[2.0, 3.0]])
    assert features(c).tolist() == [[1.0, 2.0, 3.0, 4.0, 6.0, 9.0]]  # 1, c0, c1, c0², c0c1, c1²
    assert [features(np.zeros((1, n))).shape[1] for n in (1, 2, 8)] == [quadratic_size(n) for n in (1, 2, 8)] == [3, 6, 45]


def test_the_design_mixes_isotropic_one_hot_and_space_filling_points_in_the_box():
    c = design(4, 30, 0.0, 1.0, seed=3)
    assert c.shape == (30, 4) and c.min() >= 0 and c.max() <= 1
    isotropic = [row for row in c if np.allclose(row, row[0]) and row[0] > 0]
    one_hot = [row for row in c if (row > 0).sum() == 1]
    assert len(isotropic) >= 3 and len(one_hot) == 4
    assert sorted(int(np.argmax(r)) for r in one_hot) == [0, 1, 2, 3]
    assert np.array_equal(c, design(4, 30, 0.0, 1.0, seed=3)) and not np.array_equal(c, design(4, 30, 0.0, 1.0, seed=4))


def test_a_sigmoid_of_a_quadratic_is_recovered_from_its_samples():
    rng = np.random.default_rng(0)
    c = rng.uniform(0, 1, size=(40, 3))
    # metric = σ(½cᵀAc + bᵀc + e) with a known A, b, e
    a = np.array([[-3.0, 0.5, 0.0], [0.5, -2.0, 0.3], [0.0, 0.3, -1.0]])
    b, e = np.array([2.0, 1.0, -0.5]), -0.3
    y = _sigmoid(0.5 * np.einsum("ni,ij,nj->n", c, a, c) + c @ b + e)
    s = fit(c, y, "t")
    test = rng.uniform(0, 1, size=(200, 3))
    want = _sigmoid(0.5 * np.einsum("ni,ij,nj->n", test, a, test) + test @ b + e)
    assert np.abs(s.predict(test) - want).max() < 2e-3
    r2, mae = cross_validate(c, y, "t", "sigmoid", 5, seed=0)
    assert r2 > 0.99 and mae < 2e-3
    noisy = y + rng.normal(0, 0.05, len(y))
    r2_noisy, mae_noisy = cross_validate(c, noisy, "t", "sigmoid", 5, seed=0)
    assert r2_noisy < r2 and mae_noisy > 0.02  # held-out error sees the noise the fit cannot explain


def test_non_dominated_matches_brute_force():
    rng = np.random.default_rng(1)
    f = rng.integers(0, 6, size=(40, 2)).astype(float)
    got = {tuple(f[i]) for i in _non_dominated(f)}
    want = {tuple(p) for p in f if not any((q >= p).all() and (q > p).any() for q in f)}
    assert got == want


def test_the_front_of_two_peaked_tasks_is_the_segment_between_their_peaks():
    """Task a peaks at c = (0.8, 0.2), task b at (0.2, 0.8), both isotropic bowls: every Pareto-optimal point
    lies on the segment between the peaks, and the front spans it."""
    def bowl(task, peak):
        # σ(−4‖c − p‖²) as a quadratic: −2·(2 I) in ½A, b = 8p, e = −4‖p‖²
        theta = [-4 * float(peak @ peak), 8 * peak[0], 8 * peak[1], -4.0, 0.0, -4.0]
        return Surrogate(task, "sigmoid", theta, 2)

    pa, pb = np.array([0.8, 0.2]), np.array([0.2, 0.8])
    front = pareto_front({"a": bowl("a", pa), "b": bowl("b", pb)}, 0.0, 1.0, seed=0, population=60, generations=120)
    direction = (pb - pa) / np.linalg.norm(pb - pa)
    offsets = front.coefficients - pa
    off_segment = np.abs(offsets @ np.array([-direction[1], direction[0]]))
    along = offsets @ direction
    assert off_segment.max() < 0.02
    assert along.min() < 0.05 and along.max() > np.linalg.norm(pb - pa) - 0.05
    assert (np.diff(front.predicted[:, 0]) >= 0).all() or (np.diff(front.predicted[:, 0]) <= 0).all()


def test_pick_weighs_the_predicted_metrics_and_rejects_bad_preferences():
    front = Front(np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]), np.array([[0.9, 0.2], [0.7, 0.7], [0.2, 0.9]]),
                  ["a", "b"])
    assert pick(front, {"a": 1}) == 0 and pick(front, {"b": 1}) == 2 and pick(front, {"a": 1, "b": 1}) == 1
    assert parse_preference("a=2, b=0.5") == {"a": 2.0, "b": 0.5}
    for bad in ("a", "a=x", "a=-1", "=3"):
        with pytest.raises(MergeyardError, match="task_a=2"):
            parse_preference(bad)
    with pytest.raises(MergeyardError, match="not one of"):
        pick(front, {"c": 1})
    with pytest.raises(MergeyardError, match="positive"):
        pick(front, {"a": 0})


class Synthetic:
    """Accuracy of task t rises with its own coefficient and falls with the others' (interference)."""

    def __init__(self, n):
        self.n, self.calls = n, []

    def __call__(self, vectors):
        self.calls += vectors
        out = []
        for c in np.asarray(vectors):
            out.append({f"t{i}": float(_sigmoid(3 * c[i] - 1.5 * (c.sum() - c[i]) ** 2 - 0.5 * c[i] ** 2 - 0.5))
                        for i in range(self.n)})
        return out


def test_the_three_variants_spend_their_budgets_and_find_fronts_that_trade_the_tasks_off():
    tasks = ["t0", "t1", "t2"]
    plain = run_map(ev := Synthetic(3), 3, tasks, MapParams(population=40, generations=60))
    assert len(ev.calls) == 2 * quadratic_size(3) == 20
    assert all(s.r2 > 0.9 for s in plain.surrogates.values())
    # each task's best front point favours its own coefficient
    for i, t in enumerate(tasks):
        best = plain.front.coefficients[np.argmax(plain.front.predicted[:, i])]
        assert np.argmax(best) == i
    bayes = run_bayesian(ev := Synthetic(3), 3, tasks, MapParams(population=40, generations=60))
    assert len(ev.calls) <= 20 and len(bayes.rounds) > 1
    nested = run_nested(ev := Synthetic(4), 4, [f"t{i}" for i in range(4)], MapParams(population=40, generations=60),
                        owners=[[f"t{i}"] for i in range(4)])
    assert len(ev.calls) == 12 * 3 and nested.front.coefficients.shape[1] == 4
    assert [node["level"] for node in nested.tree] == [0, 0, 1]


def test_a_front_needs_two_tasks():
    with pytest.raises(MergeyardError, match="two tasks"):
        pareto_front({"a": Surrogate("a", "sigmoid", [0, 1, 0], 1)}, 0, 1)


def test_design_points_are_distinct():
    c = design(2, 12, 0.0, 1.0, seed=0)
    assert len({tuple(np.round(r, 9)) for r in c}) == 12
