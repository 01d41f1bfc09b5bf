"""The offline TA8 miniature, measured the way FusionBench reports TA8.

    python bench/ta8_mini.py                 # builds (or reuses) the full zoo under MERGEYARD_HOME/zoo
    python bench/ta8_mini.py --zoo DIR --lambdas 0.1,0.3,0.5
    python bench/ta8_mini.py --zoo DIR --seed 1    # a zoo built from another seed (other data, other fine-tunes)

Prints: zero-shot and individual fine-tuned accuracy per task, the cross-task
matrix (each fine-tune on every task: forgetting), then weight averaging, task
arithmetic and TIES (mean and sum; over a density grid 0.1-1 too) over a λ grid, each merged by the streaming
engine from the eight target fine-tunes, with the acceptance checks of the
issue: zero-shot ≤ 65, every fine-tune ≥ 90 on its task, averaging < task
arithmetic (best λ) < TIES (best λ, both variants), all ≥ zero-shot + 10;
then each of those orderings paired over the same test images, with its
standard error (evaluation/paired.py), so a margin can be read against what
the test split resolves.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evaluation.evaluator import SuiteResult, evaluate_checkpoint  # noqa: E402
from evaluation.paired import paired_difference  # noqa: E402
from evaluation.suites import load_suite  # noqa: E402
from evaluation.zoo.build import build_zoo  # noqa: E402
from evaluation.zoo.tasks import TA8_MINI  # noqa: E402
from merging.engine import run_merge  # noqa: E402
from merging.recipes.recipe import parse_recipe  # noqa: E402


def pct(x: float) -> str:
    return f"{100 * x:5.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=None, help="zoo directory (default MERGEYARD_HOME/zoo; built if missing)")
    ap.add_argument("--lambdas", default=",".join(f"{x / 20:.2f}" for x in range(1, 21)))
    # density 1 keeps every entry: TIES's sign election and disjoint merge alone
    ap.add_argument("--densities", default="0.1,0.2,0.4,0.6,0.8,1.0", help="TIES densities searched with λ")
    ap.add_argument("--seed", type=int, default=0,
                    help="the zoo's build seed (data and fine-tunes; `mergeyard zoo build --seed S`)")
    ap.add_argument("--test-seed", type=int, default=0,
                    help="seed of the test split (1, 2, ...: other images than the fine-tunes were measured on)")
    ap.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = ap.parse_args()
    from flows.settings import get_settings

    zoo = args.zoo or get_settings().zoo_dir
    started = time.perf_counter()
    manifest = build_zoo(zoo, seed=args.seed)
    print(f"zoo: {zoo} (built or reused in {time.perf_counter() - started:.0f} s)")
    suite = load_suite("ta8-mini", str(zoo / "manifest.json"), seed=args.test_seed)
    base = zoo / manifest["base"]["path"]
    finetuned = {t: zoo / manifest["finetuned"][t]["path"] for t in TA8_MINI}

    def accuracies(result: SuiteResult) -> dict[str, float]:
        return {t.task: t.accuracy for t in result.tasks}

    def score(path) -> dict[str, float]:
        return accuracies(evaluate_checkpoint(path, suite))

    rows: dict[str, dict[str, float]] = {"pre-trained (zero-shot)": score(base)}
    matrix = {t: score(p) for t, p in finetuned.items()}
    rows["individual fine-tuned"] = {t: matrix[t][t] for t in TA8_MINI}

    lambdas = [float(x) for x in args.lambdas.split(",")]
    densities = [float(x) for x in args.densities.split(",")]
    # every merge's full result, with which test images it got right: the checks pair them image by image
    grid: dict[str, dict[tuple, SuiteResult]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def merge(method: str, params: dict) -> SuiteResult:
            recipe = parse_recipe({"method": method, "base": str(base), "models": [str(p) for p in finetuned.values()],
                                   "parameters": params})
            out = Path(tmp) / "merged"
            run_merge(recipe, out, overwrite=True)
            return evaluate_checkpoint(out, suite)

        averaging = merge("average", {})
        rows["weight averaging"] = accuracies(averaging)
        grid["task arithmetic"] = {(None, lam): merge("task_arithmetic", {"lambda": lam}) for lam in lambdas}
        for label, aggregate in (("TIES (mean)", "mean"), ("TIES (sum)", "sum")):
            grid[label] = {(d, lam): merge("ties", {"density": d, "aggregate": aggregate, "lambda": lam})
                           for d in densities for lam in lambdas}
    averages = {label: {key: r.average_accuracy for key, r in g.items()} for label, g in grid.items()}
    best = {label: max(a, key=a.get) for label, a in averages.items()}
    for label, (density, lam) in best.items():
        at = f"λ={lam:g}" + (f", density {density:g}" if density is not None else "")
        rows[f"{label} (best {at})"] = accuracies(grid[label][(density, lam)])
    best_result = {label: grid[label][key] for label, key in best.items()}
    # b − a over the same test images, ± its standard error: how much of each ordering the test split resolves
    paired = {"task arithmetic − weight averaging": paired_difference(averaging, best_result["task arithmetic"]),
              **{f"{v} − task arithmetic": paired_difference(best_result["task arithmetic"], best_result[v])
                 for v in ("TIES (mean)", "TIES (sum)")}}

    def avg(scores: dict[str, float]) -> float:
        return sum(scores.values()) / len(scores)

    width = max(len(label) for label in rows) + 2  # the best λ and density lengthen TIES's labels
    header = f"{'method':<{width}}" + "".join(f"{t[:8]:>9}" for t in TA8_MINI) + f"{'avg':>8}"
    print("\nta8-mini accuracy (%), as FusionBench's TA8 table\n" + header + "\n" + "-" * len(header))
    for label, scores in rows.items():
        print(f"{label:<{width}}" + "".join(f"{pct(scores[t]):>9}" for t in TA8_MINI) + f"{pct(avg(scores)):>8}")
    print("\ncross-task matrix: row = fine-tuned on, column = evaluated on (%)\n" + f"{'':<14}" +
          "".join(f"{t[:8]:>9}" for t in TA8_MINI))
    for t in TA8_MINI:
        print(f"{t:<14}" + "".join(f"{pct(matrix[t][u]):>9}" for u in TA8_MINI))
    print("\naverage accuracy over the λ grid (%; TIES at its best density for each λ)\n" + f"{'λ':<8}" +
          "".join(f"{label:>16}" for label in averages))
    for lam in lambdas:
        print(f"{lam:<8g}" + "".join(f"{pct(max(v for (d, l), v in a.items() if l == lam)):>16}" for a in averages.values()))

    zs = avg(rows["pre-trained (zero-shot)"])
    wa = avg(rows["weight averaging"])
    ta = averages["task arithmetic"][best["task arithmetic"]]
    ties = {v: averages[v][best[v]] for v in ("TIES (mean)", "TIES (sum)")}
    checks = [
        ("pre-trained zero-shot average ≤ 65%", zs <= 0.65, pct(zs)),
        ("every fine-tune ≥ 90% on its own task", min(rows["individual fine-tuned"].values()) >= 0.90,
         pct(min(rows["individual fine-tuned"].values())) + " (lowest)"),
        ("weight averaging < task arithmetic (best λ)", wa < ta, f"{pct(wa)} < {pct(ta)}"),
        *[(f"task arithmetic < {v} (best λ)", ta < ties[v], f"{pct(ta)} < {pct(ties[v])}") for v in ties],
        ("all merges ≥ zero-shot + 10 points", min(wa, ta, *ties.values()) >= zs + 0.10,
         f"lowest {pct(min(wa, ta, *ties.values()))} vs {pct(zs + 0.10)}"),
    ]
    print("\nacceptance")
    for text, ok, detail in checks:
        print(f"  [{'x' if ok else ' '}] {text}: {detail}")
    print("\npaired over the same test images (points, best λ each; ± one standard error)")
    for text, d in paired.items():
        print(f"  {text:<40} {d}  ({d.discordant} of {d.samples} images differ)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "matrix": matrix,
                                         "grid_averages": {k: {str(key): v for key, v in a.items()} for k, a in averages.items()},
                                         "checks": [(t, ok, d) for t, ok, d in checks],
                                         "paired": {t: asdict(d) for t, d in paired.items()}}, indent=2, default=str))


if __name__ == "__main__":
    main()
