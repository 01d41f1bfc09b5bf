"""What checking the audit chain before an alias resolves costs as the log grows: the first walk (no checkpoint),
and a walk from the head verified last (what every later resolution does), at 1k, 10k and 100k events.

    .venv/bin/python bench/audit_chain.py [--events 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def main() -> None:
    from sqlalchemy import insert, text
    from sqlalchemy.orm import Session

    from registry.audit_chain import rechain, walk
    from registry.db import make_engine, upgrade
    from registry.schema import Model, PromotionEvent, utcnow

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", default="1000,10000,100000")
    args = ap.parse_args()
    print("| events | first walk s | walk from the last verified head s | one more event s |")
    print("|---|---|---|---|")
    for n in (int(x) for x in args.events.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            engine = make_engine(f"sqlite:///{tmp}/lineage.db")
            upgrade(engine)
            now = utcnow()
            with engine.begin() as conn:
                for trigger in ("sealed", "no_update", "no_delete"):  # bulk rows, chained below in one pass
                    conn.execute(text(f"DROP TRIGGER promotion_events_{trigger}"))
                conn.execute(insert(Model), [{"digest": f"sha256:{i:064x}", "name": "product", "kind": "ingested",
                                              "source_uri": "file://x", "files": [], "num_params": 1, "dtype": "F32",
                                              "size_bytes": 4, "store_path": f"e{i}", "created_at": now}
                                             for i in range(1, 11)])
                conn.execute(insert(PromotionEvent), [{"model_id": 1 + i % 10, "model_name": "product",
                                                       "alias": "staging", "decision": "promoted", "gate": {},
                                                       "actor": "bench", "created_at": now} for i in range(n)])
                rechain(conn)
            with Session(engine) as s:
                t0 = time.perf_counter()
                seq, head, problem = walk(s, None)
                first = time.perf_counter() - t0
                assert problem is None and seq == n
                t0 = time.perf_counter()
                walk(s, (seq, head))
                again = time.perf_counter() - t0
                t0 = time.perf_counter()
                walk(s, (seq - 1, s.get(PromotionEvent, n - 1).event_hash))
                one = time.perf_counter() - t0
            engine.dispose()
        print(f"| {n} | {first:.2f} | {again:.4f} | {one:.4f} |", flush=True)


if __name__ == "__main__":
    main()
