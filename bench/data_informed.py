"""The data-informed baselines side by side with FW-Merging: averaging, task arithmetic, TIES, Fisher, RegMean,
AdaMerging (task- and layer-wise) and FW-hard / FW-soft, on the offline TA8 miniature and on the real text
suite — per task, mean, normalised accuracy, wall time and peak RSS of the merge — and FW against layer-wise
AdaMerging as the pool grows from the 8 targets to 22 candidates (14 off-target).

Each merge runs in a child process (its peak RSS is the child's own) through the engine with the data the
flows build; the parent scores it on the suite's test split.

    .venv/bin/python bench/data_informed.py [--suite ta8-mini|text|both] [--pools] [--quick] [--seed 0]

ta8-mini needs the full zoo (`bench/.work/zoo-full`, built on first use, about 9 minutes on 2 cores); the text
suite is tests/text_fixture.py's (built into tests/.cache on first use).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
WORK = ROOT / "bench" / ".work" / "data-informed"


def _merge_child(recipe: dict, out: str, model_dirs: list[str], queue) -> None:
    """One merge in its own process: (seconds, peak RSS in MB) back through the queue."""
    from flows.objectives import build_request
    from merging.engine import run_merge
    from merging.recipes.recipe import parse_recipe

    started = time.perf_counter()
    run_merge(parse_recipe(recipe), Path(out), overwrite=True,
              data=lambda request: build_request(request, model_dirs=[Path(d) for d in model_dirs]))
    queue.put((time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def merge(recipe: dict, out: Path, model_dirs: list[str]) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_merge_child, args=(recipe, str(out), model_dirs, queue))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"merge failed ({recipe['method']}): exit {child.exitcode}")
    return queue.get()


def methods(suite_ref: str, n: int, quick: bool, ta8: bool) -> list[tuple[str, str, dict]]:
    steps = 20 if quick else (60 if ta8 else 30)
    kappa = 0.3 * n
    return [
        ("averaging", "average", {}),
        ("task arithmetic (λ 0.3)", "task_arithmetic", {"lambda": 0.3}),
        ("TIES (d 0.2, λ 1, sum)", "ties", {"density": 0.2, "lambda": 1.0, "aggregate": "sum"}),
        ("Fisher", "fisher", {"suite": suite_ref, "budget": 32}),
        ("RegMean (α 0.9)", "regmean", {"suite": suite_ref, "budget": 32, "alpha": 0.9}),
        ("AdaMerging task-wise", "adamerging", {"suite": suite_ref, "granularity": "task", "steps": steps,
                                                "lr": 0.05, "budget": 32}),
        ("AdaMerging layer-wise", "adamerging", {"suite": suite_ref, "granularity": "layer", "steps": steps,
                                                 "lr": 0.05, "budget": 32}),
        ("FW-hard (step 1, κ 0.3N)", "fw_hard", {"suite": suite_ref, "iterations": 10, "step_size": 1.0,
                                                "lambda": 0.3, "scale": kappa}),
        ("FW-soft", "fw_soft", {"suite": suite_ref, "iterations": 3, "step_size": 1.0, "lambda": 0.3,
                                "adam_steps": 10, "adam_lr": 0.05}),
    ]


def table(title: str, suite, base: str, candidates: list[str], rows: list[tuple[str, str, dict]], model_dirs,
          own: dict[str, float], seed: int) -> None:
    from evaluation.evaluator import evaluate_checkpoint

    tasks = list(suite.tasks)
    print(f"\n### {title}: {len(candidates)} candidates, seed {seed}\n")
    print("| method | " + " | ".join(tasks) + " | mean | normalised | merge s | peak RSS MB |")
    print("|" + "---|" * (len(tasks) + 5))
    out = WORK / "merged"
    for label, method, params in rows:
        recipe = {"method": method, "base": base, "models": candidates, "parameters": params, "seed": seed}
        seconds, rss = merge(recipe, out, model_dirs)
        acc = {t.task: t.accuracy for t in evaluate_checkpoint(out, suite).tasks}
        mean = sum(acc.values()) / len(acc)
        normalised = sum(acc[t] / own[t] for t in tasks) / len(tasks)
        print(f"| {label} | " + " | ".join(f"{100 * acc[t]:.1f}" for t in tasks) +
              f" | {100 * mean:.1f} | {100 * normalised:.1f} | {seconds:.1f} | {rss:.0f} |", flush=True)
    shutil.rmtree(out, ignore_errors=True)


def ta8_mini(args) -> None:
    from evaluation.suites import load_suite
    from evaluation.zoo.build import build_zoo
    from evaluation.zoo.tasks import TA8_MINI, TASKS

    zoo = ROOT / "bench" / ".work" / "zoo-full"
    manifest = build_zoo(zoo)
    suite = load_suite("ta8-mini", str(zoo / "manifest.json"))
    own = {t: manifest["finetuned"][t]["accuracy"] for t in TA8_MINI}
    relevant = [str(zoo / "finetuned" / t) for t in TA8_MINI]
    base = str(zoo / "base")
    if not args.pools_only:
        table("ta8-mini", suite, base, relevant, methods("ta8-mini", 8, args.quick, True), [], own, args.seed)
    if args.pools or args.pools_only:
        off = [str(zoo / "finetuned" / t) for t in TASKS if t not in TA8_MINI]
        pool = relevant + off
        for n, candidates in ((8, relevant), (len(pool), pool)):
            rows = [r for r in methods("ta8-mini", n, args.quick, True) if r[0].startswith(("AdaMerging layer", "FW-hard"))]
            table(f"ta8-mini, FW vs layer-wise AdaMerging, {n} candidates ({n - 8} off-target)", suite, base,
                  candidates, rows, [], own, args.seed)


def text(args) -> None:
    from evaluation.evaluator import evaluate_checkpoint
    from evaluation.suites import load_suite
    from text_fixture import build_text_suite

    s = build_text_suite()
    suite = load_suite(str(s.suite)).for_model(s.base)
    own = {t: {r.task: r.accuracy for r in evaluate_checkpoint(p, suite).tasks}[t] for t, p in s.finetuned.items()}
    table(f"real text suite ({suite.name}: all-MiniLM-L6-v2 fine-tunes)", suite, str(s.base),
          [str(p) for p in s.finetuned.values()], methods(str(s.suite), len(s.finetuned), args.quick, False),
          [str(s.base)], own, args.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("ta8-mini", "text", "both"), default="both")
    parser.add_argument("--pools", action="store_true", help="also FW vs layer-wise AdaMerging at 8 and 22 candidates")
    parser.add_argument("--pools-only", action="store_true", help="only that comparison")
    parser.add_argument("--quick", action="store_true", help="fewer AdaMerging steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"command: .venv/bin/python bench/data_informed.py {' '.join(sys.argv[1:])}")
    if args.suite in ("text", "both") and not args.pools_only:
        text(args)
    if args.suite in ("ta8-mini", "both"):
        ta8_mini(args)
    print(f"\n{time.perf_counter() - started:.0f} s in all (2 cores)")


if __name__ == "__main__":
    main()
