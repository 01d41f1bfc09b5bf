"""The SVD family's cost at 7B shapes: seconds per weight matrix, and the whole model from them.

Each of tsv, iso_c, iso_cts and cart merges one weight matrix of each shape a Llama-7B holds (4096×4096 attention
projections, 11008×4096 gate/up, 4096×11008 down, 32000×4096 lm_head; embeddings and norms are averaged, not
decomposed) from T random task matrices (default 3: the pool `bench/vs_mergekit.py --only-7b` builds), through the
same code the engine runs (merging.algorithms.spectral, one thread, as the engine computes them for identical bytes
in every process). The whole-model time is Σ over shapes of (matrices of that shape × seconds per matrix): the
per-matrix work does not depend on the others, so this is the engine's SVD time; reading and writing the 13 GB
(bf16) add what `bench/vs_mergekit.py --only-7b` measures for TIES (~7 minutes here).

    .venv/bin/python bench/svd_methods.py [--tasks 3] [--methods tsv,iso_c,iso_cts,cart] [--shapes 4096x4096,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

# Llama-7B: 32 layers × (q, k, v, o: 4096×4096; gate, up: 11008×4096; down: 4096×11008) + lm_head
SHAPES = {(4096, 4096): 128, (11008, 4096): 64, (4096, 11008): 32, (32000, 4096): 1}


def merge_one(method: str, tasks: list, fraction: float = 0.12):
    from merging.algorithms.spectral import (
        isotropic, isotropic_common_and_task, low_rank, summed, task_singular_vectors,
    )

    task = tasks.__getitem__
    if method == "tsv":
        return task_singular_vectors(task, len(tasks), max(1, min(tasks[0].shape) // len(tasks)))
    if method == "iso_c":
        return isotropic(summed(lambda i: tasks[i].clone(), len(tasks)))
    if method == "iso_cts":
        return isotropic_common_and_task(summed(lambda i: tasks[i].clone(), len(tasks)), task, len(tasks), 0.8)
    centre = summed(lambda i: tasks[i].clone(), len(tasks)) / len(tasks)
    return sum(low_rank(t - centre, max(1, int(fraction * min(t.shape)))) for t in tasks)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--methods", default="tsv,iso_c,iso_cts,cart")
    ap.add_argument("--shapes", default=",".join(f"{a}x{b}" for a, b in SHAPES))
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    g = torch.Generator().manual_seed(0)
    seconds: dict[tuple[str, tuple[int, int]], float] = {}
    for shape in shapes:
        tasks = [0.01 * torch.randn(shape, generator=g) for _ in range(args.tasks)]
        for method in args.methods.split(","):
            started = time.perf_counter()
            merge_one(method, tasks)
            seconds[(method, shape)] = time.perf_counter() - started
            print(f"{method} {shape[0]}×{shape[1]}: {seconds[(method, shape)]:.1f} s", flush=True)
    print(f"\nseconds per weight matrix ({args.tasks} tasks, one thread, float32; "
          f"torch {torch.__version__}, {torch.get_num_threads()} cores here)\n")
    print("| method | " + " | ".join(f"{a}×{b}" for a, b in shapes) + " | Llama-7B, all matrices |")
    print("|---|" + "---|" * (len(shapes) + 1))
    for method in args.methods.split(","):
        total = sum(SHAPES.get(s, 0) * seconds[(method, s)] for s in shapes)
        covered = all(s in shapes for s in SHAPES)
        print(f"| {method} | " + " | ".join(f"{seconds[(method, s)]:.1f}" for s in shapes) +
              f" | {total / 3600:.2f} h{'' if covered else ' (of the shapes measured)'} |")


if __name__ == "__main__":
    main()
