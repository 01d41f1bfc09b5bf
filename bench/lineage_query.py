"""Ancestry query time on a large synthetic lineage DB, SQLite and PostgreSQL.

    python bench/lineage_query.py                # 100k models in depth-20 chains, both backends
    python bench/lineage_query.py --models 20000 --no-postgres

Each chain is 20 generations deep; every model after the first has two
parents (the previous generation as candidate, the chain's root as base), as a
repeated merge-of-merges would. Times `registry.lineage.lineage()` (the
recursive CTE plus one query each for models, runs and metrics) and the bare
CTE for the deepest model of randomly chosen chains. PostgreSQL runs in a
throwaway cluster this script starts (tests/postgres.py).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sqlalchemy import insert  # noqa: E402

from registry.db import make_engine, upgrade  # noqa: E402
from registry.lineage import ancestry_edges, lineage  # noqa: E402
from registry.schema import LineageEdge, Model, utcnow  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402


def populate(engine, n_models: int, depth: int) -> list[int]:
    """Insert the synthetic DAG; returns the deepest model id of each chain."""
    chains = n_models // depth
    now = utcnow()
    models, edges, deepest = [], [], []
    for c in range(chains):
        for d in range(depth):
            mid = c * depth + d + 1
            models.append({"id": mid, "digest": f"sha256:{mid:064x}", "name": f"chain{c}", "kind": "merged" if d else "ingested",
                           "source_uri": f"file:///m/{mid}", "files": [], "num_params": 1000, "dtype": "F32",
                           "size_bytes": 4000, "store_path": f"/store/{mid}", "created_at": now})
            if d:
                edges.append({"parent_id": mid - 1, "child_id": mid, "role": "candidate", "weight": 0.5})
                edges.append({"parent_id": c * depth + 1, "child_id": mid, "role": "base", "weight": None})
        deepest.append(c * depth + depth)
    with engine.begin() as conn:
        for i in range(0, len(models), 10_000):
            conn.execute(insert(Model.__table__), models[i:i + 10_000])
        for i in range(0, len(edges), 20_000):
            conn.execute(insert(LineageEdge.__table__), edges[i:i + 20_000])
    return deepest


def time_queries(engine, targets: list[int], depth: int) -> tuple[list[float], list[float]]:
    full, cte = [], []
    with Session(engine) as s:
        for mid in targets:
            started = time.perf_counter()
            graph = lineage(s, mid)
            full.append((time.perf_counter() - started) * 1000)
            assert len(graph.nodes) == depth, (mid, len(graph.nodes))
            started = time.perf_counter()
            edges = ancestry_edges(s, mid)
            cte.append((time.perf_counter() - started) * 1000)
            assert len(edges) == 2 * (depth - 1)  # a candidate and a base edge per merged generation
    return full, cte


def p95(values: list[float]) -> float:
    return sorted(values)[int(0.95 * (len(values) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=100_000)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()

    rows = []
    backends = [("sqlite", None)] + ([] if args.no_postgres else [("postgresql", "pg")])
    workdir = Path(tempfile.mkdtemp(prefix="lineage-bench-"))
    cluster = None
    try:
        for name, _ in backends:
            if name == "sqlite":
                url = f"sqlite:///{workdir / 'lineage.db'}"
            else:
                from postgres import Cluster, find_bindir

                cluster = Cluster(find_bindir())
                url = cluster.url(cluster.create_database())
            engine = make_engine(url)
            upgrade(engine)
            started = time.perf_counter()
            deepest = populate(engine, args.models, args.depth)
            build = time.perf_counter() - started
            if name == "postgresql":
                with engine.begin() as conn:
                    conn.exec_driver_sql("ANALYZE")
            targets = random.Random(0).sample(deepest, min(args.queries, len(deepest)))
            time_queries(engine, targets[:5], args.depth)  # warm caches and plans
            full, cte = time_queries(engine, targets, args.depth)
            rows.append((name, args.models, build, statistics.median(full), p95(full), statistics.median(cte), p95(cte)))
            engine.dispose()
    finally:
        if cluster is not None:
            cluster.stop()
    print(f"\nancestry of the deepest model of {args.queries} random chains; depth {args.depth}, "
          f"2 parents per merged model\n")
    header = f"{'backend':<11} {'models':>8} {'build s':>8} {'lineage() median ms':>20} {'p95 ms':>7} {'CTE median ms':>14} {'p95 ms':>7}"
    print(header)
    print("-" * len(header))
    for name, n, build, fm, fp, cm, cp in rows:
        print(f"{name:<11} {n:>8,} {build:>8.1f} {fm:>20.2f} {fp:>7.2f} {cm:>14.2f} {cp:>7.2f}")


if __name__ == "__main__":
    main()
