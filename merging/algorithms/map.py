"""MAP (Li et al., arXiv 2406.07529): Pareto fronts of task-arithmetic coefficients from quadratic surrogates.

A merge θ(c) = θ_base + Σ_i c_i τ_i trades the tasks off against each other.
MAP evaluates a few coefficient vectors for real, fits per task a quadratic
surrogate of the metric through a link,

    metric_t(c) ≈ link(½ cᵀA_t c + b_tᵀc + e_t)      (sigmoid for accuracy, softplus for a loss)

and searches the surrogates, not the models, for the Pareto front (NSGA-III,
from pymoo). A quadratic in n coefficients has (n+1)(n+2)/2 parameters; the
default design is twice that many points, a mix of isotropic (all c_i equal),
one-hot (one task vector alone), perturbed-isotropic and space-filling
(Latin hypercube) points in the coefficient box.

Two variants: `bayesian` starts from half the design and adds, round by
round, the front points where a bootstrap ensemble of surrogates disagrees
most; `nested` (for many tasks) merges pairwise in a tree, each node a
two-coefficient search, so the evaluations grow linearly with the tasks.

This module is numerical only (numpy, scipy, pymoo): evaluating a point, by a
streamed merge and a suite evaluation, is the caller's `evaluate` callback.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import least_squares
from scipy.stats import qmc

from merging.errors import MergeyardError, PreferenceError

Link = Literal["sigmoid", "softplus", "identity"]
# coefficient vectors → per vector, {task: metric}
Evaluate = Callable[[list[list[float]]], list[dict[str, float]]]


class MapParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    low: float = Field(0.0, description="smallest coefficient")
    high: float = Field(1.0, gt=0, description="largest coefficient")
    samples: int | None = Field(None, ge=3, description="real evaluations (default (n+1)(n+2), twice the surrogate's size)")
    seed: int = Field(0, description="sampling, folds, bootstrap and NSGA-III all derive from it")
    folds: int = Field(5, ge=2, description="cross-validation folds for the held-out error")
    population: int = Field(100, ge=8, description="NSGA-III population")
    generations: int = Field(150, ge=1, description="NSGA-III generations")
    bayesian_rounds: int = Field(4, ge=1, description="bayesian: rounds of adaptive samples after the initial half")
    ensemble: int = Field(8, ge=2, description="bayesian: bootstrap surrogates that estimate uncertainty")


def quadratic_size(n: int) -> int:
    return (n + 1) * (n + 2) // 2


def features(c: np.ndarray) -> np.ndarray:
    """[1, c_i, c_i·c_j (i ≤ j)]: the quadratic's monomials, one row per coefficient vector."""
    c = np.atleast_2d(np.asarray(c, dtype=np.float64))
    i, j = np.triu_indices(c.shape[1])
    return np.concatenate([np.ones((len(c), 1)), c, c[:, i] * c[:, j]], axis=1)


def design(n: int, count: int, low: float, high: float, seed: int) -> np.ndarray:
    """`count` coefficient vectors in [low, high]^n: isotropic, one-hot, perturbed isotropic, Latin hypercube."""
    rng = np.random.default_rng([seed, 2406])
    span = high - low
    iso_count = max(2, count // 8)
    points = [np.full(n, low + span * (k + 1) / (iso_count + 1)) for k in range(iso_count)]
    for i in range(n):  # one task vector at a time, at a random strength in the upper half
        if len(points) < count // 2:
            v = np.full(n, low)
            v[i] = low + span * rng.uniform(0.5, 1.0)
            points.append(v)
    for _ in range(max(0, count // 4)):
        centre = low + span * rng.uniform(0.1, 0.6)
        points.append(np.clip(centre + rng.normal(0, span / 6, n), low, high))
    rest = count - len(points)
    if rest > 0:
        points += list(low + span * qmc.LatinHypercube(d=n, seed=rng).random(rest))
    return np.asarray(points[:count])


def _link(z: np.ndarray, link: Link) -> np.ndarray:
    if link == "sigmoid":
        return 1 / (1 + np.exp(-z))
    if link == "softplus":
        return np.logaddexp(0, z)
    return z


def _inverse(y: np.ndarray, link: Link) -> np.ndarray:
    if link == "sigmoid":
        y = np.clip(y, 1e-3, 1 - 1e-3)
        return np.log(y / (1 - y))
    if link == "softplus":
        y = np.maximum(y, 1e-3)
        return np.log(np.expm1(y))
    return y


@dataclass
class Surrogate:
    task: str
    link: Link
    theta: list[float]  # weights of `features`: e, b_i, then the upper triangle of ½A (i ≤ j)
    n: int
    r2: float | None = None  # cross-validated, on samples the fit did not see
    mae: float | None = None
    samples: int = 0

    def predict(self, c: np.ndarray) -> np.ndarray:
        return _link(features(c) @ np.asarray(self.theta), self.link)

    def as_dict(self) -> dict:
        return asdict(self)


def fit(c: np.ndarray, y: np.ndarray, task: str, link: Link = "sigmoid", ridge: float = 1e-6) -> Surrogate:
    """Least squares in the metric's own units (not the link's), started from a linear fit through the inverse
    link; a small ridge keeps the quadratic terms finite when the design barely constrains them."""
    phi = features(c)
    z = _inverse(np.asarray(y, dtype=np.float64), link)
    start = np.linalg.solve(phi.T @ phi + ridge * np.eye(phi.shape[1]), phi.T @ z)
    if link == "identity":
        theta = start
    else:
        def residual(theta):
            return np.concatenate([_link(phi @ theta, link) - y, np.sqrt(ridge) * theta[1:]])

        theta = least_squares(residual, start, method="lm" if len(y) > len(start) else "trf").x
    return Surrogate(task, link, theta.tolist(), c.shape[1], samples=len(y))


def cross_validate(c: np.ndarray, y: np.ndarray, task: str, link: Link, folds: int, seed: int) -> tuple[float, float]:
    """R² and mean absolute error of surrogates fitted without the fold they predict."""
    order = np.random.default_rng([seed, 5]).permutation(len(y))
    predicted = np.empty(len(y))
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        predicted[test] = fit(c[train], y[train], task, link).predict(c[test])
    residual = ((y - predicted) ** 2).sum()
    total = ((y - y.mean()) ** 2).sum()
    return (1 - residual / total if total > 0 else float("nan")), float(np.abs(y - predicted).mean())


def fit_all(c: np.ndarray, metrics: list[dict[str, float]], tasks: Sequence[str], link: Link, folds: int,
            seed: int) -> dict[str, Surrogate]:
    out = {}
    for t in tasks:
        y = np.array([m[t] for m in metrics])
        s = fit(c, y, t, link)
        s.r2, s.mae = cross_validate(c, y, t, link, min(folds, len(y)), seed)
        out[t] = s
    return out


@dataclass
class Front:
    coefficients: np.ndarray  # points × n
    predicted: np.ndarray  # points × tasks (the metric, higher is better for accuracy)
    tasks: list[str]

    def points(self) -> list[dict]:
        return [{"coefficients": [round(float(x), 6) for x in c],
                 "predicted": {t: float(v) for t, v in zip(self.tasks, p)}} for c, p in zip(self.coefficients, self.predicted)]


def pareto_front(surrogates: dict[str, Surrogate], low: float, high: float, *, seed: int = 0, population: int = 100,
                 generations: int = 150, maximize: bool = True) -> Front:
    """NSGA-III on the surrogates: the non-dominated coefficient vectors in the box."""
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.core.problem import Problem
    from pymoo.optimize import minimize
    from pymoo.util.ref_dirs import get_reference_directions

    tasks = list(surrogates)
    n = next(iter(surrogates.values())).n
    sign = -1.0 if maximize else 1.0

    class OnSurrogates(Problem):
        def __init__(self):
            super().__init__(n_var=n, n_obj=len(tasks), xl=np.full(n, low), xu=np.full(n, high))

        def _evaluate(self, x, out, *args, **kwargs):
            out["F"] = sign * np.stack([surrogates[t].predict(x) for t in tasks], axis=1)

    if len(tasks) == 1:
        raise MergeyardError("a Pareto front needs at least two tasks")
    partitions = population - 1 if len(tasks) == 2 else max(2, {3: 12, 4: 6, 5: 4}.get(len(tasks), 3))
    ref_dirs = get_reference_directions("das-dennis", len(tasks), n_partitions=partitions)
    algorithm = NSGA3(pop_size=max(population, len(ref_dirs)), ref_dirs=ref_dirs)
    res = minimize(OnSurrogates(), algorithm, ("n_gen", generations), seed=seed, verbose=False)
    x = np.atleast_2d(res.X)

    def better(z: np.ndarray) -> np.ndarray:  # the objectives, higher is better
        return -sign * np.array([surrogates[t].predict(z)[0] for t in tasks])

    x = np.array([_polish(p, better, low, high) for p in x])
    scores = np.stack([better(p) for p in x])
    keep = _non_dominated(scores)
    x, f = x[keep], -sign * scores[keep]
    order = np.lexsort(f.T[::-1])
    return Front(x[order], f[order], tasks)


def _polish(x: np.ndarray, predict: Callable[[np.ndarray], np.ndarray], low: float, high: float) -> np.ndarray:
    """An evolutionary search stops near the front, not on it: move each point to one that is at least as good
    on every task and best in sum (SLSQP on the smooth surrogates), so the front is Pareto-optimal there."""
    from scipy.optimize import minimize as local

    floor = predict(x)
    res = local(lambda z: -predict(z).sum(), x, method="SLSQP", bounds=[(low, high)] * len(x),
                constraints=[{"type": "ineq", "fun": lambda z: predict(z) - floor}], options={"maxiter": 100})
    z = np.clip(res.x, low, high)
    return z if np.all(predict(z) >= floor - 1e-6) else x  # SLSQP meets constraints to ~1e-8, not exactly


def _non_dominated(f: np.ndarray) -> np.ndarray:
    """Indices of rows no other row beats on every objective (higher is better), duplicates once."""
    keep = []
    for i in range(len(f)):
        dominated = np.any(np.all(f >= f[i], axis=1) & np.any(f > f[i], axis=1))
        if not dominated and not any(np.allclose(f[i], f[j]) for j in keep):
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def pick(front: Front, preference: dict[str, float]) -> int:
    """The front point that maximises the preference-weighted mean of the predicted metrics."""
    unknown = sorted(set(preference) - set(front.tasks))
    if unknown:
        raise PreferenceError(f"the preference names task {unknown[0]!r}, not one of the front's: {', '.join(front.tasks)}")
    w = np.array([preference.get(t, 0.0) for t in front.tasks], dtype=np.float64)
    if w.sum() <= 0:
        raise PreferenceError("a preference needs at least one positive weight, e.g. 'digits=2,letters=1'")
    return int(np.argmax(front.predicted @ (w / w.sum())))


def parse_preference(text: str) -> dict[str, float]:
    """'task_a=2,task_b=1' → {task_a: 2.0, task_b: 1.0}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip() or out.get(name.strip(), 0) < 0:
            raise PreferenceError(f"preference {text!r}: write non-negative weights as 'task_a=2,task_b=1'")
    return out


@dataclass
class MapRun:
    """Every real evaluation made, the surrogates fitted on all of them, and the front found on those."""

    samples: np.ndarray
    metrics: list[dict[str, float]]
    surrogates: dict[str, Surrogate]
    front: Front
    rounds: list[int] = field(default_factory=list)  # evaluations added per round (bayesian, nested levels)
    tree: list[dict] = field(default_factory=list)  # nested: each node's pair and chosen point


def run_map(evaluate: Evaluate, n: int, tasks: Sequence[str], params: MapParams | None = None,
            link: Link = "sigmoid") -> MapRun:
    params = params or MapParams()
    count = params.samples or 2 * quadratic_size(n)
    c = design(n, count, params.low, params.high, params.seed)
    metrics = evaluate(c.tolist())
    surrogates = fit_all(c, metrics, tasks, link, params.folds, params.seed)
    front = pareto_front(surrogates, params.low, params.high, seed=params.seed, population=params.population,
                         generations=params.generations)
    return MapRun(c, metrics, surrogates, front, [count])


def run_bayesian(evaluate: Evaluate, n: int, tasks: Sequence[str], params: MapParams | None = None,
                 link: Link = "sigmoid") -> MapRun:
    """Half the design first; then each round evaluates the front points where bootstrap surrogates disagree
    most, so real evaluations go where the front is uncertain, until the same budget is spent."""
    params = params or MapParams()
    budget = params.samples or 2 * quadratic_size(n)
    first = max(quadratic_size(n) + 1, budget // 2)
    c = design(n, first, params.low, params.high, params.seed)
    metrics = evaluate(c.tolist())
    rounds = [first]
    rng = np.random.default_rng([params.seed, 77])
    per_round = max(1, (budget - first) // params.bayesian_rounds)
    for r in range(params.bayesian_rounds):
        if len(c) >= budget:
            break
        surrogates = fit_all(c, metrics, tasks, link, params.folds, params.seed)
        front = pareto_front(surrogates, params.low, params.high, seed=params.seed + r + 1,
                             population=params.population, generations=params.generations)
        spread = np.zeros(len(front.coefficients))
        for _ in range(params.ensemble):
            idx = rng.integers(len(c), size=len(c))
            for t in tasks:
                y = np.array([m[t] for m in metrics])
                boot = fit(c[idx], y[idx], t, link)
                spread += (boot.predict(front.coefficients) - surrogates[t].predict(front.coefficients)) ** 2
        take = min(per_round, budget - len(c))
        chosen = front.coefficients[np.argsort(-spread)[:take]]
        metrics += evaluate(chosen.tolist())
        c = np.concatenate([c, chosen])
        rounds.append(len(chosen))
    surrogates = fit_all(c, metrics, tasks, link, params.folds, params.seed)
    front = pareto_front(surrogates, params.low, params.high, seed=params.seed, population=params.population,
                         generations=params.generations)
    return MapRun(c, metrics, surrogates, front, rounds)


def run_nested(evaluate: Evaluate, n: int, tasks: Sequence[str], params: MapParams | None = None,
               link: Link = "sigmoid", owners: Sequence[Sequence[str]] | None = None,
               preference: dict[str, float] | None = None) -> MapRun:
    """Pairwise in a tree: each node searches two coefficients (a, b) for θ_base + a·u_left + b·u_right, where
    u is what its subtrees chose (a leaf is one task vector), on the tasks its candidates own, and passes
    a*·u_left + b*·u_right up; the root's front, over every task, is the result. Real evaluations:
    12 per node, 12·(n − 1) in all, against (n+1)(n+2) for the flat search."""
    params = params or MapParams()
    owners = [list(o) for o in owners] if owners else [list(tasks)] * n
    weights = preference or {t: 1.0 for t in tasks}
    nodes = [(np.eye(n)[i], list(owners[i])) for i in range(n)]  # (coefficient vector of u, tasks it serves)
    all_c: list[np.ndarray] = []
    all_metrics: list[dict[str, float]] = []
    rounds, tree = [], []
    per_node = params.samples or 2 * quadratic_size(2)
    level = 0
    while len(nodes) > 1:
        nxt = []
        for k in range(0, len(nodes) - 1, 2):
            (left, lt), (right, rt) = nodes[k], nodes[k + 1]
            served = list(dict.fromkeys(lt + rt))
            ab = design(2, per_node, params.low, params.high, params.seed + 31 * level + k)
            full = ab[:, :1] * left + ab[:, 1:] * right
            metrics = evaluate(full.tolist())
            all_c += list(full)
            all_metrics += metrics
            rounds.append(len(full))
            root = len(nodes) == 2
            surrogates = fit_all(ab, metrics, list(tasks) if root else served, link, params.folds, params.seed)
            front = pareto_front(surrogates, params.low, params.high, seed=params.seed, population=params.population,
                                 generations=params.generations)
            chosen = pick(front, {t: weights.get(t, 0.0) for t in front.tasks if weights.get(t, 0.0) > 0}
                          or {t: 1.0 for t in front.tasks})
            a, b = front.coefficients[chosen]
            tree.append({"level": level, "left": left.round(6).tolist(), "right": right.round(6).tolist(),
                         "tasks": served, "chosen": [float(a), float(b)], "samples": len(full)})
            if root:
                expanded = front.coefficients[:, :1] * left + front.coefficients[:, 1:] * right
                return MapRun(np.asarray(all_c), all_metrics, surrogates, Front(expanded, front.predicted, front.tasks),
                              rounds, tree)
            nxt.append((a * left + b * right, served))
        if len(nodes) % 2:
            nxt.append(nodes[-1])
        nodes = nxt
        level += 1
    raise MergeyardError("the nested variant needs at least two candidates")
