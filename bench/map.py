"""MAP on the offline zoo: surrogate error on held-out coefficients, the front against a dense grid, evaluations used.

For 2 tasks, 3 tasks and all 8 of ta8-mini (candidates: those tasks' fine-tunes), MAP samples
(n+1)(n+2) coefficient vectors (streamed task-arithmetic merges scored on the suite, the product's own
`evaluate_sample`, cached in a lineage DB under bench/.work/map-home), fits a quadratic surrogate per
task and searches them with NSGA-III. Then:

  * held-out error: 20 fresh random coefficient vectors, evaluated for real, against the surrogates;
  * for 2 tasks, a dense 21×21 grid of the real metric: its Pareto front against MAP's front points
    evaluated for real (IGD: mean distance from each grid-front point to the nearest MAP point, in
    accuracy points; hypervolume of each, from the origin), and the evaluations each needed;
  * for 8 tasks, also the bayesian and nested variants.

    .venv/bin/python bench/map.py [--zoo DIR] [--grid 21] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / ".work"


def hypervolume_2d(points: np.ndarray) -> float:
    """Area dominated by a set of (a, b) points (higher is better) above the origin."""
    pts = points[np.argsort(-points[:, 0])]
    area, best_b = 0.0, 0.0
    for a, b in pts:
        if b > best_b:
            area += a * (b - best_b)
            best_b = b
    return area


def non_dominated(f: np.ndarray) -> np.ndarray:
    return np.array([i for i in range(len(f)) if not np.any(np.all(f >= f[i], 1) & np.any(f > f[i], 1))])


def main() -> None:
    from evaluation.suites import load_suite
    from evaluation.zoo.build import build_zoo
    from evaluation.zoo.tasks import TA8_MINI
    from flows.map_steps import evaluate_sample
    from merging.algorithms.map import MapParams, run_bayesian, run_map, run_nested
    from registry.registry import Registry, RegistryConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=WORK / "zoo-full")
    ap.add_argument("--grid", type=int, default=21)
    ap.add_argument("--held-out", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="2 and 3 tasks only")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    manifest = build_zoo(args.zoo)
    home = WORK / "map-home"
    registry = Registry(RegistryConfig(database_url=f"sqlite:///{home / 'lineage.db'}", store_root=home / "store",
                                       scratch=home / "tmp", mlflow_tracking_uri=None, mlflow_artifact_root=home / "ml"))
    base = registry.ingest(str(args.zoo / manifest["base"]["path"]))[0].digest
    digests = {t: registry.ingest(str(args.zoo / manifest["finetuned"][t]["path"]))[0].digest for t in TA8_MINI}
    cases = [("2 tasks", ["digits", "letters"]), ("3 tasks", ["digits", "letters", "textures"])]
    if not args.quick:
        cases.append(("8 tasks", list(TA8_MINI)))
    report, rows = {}, []
    for label, tasks in cases:
        suite = load_suite("ta8-mini", str(args.zoo / "manifest.json")).subset(tasks)
        candidates = [digests[t] for t in tasks]
        counter = {"new": 0, "reused": 0, "seconds": 0.0}

        def evaluate(vectors):
            out = []
            for v in vectors:
                t0 = time.perf_counter()
                metrics, reused = evaluate_sample(registry, suite, base, candidates, [float(x) for x in v])
                counter["reused" if reused else "new"] += 1
                counter["seconds"] += time.perf_counter() - t0
                out.append(metrics["accuracy"])
            return out

        n = len(tasks)
        rng = np.random.default_rng(99)
        held = rng.uniform(0, 1, size=(args.held_out, n))
        real_held = evaluate(held.tolist())
        variants = {"MAP": run_map}
        if n >= 6:
            variants.update({"MAP bayesian": run_bayesian,
                             "MAP nested": lambda ev, n, t, p: run_nested(ev, n, t, p, owners=[[x] for x in t])})
        for name, fn in variants.items():
            started = time.perf_counter()
            before = sum(counter[k] for k in ("new", "reused"))
            run = fn(evaluate, n, tasks, MapParams())
            used = sum(counter[k] for k in ("new", "reused")) - before
            errs = {}
            for t in tasks:
                y = np.array([m[t] for m in real_held])
                p = run.surrogates[t].predict(held) if name != "MAP nested" else None
                if p is None:
                    continue
                errs[t] = {"r2": float(1 - ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum()),
                           "mae": float(np.abs(y - p).mean())}
            row = {"case": label, "variant": name, "evaluations": used, "front_points": len(run.front.coefficients),
                   "seconds": round(time.perf_counter() - started, 1), "held_out": errs,
                   "cv": {t: {"r2": s.r2, "mae": s.mae} for t, s in run.surrogates.items()}}
            if n == 2 and name == "MAP":
                idx = np.linspace(0, len(run.front.coefficients) - 1, min(12, len(run.front.coefficients))).astype(int)
                measured = np.array([[m[t] for t in tasks] for m in evaluate(run.front.coefficients[idx].tolist())])
                axis = np.linspace(0, 1, args.grid)
                grid = [[a, b] for a in axis for b in axis]
                t0 = time.perf_counter()
                real = np.array([[m[t] for t in tasks] for m in evaluate(grid)])
                grid_front = real[non_dominated(real)]
                igd = float(np.mean([np.min(np.linalg.norm(measured - g, axis=1)) for g in grid_front]))
                row.update({"grid_evaluations": len(grid), "grid_seconds": round(time.perf_counter() - t0, 1),
                            "igd_points": 100 * igd, "hv_map": hypervolume_2d(measured),
                            "hv_grid": hypervolume_2d(grid_front),
                            "map_best": {t: float(measured[:, i].max()) for i, t in enumerate(tasks)},
                            "grid_best": {t: float(real[:, i].max()) for i, t in enumerate(tasks)}})
            rows.append(row)
            print(json.dumps(row), flush=True)
        report[label] = {"samples": counter}
    print("\nMAP on ta8-mini tasks (accuracy; errors in accuracy points)")
    print(f"{'case':<9}{'variant':<14}{'evals':>6}{'front':>7}{'CV R²':>8}{'CV MAE':>8}{'held-out R²':>13}"
          f"{'held-out MAE':>14}")
    for r in rows:
        cv_r2 = np.mean([v["r2"] for v in r["cv"].values() if v["r2"] is not None])
        cv_mae = 100 * np.mean([v["mae"] for v in r["cv"].values()])
        ho = r["held_out"]
        ho_r2 = f"{np.mean([v['r2'] for v in ho.values()]):.3f}" if ho else "—"
        ho_mae = f"{100 * np.mean([v['mae'] for v in ho.values()]):.2f}" if ho else "—"
        print(f"{r['case']:<9}{r['variant']:<14}{r['evaluations']:>6}{r['front_points']:>7}{cv_r2:>8.3f}{cv_mae:>8.2f}"
              f"{ho_r2:>13}{ho_mae:>14}")
    for r in rows:
        if "grid_evaluations" in r:
            print(f"\n2 tasks against a {args.grid}×{args.grid} grid of the real metric: MAP used {r['evaluations']} "
                  f"evaluations (+{min(12, r['front_points'])} to measure its front), the grid {r['grid_evaluations']}")
            print(f"  IGD from the grid's front to MAP's measured front: {r['igd_points']:.2f} accuracy points")
            print(f"  hypervolume: MAP {r['hv_map']:.4f}, grid {r['hv_grid']:.4f} ({100 * r['hv_map'] / r['hv_grid']:.1f}%)")
            print("  best per task, MAP vs grid: " + ", ".join(
                f"{t} {100 * r['map_best'][t]:.1f} vs {100 * r['grid_best'][t]:.1f}" for t in r["map_best"]))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, **report}, indent=2, default=str))


if __name__ == "__main__":
    main()
