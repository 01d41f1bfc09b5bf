"""Merge throughput and peak memory: mergeyard vs mergekit-pytorch on the same files.

Builds N "fine-tuned" checkpoints shaped like open_clip's ViT-B/32 image tower
(pretrained=None: random base + seeded perturbations, float32, ~351 MB each),
warms the page cache, then runs each merge in its own process while the parent
samples that process's anonymous RSS (/proc/PID/status RssAnon) every 5 ms.

    python bench/merge_throughput.py                 # N=8, CPU, with mergekit
    python bench/merge_throughput.py --n 4 --no-mergekit
    python bench/merge_throughput.py --device cuda

mergekit runs from its own venv (created on first use with `pip install
mergekit`; pass --mergekit-venv to reuse one). Input digests are computed once
up front and handed to mergeyard, as the registry does: the timed mergeyard
run still hashes its output while writing it, mergekit hashes nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_sampler(pid: int, peaks: dict, stop: threading.Event) -> None:
    path = f"/proc/{pid}/status"
    while not stop.is_set():
        try:
            fields = dict(line.split(":", 1) for line in open(path).read().splitlines() if ":" in line)
            peaks["anon"] = max(peaks.get("anon", 0), int(fields["RssAnon"].split()[0]) * 1024)
            peaks["rss"] = max(peaks.get("rss", 0), int(fields["VmRSS"].split()[0]) * 1024)
        except (OSError, KeyError, ValueError):
            pass
        stop.wait(0.005)


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, dict, str]:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=rss_sampler, args=(proc.pid, peaks, stop), daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, peaks, out


def build_checkpoints(work: Path, n: int, perturb: float) -> tuple[Path, list[Path]]:
    import torch
    from safetensors.torch import save_file

    marker = work / f"family-{n}-{perturb}.json"
    base = work / "base.safetensors"
    models = [work / f"ft{i}.safetensors" for i in range(n)]
    if marker.exists() and base.exists() and all(m.exists() for m in models):
        return base, models
    import open_clip

    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual
    sd = {k: v.detach().contiguous() for k, v in visual.state_dict().items()}
    save_file(sd, str(base))
    for i, path in enumerate(models):
        g = torch.Generator().manual_seed(100 + i)
        save_file({k: v + perturb * torch.randn(v.shape, generator=g) for k, v in sd.items()}, str(path))
    marker.write_text("{}")
    return base, models


def read_floor(paths: list[Path]) -> float:
    """Seconds to read every input once from the page cache: the bandwidth floor of any merge."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    for _ in range(2):  # first round warms the cache
        started = time.perf_counter()
        for p in paths:
            with open(p, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass
        took = time.perf_counter() - started
    return took


def child_mergeyard(args) -> None:
    from merging.engine import run_merge
    from merging.recipes.recipe import parse_recipe

    spec = json.loads(Path(args.child).read_text())
    recipe = parse_recipe(spec["recipe"])
    result = run_merge(recipe, spec["out"], device=spec["device"], input_digests=spec["digests"], overwrite=True)
    print(json.dumps({"seconds": result.seconds, "phases": result.phases, "digest": result.digest}))


def ensure_mergekit(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-pytorch"
    if not exe.exists():
        print(f"installing mergekit into {venv} (once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "mergekit"], check=True)
    return exe


def compare_with_mergekit(ours: Path, theirs: Path, base: Path, models: list[Path], density: float | None) -> dict:
    """Largest |Δ| between outputs, overall and outside TIES threshold ties.

    mergekit keeps exactly k = int(density·n) entries per tensor and breaks ties
    at the k-th |τ| by torch's unstable argsort order; mergeyard breaks them by
    flat index. Positions where some model had more entries equal to its
    threshold than places left are such ties; there the two may rightly differ.
    The thresholds come from torch.kthvalue, independently of mergeyard's code.
    """
    import torch

    from merging.checkpoints.checkpoint import Checkpoint

    ca, cb = Checkpoint(ours), Checkpoint(theirs)
    cbase, cms = Checkpoint(base), [Checkpoint(m) for m in models]
    worst, worst_untied, n_diff, n_tied = 0.0, 0.0, 0, 0
    for name in ca.names:
        delta = (ca.read(name).float() - cb.read(name).float()).abs().reshape(-1)
        worst = max(worst, float(delta.max()))
        loose = delta > 1e-6 * (1 + cb.read(name).float().abs().reshape(-1))
        if density is None or not bool(loose.any()):
            worst_untied = max(worst_untied, float(delta.max()))
            continue
        n_diff += int(loose.sum())
        b = cbase.read(name).float().reshape(-1)
        tied = torch.zeros_like(delta, dtype=torch.bool)
        k = max(1, int(density * b.numel()))
        for m in cms:
            a = (m.read(name).float().reshape(-1) - b).abs()
            threshold = torch.kthvalue(a, a.numel() - k + 1).values
            n_equal, n_greater = int((a == threshold).sum()), int((a > threshold).sum())
            if n_equal > k - n_greater:
                tied |= a == threshold
        n_tied += int((loose & tied).sum())
        worst_untied = max(worst_untied, float(delta[~tied].max()))
    return {"max_abs_diff": worst, "max_abs_diff_untied": worst_untied, "n_diff": n_diff, "n_diff_at_ties": n_tied}


def startup_seconds(cmd: list[str], runs: int = 3) -> float:
    """Fastest of a few runs: the first one pays for cold .pyc files and page cache."""
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="number of fine-tuned checkpoints")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / ".work")
    ap.add_argument("--perturb", type=float, default=1e-3, help="std of each model's perturbation of the base")
    ap.add_argument("--mergekit-venv", type=Path, default=None)
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_mergeyard(args)

    import torch

    from merging.checkpoints.digest import checkpoint_digest

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if args.device == "cuda" and gpu is None:
        raise SystemExit("no GPU: run with --device cpu (the CUDA path can only be measured on a machine with one)")
    args.work.mkdir(parents=True, exist_ok=True)
    base, models = build_checkpoints(args.work, args.n, args.perturb)
    inputs = [base, *models]
    in_bytes = sum(p.stat().st_size for p in inputs)
    floor = read_floor(inputs)
    digests = {str(p): checkpoint_digest(p) for p in inputs}
    weight = 0.3
    cases = [
        ("task_arithmetic", "task_arithmetic", {"lambda": 1.0}, "task_arithmetic", {}),
        ("ties per_tensor", "ties", {"density": 0.2, "trim_scope": "per_tensor", "aggregate": "mean"}, "ties",
         {"density": 0.2}),
        ("ties global", "ties", {"density": 0.2, "trim_scope": "global", "aggregate": "mean"}, None, None),
    ]
    rows = []
    mergekit_exe = None if args.no_mergekit else ensure_mergekit(args.mergekit_venv or args.work / "mergekit-venv")
    # mergekit's own start-up (imports), subtracted from its wall time to compare merge work with merge work
    mk_start = startup_seconds([str(mergekit_exe), "--help"]) if mergekit_exe else 0.0
    our_start = startup_seconds([sys.executable, "-c", "import merging.engine, merging.recipes.recipe"])
    for label, method, params, mk_method, mk_params in cases:
        out = args.work / f"out-mergeyard-{label.replace(' ', '-')}"
        spec = {
            "recipe": {"method": method, "base": str(base), "models": [{"model": str(m), "weight": weight} for m in models],
                       "parameters": params},
            "out": str(out), "device": args.device, "digests": digests,
        }
        spec_path = args.work / "child.json"
        spec_path.write_text(json.dumps(spec))
        wall, peaks, stdout = run_measured([sys.executable, __file__, "--child", str(spec_path)])
        info = json.loads(stdout.strip().splitlines()[-1])
        ours = {"label": label, "impl": "mergeyard", "seconds": info["seconds"], "wall": wall, **peaks}
        rows.append(ours)
        if mergekit_exe and mk_method:
            mk_out = args.work / f"out-mergekit-{mk_method}"
            cfg = {"merge_method": mk_method, "base_model": str(base), "dtype": "float32",
                   "models": [{"model": str(m), "parameters": {"weight": weight, **mk_params}} for m in models]}
            cfg_path = args.work / f"mergekit-{mk_method}.yaml"
            import yaml

            cfg_path.write_text(yaml.safe_dump(cfg))
            device_flag = ["--cuda"] if args.device == "cuda" else []
            mk_wall, mk_peaks, _ = run_measured([str(mergekit_exe), str(cfg_path), str(mk_out), *device_flag])
            mk_row = {"label": label, "impl": "mergekit", "seconds": mk_wall - mk_start, "wall": mk_wall, **mk_peaks,
                      **compare_with_mergekit(out, mk_out, base, models, mk_params.get("density"))}
            rows.append(mk_row)
            ours["speedup_wall"] = mk_wall / ours["wall"]  # process vs process: both pay interpreter start
            ours["speedup_run"] = mk_row["seconds"] / ours["seconds"]

    print(f"\n{args.n} fine-tuned + base, ViT-B/32 image tower, {in_bytes / 1e6:,.0f} MB read per merge, "
          f"device {args.device}; read floor {floor:.2f} s ({in_bytes / floor / 1e9:.1f} GB/s); "
          f"{'GPU: ' + gpu + ' (rerun with --device cuda)' if gpu and args.device != 'cuda' else 'GPU: ' + gpu if gpu else 'no GPU'}\n")
    header = (f"{'merge':<16} {'impl':<10} {'seconds':>8} {'wall s':>7} {'GB/s':>6} {'× floor':>8} {'peak anon MB':>13} "
              f"{'peak RSS MB':>12} {'speedup run':>12} {'speedup wall':>13} {'max|Δ|':>9} {'untied':>9} {'diff@ties':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        run_x = f"{r['speedup_run']:.1f}×" if "speedup_run" in r else ""
        wall_x = f"{r['speedup_wall']:.1f}×" if "speedup_wall" in r else ""
        diff = f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else ""
        untied = f"{r['max_abs_diff_untied']:.2e}" if "max_abs_diff_untied" in r else ""
        ties = f"{r['n_diff_at_ties']}/{r['n_diff']}" if "n_diff" in r else ""
        print(f"{r['label']:<16} {r['impl']:<10} {r['seconds']:>8.2f} {r['wall']:>7.2f} {in_bytes / r['seconds'] / 1e9:>6.2f} "
              f"{r['seconds'] / floor:>8.1f} {r.get('anon', 0) / 2**20:>13,.0f} {r.get('rss', 0) / 2**20:>12,.0f} "
              f"{run_x:>12} {wall_x:>13} {diff:>9} {untied:>9} {ties:>10}")
    print(f"\nseconds: merge work alone — mergeyard's run_merge(); mergekit's process wall minus its start-up "
          f"(fastest of 3 `mergekit-pytorch --help`: {mk_start:.2f} s). wall s: whole process, imports included "
          f"(mergeyard's imports alone: {our_start:.2f} s). GB/s and × floor use seconds. "
          "max|Δ|: largest difference from mergekit's output; untied: the same outside TIES threshold ties; "
          "diff@ties: differing elements that sit at a threshold tie / all differing elements.")
    ta = [r for r in rows if r["label"] == "ties global"]
    pt = [r for r in rows if r["label"] == "ties per_tensor" and r["impl"] == "mergeyard"]
    if ta and pt:
        print(f"ties global / ties per_tensor (mergeyard): {ta[0]['seconds'] / pt[0]['seconds']:.2f}×")


if __name__ == "__main__":
    main()
