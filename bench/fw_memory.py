"""Peak memory of FW-Hard as the candidate pool grows: streamed (mergeyard) vs all candidates in RAM.

Each run is a fresh child process (glibc told to serve large blocks by mmap, so freed copies leave)
that samples its own anonymous RSS (/proc/self/status RssAnon) every 5 ms; file-backed pages of the memory-mapped candidates are the page cache's, not the process's. The
model is 8 tensors of 1M float32 (32 MB); the objective is a quadratic pulling towards a mix of two
candidates, so the gradient costs nothing and the LMO's reads dominate. The "in RAM" peer is the same
Frank-Wolfe with every candidate loaded first, as FusionBench's implementation holds its model pool.

    .venv/bin/python bench/fw_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work" / "fw-memory"
SHAPE, TENSORS, POOLS = (1024, 1024), 8, (4, 8, 16, 32)


def build(n: int) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(SHAPE, generator=g) for i in range(TENSORS)}
    if not (WORK / "base.safetensors").exists():
        save_file(base, str(WORK / "base.safetensors"))
    for i in range(n):
        path = WORK / f"cand{i}.safetensors"
        if not path.exists():
            save_file({k: v + 0.1 * torch.randn(SHAPE, generator=g) for k, v in base.items()}, str(path))


class Pull:
    """½‖θ − target‖² with target = mix of candidates 0 and 1 (read once, 32 MB)."""

    def __init__(self, c0, c1):
        self.names = tuple(c0.names)
        self.target = {n: 0.5 * (c0.read(n) + c1.read(n)) for n in self.names}

    def loss(self, state):
        return float(sum(0.5 * ((state[n] - self.target[n]) ** 2).sum() for n in self.names))

    def loss_and_grad(self, state):
        return self.loss(state), {n: state[n] - self.target[n] for n in self.names}


def child(n: int, mode: str) -> None:
    from merging.checkpoints.checkpoint import Checkpoint
    from merging.algorithms.fw import FWParams, fw_hard

    peak, stop = {"anon": 0}, threading.Event()

    def sample():
        while not stop.is_set():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    peak["anon"] = max(peak["anon"], int(line.split()[1]) * 1024)
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    base = Checkpoint(WORK / "base.safetensors")
    cands = [Checkpoint(WORK / f"cand{i}.safetensors") for i in range(n)]
    objective = Pull(cands[0], cands[1])
    started = time.perf_counter()
    if mode == "in RAM":
        pool = [{name: c.read(name).clone() for name in c.names} for c in cands]  # the whole pool resident (copied out of the mmap)

        class Resident:
            def __init__(self, sd):
                self.sd, self.names, self.path = sd, list(sd), "ram"
                self.entries = {k: base.entries[k] for k in sd}

            def read(self, name, rows=None):
                return self.sd[name]

        cands = [Resident(sd) for sd in pool]
    result = fw_hard(base, cands, objective, FWParams(iterations=5, step_size=1.0, lam=1.0))
    seconds = time.perf_counter() - started
    stop.set()
    print(json.dumps({"anon": peak["anon"], "seconds": seconds, "loss": result.losses[-1]}))


def main() -> None:
    build(max(POOLS))
    rows = []
    for n in POOLS:
        for mode in ("streamed", "in RAM"):
            out = subprocess.run([sys.executable, __file__, "--child", str(n), mode], capture_output=True, text=True,
                                 check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                      # large blocks via mmap, returned on free: peak anon = peak live memory,
                                      # not whatever glibc's heap kept from earlier transient copies
                                      "MALLOC_MMAP_THRESHOLD_": "65536"})
            rows.append({"n": n, "mode": mode, **json.loads(out.stdout.strip().splitlines()[-1])})
    model_mb = TENSORS * SHAPE[0] * SHAPE[1] * 4 / 2**20
    print(f"FW-Hard, 5 iterations, model {model_mb:.0f} MB (8 tensors), peak anonymous RSS per process")
    print(f"{'candidates':>10} {'mode':<9} {'peak anon MB':>13} {'vs 4 cands':>11} {'seconds':>8} {'final loss':>11}")
    first = {m: next(r["anon"] for r in rows if r["mode"] == m) for m in ("streamed", "in RAM")}
    for r in rows:
        print(f"{r['n']:>10} {r['mode']:<9} {r['anon'] / 2**20:>13,.0f} {r['anon'] / first[r['mode']]:>10.2f}× "
              f"{r['seconds']:>8.2f} {r['loss']:>11.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3])
    else:
        main()
