"""A 7B-shaped bf16 merge in one process and on 2 local Dask workers from the same files: time, bytes read, peak
memory per worker, and whether the digest is the one process's. Then, on paper from the measured rates, 8 × 70B on
8 workers. With --bucket, also a small pool in an S3 bucket (moto's server) merged by the workers.

    python bench/distributed_merge.py                        # 32 layers (7B), TIES per tensor and global
    python bench/distributed_merge.py --layers 8 --bucket    # a quarter of it, and the bucket rows

The pool is bench/vs_mergekit.py's: base + 3 candidates with Llama-7B's tensor names and shapes in bf16, written
as sparse files (holes read as zeros: no disk, and reads come from the page cache after the first). So the
local rows measure the merge's compute and the engine's overheads, not a disk. The bucket rows measure moto more
than us: moto's server copies the whole object out of a temporary file on every ranged GET (sys time dominates),
so its pool is 1 layer in 64 MB shards and only its digest and bytes read mean anything. Each row runs in a fresh
child process, and each worker's anonymous RSS (RssAnon: its own memory, not the page cache's) is sampled every
5 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from merge_throughput import rss_sampler  # noqa: E402

WORK = ROOT / "bench" / ".work" / "distributed"
METHODS = {"ties-per-tensor": {"method": "ties", "parameters": {"density": 0.2, "trim_scope": "per_tensor"}},
           "ties-global": {"method": "ties", "parameters": {"density": 0.2}},
           "task_arithmetic": {"method": "task_arithmetic", "parameters": {"lambda": 0.3}}}


def llama_layout(layers: int) -> list[tuple[str, str, tuple[int, ...]]]:
    layout = [("model.embed_tokens.weight", "BF16", (32000, 4096)), ("lm_head.weight", "BF16", (32000, 4096)),
              ("model.norm.weight", "BF16", (4096,))]
    for i in range(layers):
        p = f"model.layers.{i}."
        layout += [(p + f"self_attn.{x}_proj.weight", "BF16", (4096, 4096)) for x in "qkvo"]
        layout += [(p + "mlp.gate_proj.weight", "BF16", (11008, 4096)), (p + "mlp.up_proj.weight", "BF16", (11008, 4096)),
                   (p + "mlp.down_proj.weight", "BF16", (4096, 11008)), (p + "input_layernorm.weight", "BF16", (4096,)),
                   (p + "post_attention_layernorm.weight", "BF16", (4096,))]
    return sorted(layout)


def sparse_pool(root: Path, layers: int, n: int = 3, shard_mb: int = 0) -> list[Path]:
    """base + n candidates, each one file (shard_mb 0) or a directory of shards of about shard_mb with its index,
    as Hugging Face repos shard."""
    from merging.checkpoints.safetensors_format import _header_bytes

    layout = llama_layout(layers)
    shards: list[list] = [[]]
    for entry in layout:
        size = 2 * (entry[2][0] * (entry[2][1] if len(entry[2]) > 1 else 1))
        if shard_mb and shards[-1] and sum(2 * e[2][0] * (e[2][1] if len(e[2]) > 1 else 1)
                                           for e in shards[-1]) + size > shard_mb * 2**20:
            shards.append([])
        shards[-1].append(entry)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ["base"] + [f"ft{i}" for i in range(n)]:
        if not shard_mb:
            paths.append(root / f"{name}.safetensors")
            files = {paths[-1]: layout}
        else:
            paths.append(root / name)
            paths[-1].mkdir(exist_ok=True)
            files = {paths[-1] / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s
                     for i, s in enumerate(shards)}
            index = {"metadata": {}, "weight_map": {e[0]: f.name for f, s in files.items() for e in s}}
            (paths[-1] / "model.safetensors.index.json").write_text(json.dumps(index))
        for path, part in files.items():
            header, sizes = _header_bytes(part, {"format": "pt"})
            total = len(header) + sum(sizes)
            if not path.exists() or path.stat().st_size != total:
                with open(path, "wb") as fh:
                    fh.write(header)
                    fh.truncate(total)
    return paths


# ---- one measured row, in a child process ------------------------------------------------------------------------

def child(spec: dict) -> dict:
    import torch

    from merging.engine import run_merge
    from merging.engine.dask_executor import DaskExecutor, connect
    from merging.recipes.recipe import parse_recipe

    recipe = parse_recipe({**METHODS[spec["method"]], "base": spec["inputs"][0], "models": spec["inputs"][1:]})
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    peaks: dict[str, dict] = {"driver": {}}
    stop = threading.Event()
    samplers = [threading.Thread(target=rss_sampler, args=(os.getpid(), peaks["driver"], stop), daemon=True)]
    client, factory = None, None
    if spec["workers"]:
        client = connect("local", workers=spec["workers"])
        for address, pid in client.run(os.getpid).items():
            peaks[address] = {}
            samplers.append(threading.Thread(target=rss_sampler, args=(pid, peaks[address], stop), daemon=True))
        factory = partial(DaskExecutor, client=client)
    for s in samplers:
        s.start()
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    started = time.perf_counter()
    result = run_merge(recipe, out, executor_factory=factory, input_digests={p: p for p in spec["inputs"]})
    wall = time.perf_counter() - started
    stop.set()
    for s in samplers:
        s.join()
    workers = result.details.get("executor", {}).get("workers", {})
    if client is not None:
        cluster = client.cluster
        client.close()
        cluster.close()
    shutil.rmtree(out, ignore_errors=True)
    reads = sum(r.length for u in result.plan.units for r in u.reads)
    return {"wall": wall, "digest": result.digest, "bytes_read": reads, "phases": result.phases,
            "driver_anon": peaks["driver"].get("anon", 0),
            "workers": {a: {**w, "anon": peaks.get(a, {}).get("anon", 0)} for a, w in workers.items()}}


def run_child(spec: dict, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"row {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the bucket -----------------------------------------------------------------------------------------------------

def bucket_with(paths: list[Path]):
    """A moto S3 server holding `paths` under s3://pool/; returns (server, env, URLs)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="pool")
    for p in paths:
        for f in sorted(p.iterdir()) if p.is_dir() else [p]:
            s3.upload_file(str(f), "pool", f"{p.name}/{f.name}" if p.is_dir() else p.name)
    return server, env, [f"s3://pool/{p.name}" for p in paths]


# ---- the table -----------------------------------------------------------------------------------------------------

def row(label: str, method: str, r: dict, reference: str | None) -> str:
    gb = r["bytes_read"] / 1e9
    per_worker = "; ".join(f"{w['units']} units, {w['bytes_read'] / 1e9:.2f} GB, {w.get('seconds', 0):.0f} s busy, "
                           f"{w['anon'] / 2**20:,.0f} MB"
                           for w in r["workers"].values()) or "—"
    same = "" if reference is None else ("yes" if r["digest"] == reference else "**NO**")
    return (f"| {label} | {method} | {r['wall']:.1f} | {gb:.1f} | {r['bytes_read'] / 2**20 / r['wall']:,.0f} | "
            f"{r['driver_anon'] / 2**20:,.0f} | {per_worker} | {same} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the on-disk pool (32: Llama-7B)")
    ap.add_argument("--bucket", action="store_true", help="also merge a pool uploaded to moto's S3 server")
    ap.add_argument("--bucket-layers", type=int, default=1, help="decoder layers of the pool in the bucket")
    ap.add_argument("--methods", default="ties-per-tensor,ties-global")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-mb", type=int, default=64, help="shard size of the bucket's pool (moto copies the "
                    "whole object on every ranged GET, so big objects measure moto)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    methods = args.methods.split(",")
    header = ("| setting | method | wall s | GB read | input MB/s | driver MB | per worker: units, GB read, busy s, peak MB | "
              "digest = 1 process |\n|---|---|---|---|---|---|---|---|")
    lines, rates = [header], {}
    disk = sparse_pool(WORK / f"pool-{args.layers}", args.layers)
    for method in methods:
        spec = {"method": method, "inputs": [str(p) for p in disk], "out": str(WORK / "out"), "workers": 0}
        one = run_child(spec)
        lines.append(row(f"1 process, {args.layers} layers on disk", method, one, None))
        many = run_child({**spec, "workers": args.workers})
        lines.append(row(f"{args.workers} Dask workers, same files", method, many, one["digest"]))
        rates[method] = (one, many)
        print("\n".join(lines[-2:]), flush=True)
    if not args.bucket:
        print("\n" + "\n".join(lines))
        print(on_paper(rates, methods, args.workers))
        return
    small = sparse_pool(WORK / f"shards-{args.bucket_layers}", args.bucket_layers, shard_mb=args.shard_mb)
    server, env, urls = bucket_with(small)
    try:
        for method in methods:
            spec = {"method": method, "inputs": [str(p) for p in small], "out": str(WORK / "out"), "workers": 0}
            one = run_child(spec)
            lines.append(row(f"1 process, {args.bucket_layers} layers on disk", method, one, None))
            remote = run_child({**spec, "inputs": urls, "workers": args.workers}, env)
            lines.append(row(f"{args.workers} Dask workers from the bucket", method, remote, one["digest"]))
            rates[method + "-bucket"] = (one, remote)
            print("\n".join(lines[-2:]), flush=True)
    finally:
        server.stop()
    print("\n" + "\n".join(lines))
    print(on_paper(rates, methods, args.workers))


def on_paper(rates: dict, methods: list[str], workers: int) -> str:
    """8 candidates + base of 70B (140 GB each in bf16) on 8 workers, from each method's measured per-worker rate."""
    out = ["\n**On paper: 8 × 70B + base (9 × 140 GB = 1.26 TB read by the merge pass; global TIES reads it twice more for its thresholds, inside the measured wall) on 8 workers**, from the rates above:"]
    for method in methods:
        _, many = rates[method]
        # bytes the units read over the whole wall: global TIES's histogram passes are inside that wall already
        per_worker = many["bytes_read"] / many["wall"] / workers  # B/s one worker sustained, compute included
        hours = 1.26e12 / (8 * per_worker) / 3600
        out.append(f"- {method}: {per_worker / 2**20:,.0f} MB/s per worker (one core each here) → "
                   f"{hours:.1f} h on 8 such workers; the driver receives 140 GB of output (≈ 2 min at 10 Gb/s) "
                   "and writes it once")
    out.append("Assumptions: each worker reads at least that rate from its storage (an NVMe, or an object store "
               "with parallel ranged GETs); the workers' rate is the merge's compute at one core each, as measured, "
               "and scales with cores per worker; the driver writes at ≥ 1 GB/s.")
    return "\n".join(out)


if __name__ == "__main__":
    main()
