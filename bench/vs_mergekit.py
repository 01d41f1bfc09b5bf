"""`mergeyard merge` against `mergekit-pytorch`, whole processes as a user runs them (imports, registration,
MLflow and all), on the same files.

    python bench/vs_mergekit.py                 # 8 × ~351 MB fp32 ViT-B/32-shaped fine-tunes + base
    python bench/vs_mergekit.py --n 4 --skip-ties
    python bench/vs_mergekit.py --llama-7b      # also the 7B-shaped bf16 TIES row (sparse files, ~14 GB each)
    python bench/vs_mergekit.py --only-7b       # that row alone

Rows: a fresh home (every input ingested first: copied into the store, or `--by-reference`), then the same home
with the inputs registered. `home +MB` is what the home grew by (`du`), `db +MB` the lineage and MLflow databases'
part of it; the merged output itself is ~351 MB. mergekit runs from its own venv (installed on first use by
bench/merge_throughput.py's `ensure_mergekit`), outside the project's dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from merge_throughput import build_checkpoints, compare_with_mergekit, ensure_mergekit, read_floor, run_measured  # noqa: E402

MERGEYARD = [sys.executable, "-m", "flows.cli"]


def du(path: Path) -> int:
    """Bytes on disk under `path`, each inode once (hard links shared between the store and MLflow count once)."""
    seen, total = set(), 0
    for p in path.rglob("*") if path.exists() else []:
        try:
            st = p.lstat()
        except OSError:
            continue
        if p.is_symlink() or not p.is_file() or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
    return total


def databases(home: Path) -> int:
    return sum(p.stat().st_size for p in home.glob("*.db*") if p.is_file())


def env_for(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MERGEYARD_"))}
    return {**env, "MERGEYARD_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def mergeyard_merge(home: Path, recipe: dict, work: Path, name: str, *extra: str) -> dict:
    path = work / f"recipe-{name}.yaml"
    path.write_text(json.dumps(recipe))
    before, db_before = du(home), databases(home) if home.exists() else 0
    wall, peaks, out = run_measured([*MERGEYARD, "merge", str(path), "--name", name, "--json", *extra], env=env_for(home))
    info = json.loads(out)
    return {"wall": wall, "rss": peaks.get("anon", 0), "grew": du(home) - before, "db": databases(home) - db_before,
            "store_path": info["store_path"], "digest": info["digest"]}


def mergekit_merge(exe: Path, base: Path, models: list[Path], method: str, params: dict, weight: float,
                   work: Path) -> dict:
    import yaml

    out = work / f"out-mergekit-{method}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = {"merge_method": method, "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(m), "parameters": {"weight": weight, **params}} for m in models]}
    cfg_path = work / f"mergekit-{method}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    wall, peaks, _ = run_measured([str(exe), str(cfg_path), str(out)])
    return {"wall": wall, "rss": peaks.get("anon", 0), "out": out}


def startup(cmd: list[str], env: dict, runs: int = 5) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True, env=env)
        best = min(best, time.perf_counter() - started)
    return best


def quick_commands(work: Path, sample: Path) -> list[tuple[str, float, str]]:
    home = work / "home-quick"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    env = env_for(home)
    rows = [(f"mergeyard {' '.join(a)}", startup([*MERGEYARD, *a], env), target)
            for a, target in ((["--help"], "< 0.3 s"), (["version"], "< 0.3 s"), (["methods"], "< 0.3 s"))]
    # digest: the first read of the file, then a cached one (the home's digest cache)
    started = time.perf_counter()
    subprocess.run([*MERGEYARD, "digest", str(sample)], capture_output=True, check=True, env=env)
    first = time.perf_counter() - started
    rows.append((f"mergeyard digest ({sample.stat().st_size / 1e6:.0f} MB, first read)", first,
                 f"≈ read ({read_floor([sample]):.2f} s) + start"))
    rows.append(("mergeyard digest (same file again, cached)", startup([*MERGEYARD, "digest", str(sample)], env),
                 "< 0.3 s"))
    return rows


def llama_7b_row(work: Path, n: int = 3) -> dict:
    """TIES (per tensor) on three 7B-shaped bf16 candidates + base, built sparsely (holes read as zeros, so the
    bytes cost no disk until the output is written), Llama tensor names and shapes. Peak RSS is the point."""
    from merging.checkpoints.safetensors_format import _header_bytes

    layout = [("model.embed_tokens.weight", "BF16", (32000, 4096)), ("lm_head.weight", "BF16", (32000, 4096)),
              ("model.norm.weight", "BF16", (4096,))]
    for i in range(32):
        p = f"model.layers.{i}."
        layout += [(p + "self_attn.q_proj.weight", "BF16", (4096, 4096)), (p + "self_attn.k_proj.weight", "BF16", (4096, 4096)),
                   (p + "self_attn.v_proj.weight", "BF16", (4096, 4096)), (p + "self_attn.o_proj.weight", "BF16", (4096, 4096)),
                   (p + "mlp.gate_proj.weight", "BF16", (11008, 4096)), (p + "mlp.up_proj.weight", "BF16", (11008, 4096)),
                   (p + "mlp.down_proj.weight", "BF16", (4096, 11008)), (p + "input_layernorm.weight", "BF16", (4096,)),
                   (p + "post_attention_layernorm.weight", "BF16", (4096,))]
    layout.sort()
    header, sizes = _header_bytes(layout, {"format": "pt"})
    total = len(header) + sum(sizes)
    root = work / "llama-7b"
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ["base"] + [f"ft{i}" for i in range(n)]:
        path = root / f"{name}.safetensors"
        if not path.exists() or path.stat().st_size != total:
            with open(path, "wb") as fh:
                fh.write(header)
                fh.truncate(total)  # a hole: zeros, no blocks
        paths.append(path)
    home = work / "home-7b"
    shutil.rmtree(home, ignore_errors=True)
    recipe = {"method": "ties", "base": str(paths[0]), "models": [{"model": str(p), "weight": 1.0} for p in paths[1:]],
              "parameters": {"density": 0.2, "trim_scope": "per_tensor"}}
    try:
        row = mergeyard_merge(home, recipe, work, "ties-7b", "--by-reference")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return {**row, "params": sum(s for s in sizes) // 2, "input_gb": total * (n + 1) / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / ".work")
    ap.add_argument("--mergekit-venv", type=Path, default=None)
    ap.add_argument("--skip-ties", action="store_true", help="leave out the TIES rows (mergekit's takes ~2 min)")
    ap.add_argument("--llama-7b", action="store_true", help="also the 7B-shaped TIES row (~60 GB of sparse files)")
    ap.add_argument("--only-7b", action="store_true", help="only the 7B-shaped TIES row")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.only_7b:
        return print_7b(llama_7b_row(args.work))
    base, models = build_checkpoints(args.work, args.n, 1e-3)
    inputs = [base, *models]
    floor = read_floor(inputs)
    mk = ensure_mergekit(args.mergekit_venv or args.work / "mergekit-venv")
    weight = 0.3
    ta = {"method": "task_arithmetic", "base": str(base), "models": [{"model": str(m), "weight": weight} for m in models],
          "parameters": {"lambda": 1.0}}
    ties = {"method": "ties", "base": str(base), "models": [{"model": str(m), "weight": weight} for m in models],
            "parameters": {"density": 0.2, "trim_scope": "per_tensor", "aggregate": "mean"}}
    theirs = {"ta": mergekit_merge(mk, base, models, "task_arithmetic", {}, weight, args.work)}
    if not args.skip_ties:
        theirs["ties"] = mergekit_merge(mk, base, models, "ties", {"density": 0.2}, weight, args.work)

    rows = []

    def row(label, ours, mine_key, target, compare=None):
        mk_row = theirs.get(mine_key)
        ratio = mk_row["wall"] / ours["wall"] if mk_row else None
        diff = ""
        if compare is not None and mk_row:
            c = compare_with_mergekit(Path(ours["store_path"]), mk_row["out"], base, models, compare.get("density"))
            diff = f"{c['max_abs_diff']:.1e}/{c['max_abs_diff_untied']:.1e}"
        rows.append((label, ours["wall"], mk_row["wall"] if mk_row else None, ratio, target, ours["grew"] / 1e6,
                     ours["db"] / 1e6, ours["rss"] / 2**20, diff))

    fresh_copy = args.work / "home-fresh-copy"
    fresh_ref = args.work / "home-fresh-ref"
    for home in (fresh_copy, fresh_ref):
        shutil.rmtree(home, ignore_errors=True)
    row("task arithmetic, fresh home (inputs copied)", mergeyard_merge(fresh_copy, ta, args.work, "ta-fresh"), "ta",
        "≥ 2×", {})
    row("task arithmetic, fresh home (--by-reference)",
        mergeyard_merge(fresh_ref, ta, args.work, "ta-fresh", "--by-reference"), "ta", "≥ 2×", {})
    registered = {**ta, "parameters": {"lambda": 0.9}}  # a new output: the first one's digest is registered already
    row("task arithmetic, inputs registered", mergeyard_merge(fresh_copy, registered, args.work, "ta-again"), "ta",
        "≥ 5×")
    if not args.skip_ties:
        row("TIES per tensor, inputs registered", mergeyard_merge(fresh_copy, ties, args.work, "ties"), "ties", "≥ 5×",
            {"density": 0.2})
    in_mb = sum(p.stat().st_size for p in inputs) / 1e6
    print(f"\n{args.n} fp32 fine-tunes + base (ViT-B/32 image tower shapes), {in_mb:,.0f} MB of inputs; "
          f"reading them once from the page cache takes {floor:.2f} s; output ~{base.stat().st_size / 1e6:.0f} MB\n")
    head = (f"{'case':<46} {'mergeyard s':>11} {'mergekit s':>10} {'ratio':>7} {'target':>7} {'home +MB':>9} "
            f"{'db +MB':>7} {'peak anon MB':>12} {'max|Δ| all/untied':>18}")
    print(head)
    print("-" * len(head))
    for label, ours, theirs_s, ratio, target, grew, db, rss, diff in rows:
        print(f"{label:<46} {ours:>11.2f} {theirs_s if theirs_s is not None else float('nan'):>10.2f} "
              f"{(f'{ratio:.2f}×' if ratio else ''):>7} {target:>7} {grew:>9.1f} {db:>7.2f} {rss:>12,.0f} {diff:>18}")
    print("\nratio: mergekit's whole process / mergeyard's (both pay interpreter start and imports; mergeyard also "
          "validates, hashes, registers with lineage and mirrors to MLflow). peak anon: resident memory less the "
          "page cache of memory-mapped inputs. max|Δ|: against mergekit's output, everywhere / outside TIES threshold "
          "ties (where the two break ties at the k-th magnitude differently).\n")
    quick = quick_commands(args.work, base)
    print(f"{'command':<52} {'seconds':>8}  target")
    for label, seconds, target in quick:
        print(f"{label:<52} {seconds:>8.3f}  {target}")
    if args.llama_7b:
        print_7b(llama_7b_row(args.work))


def print_7b(r: dict) -> None:
    print(f"\n7B-shaped TIES per tensor (bf16, Llama names/shapes, 3 candidates + base, {r['input_gb']:.0f} GB read, "
          f"--by-reference): {r['wall']:.1f} s, peak anonymous RSS {r['rss'] / 2**30:.2f} GiB (target < 3 GiB)")


if __name__ == "__main__":
    main()
