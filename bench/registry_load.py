"""Registry throughput under concurrent writers: ingest, merge registration and lineage queries at 1, 8, 32 writers.

    python bench/registry_load.py [--writers 1,8,32] [--ops 5] [--backends sqlite,postgresql]

Each writer is its own process (as a team's jobs are) with its own registry, on one home whose schema exists
(first use is tested in tests/test_registry_load.py). Writers start together after a barrier (their imports are
not timed) and each runs `--ops` rounds of: ingest a new small checkpoint (a few KB: what is measured is the
registry, its transaction and its MLflow mirror, not the copy), merge it with the base and register the result,
and query the merged model's lineage. Prints ops/s over the whole wall time and p50/p99 latency per operation.
PostgreSQL runs on a throwaway cluster (tests/postgres.py) when its binaries are installed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _config(home: Path, db_url: str):
    from registry.registry import RegistryConfig

    return RegistryConfig(db_url, home / "store", home / "tmp", f"sqlite:///{(home / 'mlflow.db').resolve()}",
                          home / "mlartifacts")


def _writer(index: int, home: str, db_url: str, ops: int, base: str, ready, go, results) -> None:
    import torch
    from safetensors.torch import save_file

    from flows.merge import merge_and_record
    from merging.recipes.recipe import parse_recipe
    from registry.lineage import lineage
    from registry.registry import Registry

    registry = Registry(_config(Path(home), db_url))
    registry.mirror.experiment_id  # MLflow's client and experiment, before the clock starts
    work = Path(home) / "inputs"
    ready.wait()
    go.wait()
    times: dict[str, list[float]] = {"ingest": [], "merge registration": [], "lineage query": []}
    for op in range(ops):
        gen = torch.Generator().manual_seed(1000 * index + op)
        path = work / f"w{index}-{op}.safetensors"
        save_file({"w": torch.randn(32, 32, generator=gen), "b": torch.randn(32, generator=gen)}, str(path))
        t = time.perf_counter()
        registry.ingest(str(path), name=f"cand-{index}-{op}")
        times["ingest"].append(time.perf_counter() - t)
        t = time.perf_counter()
        recorded = merge_and_record(parse_recipe({"method": "task_arithmetic", "base": base, "models": [str(path)],
                                                  "parameters": {"lambda": 0.5}}), registry, name=f"merged-{index}")
        times["merge registration"].append(time.perf_counter() - t)
        t = time.perf_counter()
        with registry.Session() as s:
            graph = lineage(s, recorded.model.id)
        assert recorded.model.id in graph.nodes
        times["lineage query"].append(time.perf_counter() - t)
    results.put(times)


def run(writers: int, db_url: str, home: Path, ops: int) -> dict:
    import torch
    from safetensors.torch import save_file

    from registry.registry import Registry

    (home / "inputs").mkdir(parents=True)
    base = home / "inputs" / "base.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(32, 32, generator=gen), "b": torch.randn(32, generator=gen)}, str(base))
    registry = Registry(_config(home, db_url))  # the schema (SQLite upgrades itself; PG was upgraded by the caller)
    registry.ingest(str(base), name="base")
    registry.close()
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Barrier(writers + 1), ctx.Barrier(writers + 1), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(i, str(home), db_url, ops, str(base), ready, go, results))
             for i in range(writers)]
    for p in procs:
        p.start()
    ready.wait()
    started = time.perf_counter()
    go.wait()
    collected = [results.get(timeout=3600) for _ in procs]
    wall = time.perf_counter() - started
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a writer failed (exit {p.exitcode})")
    merged: dict[str, list[float]] = {}
    for times in collected:
        for op, values in times.items():
            merged.setdefault(op, []).extend(values)
    return {"wall": wall, "ops": merged}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", default="1,8,32")
    parser.add_argument("--ops", type=int, default=5, help="rounds per writer")
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    rows = []
    cluster = None
    for backend in args.backends.split(","):
        if backend == "postgresql":
            from postgres import Cluster, find_bindir

            if find_bindir() is None:
                print("postgresql: no binaries installed, skipped")
                continue
            cluster = cluster or Cluster(find_bindir())
        for writers in map(int, args.writers.split(",")):
            home = Path(tempfile.mkdtemp(prefix=f"registry-load-{backend}-{writers}-"))
            if backend == "sqlite":
                db_url = f"sqlite:///{home / 'lineage.db'}"
            else:
                from registry.db import make_engine, upgrade

                db_url = cluster.url(cluster.create_database())
                upgrade(make_engine(db_url))
            try:
                result = run(writers, db_url, home, args.ops)
            finally:
                shutil.rmtree(home, ignore_errors=True)
            total = sum(len(v) for v in result["ops"].values())
            for op, values in result["ops"].items():
                rows.append((backend, writers, op, len(values), total / result["wall"],
                             1000 * statistics.median(values), 1000 * percentile(values, 0.99)))
            print(f"{backend} × {writers}: {total} operations in {result['wall']:.1f} s", flush=True)
    if cluster is not None:
        cluster.stop()
    print()
    print("| backend | writers | operation | n | all ops/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for backend, writers, op, n, rate, p50, p99 in rows:
        print(f"| {backend} | {writers} | {op} | {n} | {rate:.1f} | {p50:.0f} | {p99:.0f} |")


if __name__ == "__main__":
    main()
