"""FW-Merging on the offline TA8 miniature: against averaging, task arithmetic and TIES, with irrelevant
candidates added to the pool.

Needs the full zoo (22 fine-tunes; `mergeyard zoo build --out bench/.work/zoo-full`, about 9 minutes on
2 CPU cores, reused when present). Every merge goes through the engine (`run_merge`) with the objective
the flows build, and is scored on ta8-mini's test split (normalised by each task's own fine-tune).
Pools: the 8 target fine-tunes; with 8 and 14 fine-tunes of other tasks added (irrelevant candidates);
with fine-tunes of the same 8 tasks from other seeds added (more relevant candidates, built under
zoo-full/extra/ on first use).

    .venv/bin/python bench/fw_ta8.py [--quick] [--more-seeds 1,2] [--pools 'more relevant'] [--methods 'scale,ties']
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "bench" / ".work" / "zoo-full"


def main() -> None:
    from evaluation.evaluator import evaluate_checkpoint
    from evaluation.suites import load_suite
    from evaluation.zoo.build import build_zoo
    from evaluation.zoo.tasks import TA8_MINI, TASKS
    from flows.merge import data_builder
    from merging.engine import run_merge
    from merging.recipes.recipe import parse_recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the 8-relevant pool")
    ap.add_argument("--more-seeds", default="1", help="seeds of the extra relevant fine-tunes (experiment 3)")
    ap.add_argument("--pools", default="", help="only the pools whose name contains one of these (comma-separated)")
    ap.add_argument("--methods", default="", help="only the methods whose label contains one of these")
    args = ap.parse_args()
    from evaluation.zoo.build import build_extra_finetunes

    manifest = build_zoo(ZOO)
    suite = load_suite("ta8-mini", str(ZOO / "manifest.json"))
    base = str(ZOO / "base")
    relevant = [str(ZOO / "finetuned" / t) for t in TA8_MINI]
    irrelevant = [str(ZOO / "finetuned" / t) for t in TASKS if t not in TA8_MINI]
    seeds = [int(x) for x in args.more_seeds.split(",") if x]
    more = [str(p) for p in build_extra_finetunes(ZOO, list(TA8_MINI), seeds).values()] if seeds else []
    pools = {"8 relevant": relevant, "8 + 8 irrelevant": relevant + irrelevant[:8],
             f"8 + {len(irrelevant)} irrelevant": relevant + irrelevant}
    if more:
        pools[f"8 + {len(more)} more relevant"] = relevant + more
    if args.quick:
        pools = {"8 relevant": relevant}
    if args.pools:
        pools = {k: v for k, v in pools.items() if any(w in k for w in args.pools.split(","))}
    n_tasks, lam = len(TA8_MINI), 0.3
    kappa = n_tasks * lam  # atoms θ_base + κ·τ_i: the hull's centre is task arithmetic at λ = 0.3
    fw = {"suite": "ta8-mini"}
    methods = {
        "average": ("average", {}),
        "task_arithmetic λ0.3": ("task_arithmetic", {"lambda": 0.3}),
        "ties d0.2 λ0.5 sum": ("ties", {"density": 0.2, "lambda": 0.5, "aggregate": "sum"}),
        "fw_hard (issue defaults)": ("fw_hard", fw),
        "fw_hard step 1": ("fw_hard", {**fw, "step_size": 1.0}),
        "fw_hard step 1, TA init": ("fw_hard", {**fw, "step_size": 1.0, "init": "task_arithmetic"}),
        f"fw_hard step 1, scale {kappa:g}": ("fw_hard", {**fw, "step_size": 1.0, "scale": kappa}),
        f"fw_hard step 1, TA init, scale {kappa:g}": ("fw_hard", {**fw, "step_size": 1.0, "init": "task_arithmetic",
                                                              "scale": kappa}),
        "fw_hard step 1, layer, TIES inner": ("fw_hard", {**fw, "step_size": 1.0, "inner": "ties", "density": 0.5}),
        "fw_soft": ("fw_soft", {**fw, "iterations": 5, "step_size": 1.0, "adam_steps": 15, "adam_lr": 0.05}),
        f"fw_soft, scale {kappa:g}": ("fw_soft", {**fw, "iterations": 5, "step_size": 1.0, "adam_steps": 15,
                                                  "adam_lr": 0.05, "scale": kappa}),
    }
    if args.methods:
        methods = {k: v for k, v in methods.items() if any(w in k for w in args.methods.split(","))}
    rows = []
    work = Path(tempfile.mkdtemp(prefix="fw-ta8-"))
    try:
        zs = evaluate_checkpoint(ZOO / "base", suite)
        ft = sum(manifest["finetuned"][t]["accuracy"] for t in TA8_MINI) / len(TA8_MINI)
        for pool_name, models in pools.items():
            for label, (method, params) in methods.items():
                started = time.perf_counter()
                recipe = parse_recipe({"method": method, "base": base, "models": models, "parameters": params})
                out = work / f"{len(rows)}"
                run_merge(recipe, out, data=data_builder("cpu"))
                result = evaluate_checkpoint(out, suite)
                rows.append({"pool": pool_name, "method": label, "seconds": time.perf_counter() - started,
                             "avg": result.average_accuracy, "norm": result.average_normalized_accuracy,
                             "tasks": {t.task: t.accuracy for t in result.tasks}})
                shutil.rmtree(out)
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nta8-mini (8 tasks): zero-shot {100 * zs.average_accuracy:.1f}, fine-tuned (own task) {100 * ft:.1f}")
    header = f"{'pool':<20} {'method':<36} " + " ".join(f"{t[:7]:>7}" for t in TA8_MINI) + f" {'avg':>6} {'norm':>6} {'s':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['pool']:<20} {r['method']:<36} " + " ".join(f"{100 * r['tasks'][t]:>7.1f}" for t in TA8_MINI) +
              f" {100 * r['avg']:>6.1f} {100 * (r['norm'] or 0):>6.1f} {r['seconds']:>6.1f}")


if __name__ == "__main__":
    main()
