"""Every merge method mergeyard shares with mergekit, run through both tools on the same files, compared.

    python bench/mergekit_parity.py                  # ViT-B/32-shaped fp32 set + a small Llama-shaped set
    python bench/mergekit_parity.py --sets llama     # only the small Llama-shaped set (quick)
    python bench/mergekit_parity.py --methods ties,slerp
    python bench/mergekit_parity.py --sets minilm --methods ties,breadcrumbs   # real all-MiniLM-L6-v2 fine-tunes

Both tools read one and the same mergekit config file: mergekit through `mergekit-pytorch` (the ViT set: plain
tensors, no architecture) or `mergekit-yaml` (the Llama set, whose config.json mergekit knows), installed in its
own venv (bench/.work/mergekit-venv) on first use; mergeyard through `mergeyard merge CONFIG` in a home of its own,
inputs registered by reference. Times are whole processes as a user runs them (imports included; mergeyard's also
records lineage and mirrors to MLflow).

Deterministic methods: `frac>1e-5` is the fraction of output elements differing by more than 1e-5, `max|Δ|` the
largest difference. Random methods (DARE, DELLA) draw different masks in the two tools, so their rows compare
statistics of the task-vector part of the output instead (the fraction of elements the mask kept and the mean and
standard deviation of the merged task vector), and `same seed` says whether two mergeyard runs with one seed wrote
the same digest.
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

from merge_throughput import ensure_mergekit  # noqa: E402

MERGEYARD = [sys.executable, "-m", "flows.cli"]
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}

# method → (models it takes beyond the base, whether it uses the base, global parameters, per-model parameters)
CASES: dict[str, tuple[int, bool, dict, dict]] = {
    "linear": (3, False, {}, {"weight": 0.4}),
    "task_arithmetic": (3, True, {}, {"weight": 0.4}),
    "ties": (3, True, {}, {"weight": 0.6, "density": 0.3}),
    "breadcrumbs": (3, True, {}, {"weight": 0.5, "density": 0.8, "gamma": 0.02}),
    "breadcrumbs_ties": (3, True, {}, {"weight": 0.5, "density": 0.8, "gamma": 0.02}),
    "sce": (3, True, {"select_topk": 0.4}, {}),
    "slerp": (1, True, {"t": 0.35}, {}),
    "nuslerp": (2, False, {}, {"weight": 0.5}),
    "multislerp": (3, False, {}, {"weight": 1.0}),
    "karcher": (3, False, {}, {}),
    "model_stock": (3, True, {}, {}),
    "nearswap": (1, True, {"t": 0.002}, {}),
    "dare_linear": (3, True, {}, {"weight": 0.5, "density": 0.4}),
    "dare_ties": (3, True, {}, {"weight": 0.5, "density": 0.4}),
    "della": (3, True, {"epsilon": 0.1, "lambda": 1.0}, {"weight": 0.5, "density": 0.4}),
    "della_linear": (3, True, {"epsilon": 0.1, "lambda": 1.0}, {"weight": 0.5, "density": 0.4}),
}


def llama_layout(layers: int = 4, hidden: int = 512, inter: int = 1376, vocab: int = 4000) -> dict[str, tuple]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    return shapes


def llama_config(layers: int = 4, hidden: int = 512, inter: int = 1376, vocab: int = 4000) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 8,
            "num_key_value_heads": 8, "vocab_size": vocab, "rms_norm_eps": 1e-6, "torch_dtype": "float32",
            "tie_word_embeddings": False, "max_position_embeddings": 512}


def build_set(kind: str, work: Path, n: int = 3) -> tuple[Path, list[Path]]:
    """A base and `n` fine-tunes (base + small Gaussian steps), fp32, as directories `mergekit` and mergeyard read."""
    import torch
    from safetensors.torch import save_file

    root = work / f"parity-{kind}"
    marker = root / "built.json"
    dirs = [root / "base"] + [root / f"ft{i}" for i in range(n)]
    if marker.exists():
        return dirs[0], dirs[1:]
    shutil.rmtree(root, ignore_errors=True)
    if kind == "minilm":
        return minilm_set(root, n)
    torch.manual_seed(0)
    if kind == "vit":
        import open_clip

        base = {k: v.detach().contiguous() for k, v in open_clip.create_model("ViT-B-32").visual.state_dict().items()}
        config = None
    else:
        base = {k: torch.randn(s) * (0.02 if len(s) == 2 else 1.0) + (1.0 if len(s) == 1 else 0.0)
                for k, s in llama_layout().items()}
        config = llama_config()
    for i, d in enumerate(dirs):
        d.mkdir(parents=True)
        g = torch.Generator().manual_seed(100 + i)
        sd = base if i == 0 else {k: v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        if config:
            (d / "config.json").write_text(json.dumps(config))
    marker.write_text("{}")
    return dirs[0], dirs[1:]


def minilm_set(root: Path, n: int) -> tuple[Path, list[Path]]:
    """Real fine-tunes: all-MiniLM-L6-v2 and its four text-suite fine-tunes (tests/text_fixture.py builds them once
    into tests/.cache from wheels on the package index), encoders only, under the pretrained model's names."""
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from text_fixture import build_text_suite

    suite = build_text_suite()
    # float tensors only (position_ids is a buffer the fine-tunes do not store)
    base_sd = {k: v for k, v in load_file(str(Path(suite.base) / "model.safetensors")).items() if v.is_floating_point()}
    dirs = [root / "base"] + [root / f"ft{i}" for i in range(n)]
    for d, source in zip(dirs, [None, *list(suite.finetuned.values())[:n]]):
        d.mkdir(parents=True)
        if source is None:
            sd = base_sd
        else:
            tuned = load_file(str(Path(source) / "model.safetensors"))
            sd = {k: tuned["bert." + k] for k in base_sd}  # the task model's encoder, without its head
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    (root / "built.json").write_text("{}")
    return dirs[0], dirs[1:]


def config_for(method: str, base: Path, models: list[Path]) -> dict:
    take, uses_base, params, per_model = CASES[method]
    cfg = {"merge_method": method, "dtype": "float32",
           "models": [{"model": str(m), **({"parameters": dict(per_model)} if per_model else {})} for m in models[:take]]}
    if uses_base:
        cfg["base_model"] = str(base)
    if method in ("karcher", "multislerp", "linear"):  # the base as one more model
        cfg["models"].append({"model": str(base), **({"parameters": dict(per_model)} if per_model else {})})
    if params:
        cfg["parameters"] = dict(params)
    return cfg


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return wall, proc.stdout


def mergeyard_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MERGEYARD_"))}
    return {**env, "MERGEYARD_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def run_mergeyard(cfg_path: Path, home: Path, name: str) -> tuple[float, dict]:
    wall, out = timed([*MERGEYARD, "merge", str(cfg_path), "--name", name, "--json", "--by-reference"],
                      env=mergeyard_env(home))
    return wall, json.loads(out[out.index("{"):])


def _ties_cut(p: dict):
    """TIES keeps the top int(density·n) of |τ|: one cut, at n − k in ascending order."""
    return lambda n: [n - max(1, int(p["density"] * n))]


def _breadcrumbs_cuts(p: dict):
    """Breadcrumbs keeps ascending positions [n − k − ⌊γn⌋, n − ⌊γn⌋) of |τ|, k = ⌊density·n⌋ (as mergekit counts)."""
    def cuts(n: int) -> list[int]:
        k, top = int(p["density"] * n), int(p["gamma"] * n)
        low = max(0, n - k - top)
        return [low, low + k]
    return cuts


MAGNITUDE_CUTS = {"ties": _ties_cut, "breadcrumbs": _breadcrumbs_cuts, "breadcrumbs_ties": _breadcrumbs_cuts}


def outside_ties(ours: Path, theirs: Path, base: Path, models: list[Path], cuts) -> dict:
    """Where the two outputs differ, whether it is at a tie: an element whose |τ| equals the value at a cut that
    falls inside a run of equal magnitudes (which of them is kept is each tool's own tie-breaking: mergekit's
    argsort order, mergeyard's flat index). Cuts come from torch.sort here, independently of both tools."""
    import torch

    from merging.checkpoints.checkpoint import Checkpoint

    a, b, c = Checkpoint(ours), Checkpoint(theirs), Checkpoint(base)
    ms = [Checkpoint(m) for m in models]
    worst_untied, n_diff, n_at_ties = 0.0, 0, 0
    for name in a.names:
        delta = (a.read(name).float() - b.read(name).float()).abs().reshape(-1)
        differs = delta > 1e-5
        if not bool(differs.any()):
            continue
        ref = c.read(name).float().reshape(-1)
        tied = torch.zeros_like(differs)
        for m in ms:
            mag = (m.read(name).float().reshape(-1) - ref).abs()
            ordered = torch.sort(mag).values
            for cut in cuts(mag.numel()):
                if 0 < cut < mag.numel() and ordered[cut - 1] == ordered[cut]:
                    tied |= mag == ordered[cut]
        n_diff += int(differs.sum())
        n_at_ties += int((differs & tied).sum())
        if bool((~tied).any()):
            worst_untied = max(worst_untied, float(delta[~tied].max()))
    return {"max_untied": worst_untied, "n_tied": f"{n_at_ties} of {n_diff}"}


def compare(ours: Path, theirs: Path, base: Path) -> dict:
    from merging.checkpoints.checkpoint import Checkpoint

    a, b, c = Checkpoint(ours), Checkpoint(theirs), Checkpoint(base)
    names = [n for n in a.names if n in b.entries]
    missing = sorted(set(a.names) ^ set(b.names))
    n_total = n_diff = 0
    worst = 0.0
    stats = {"ours": [0, 0.0, 0.0, 0], "theirs": [0, 0.0, 0.0, 0]}  # kept, sum, sum of squares, count
    for name in names:
        x, y = a.read(name).float(), b.read(name).float()
        d = (x - y).abs()
        n_total += d.numel()
        n_diff += int((d > 1e-5).sum())
        worst = max(worst, float(d.max())) if d.numel() else worst
        if name in c.entries and c.entries[name].shape == a.entries[name].shape:
            ref = c.read(name).float()
            for key, t in (("ours", x), ("theirs", y)):
                tv = (t - ref).reshape(-1).double()
                s = stats[key]
                s[0] += int((tv != 0).sum())
                s[1] += float(tv.sum())
                s[2] += float((tv * tv).sum())
                s[3] += tv.numel()
    out = {"frac": n_diff / max(n_total, 1), "max": worst, "missing": missing}
    for key, (kept, s1, s2, count) in stats.items():
        mean = s1 / max(count, 1)
        out[key] = {"kept": kept / max(count, 1), "mean": mean, "std": max(s2 / max(count, 1) - mean * mean, 0.0) ** 0.5}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / ".work")
    ap.add_argument("--sets", default="vit,llama")
    ap.add_argument("--methods", default=",".join(CASES))
    ap.add_argument("--mergekit-venv", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    venv = args.mergekit_venv or args.work / "mergekit-venv"
    ensure_mergekit(venv)
    rows = []
    for kind in args.sets.split(","):
        base, models = build_set(kind, args.work)
        if kind != "llama":  # mergekit-pytorch reads files, not directories
            base, models = base / "model.safetensors", [m / "model.safetensors" for m in models]
        home = args.work / f"parity-home-{kind}"
        shutil.rmtree(home, ignore_errors=True)
        tool = venv / "bin" / ("mergekit-yaml" if kind == "llama" else "mergekit-pytorch")
        cases = [m for m in args.methods.split(",") if m]
        if kind == "llama" and "passthrough" not in cases:
            cases.append("passthrough")
        for method in cases:
            cfg_dir = args.work / f"parity-cfg-{kind}"
            cfg_dir.mkdir(exist_ok=True)
            if method == "passthrough":  # a frankenmerge: layers 0-2 of ft0, then 1-3 of ft1 (6 layers)
                cfg = {"merge_method": "passthrough", "dtype": "float32",
                       "slices": [{"sources": [{"model": str(models[0]), "layer_range": [0, 3]}]},
                                  {"sources": [{"model": str(models[1]), "layer_range": [1, 4]}]}]}
            else:
                cfg = config_for(method, base, models)
            cfg_path = cfg_dir / f"{method}.yml"
            cfg_path.write_text(json.dumps(cfg, indent=1))
            theirs = args.work / f"parity-out-{kind}-{method}"
            shutil.rmtree(theirs, ignore_errors=True)
            row = {"set": kind, "method": method}
            try:
                row["mergekit_s"], _ = timed([str(tool), str(cfg_path), str(theirs)])
            except RuntimeError as exc:
                row["error"] = f"mergekit: {exc}"
                rows.append(row)
                print(row, file=sys.stderr)
                continue
            try:
                row["mergeyard_s"], info = run_mergeyard(cfg_path, home, f"{kind}-{method}")
                row.update(compare(Path(info["store_path"]), theirs, base))
                if method in MAGNITUDE_CUTS:
                    row.update(outside_ties(Path(info["store_path"]), theirs, base, models[:CASES[method][0]],
                                            MAGNITUDE_CUTS[method](CASES[method][3])))
                if method in RANDOM:
                    # a second home: the first would answer the same recipe from its cache
                    again_home = args.work / f"parity-home-{kind}-again"
                    shutil.rmtree(again_home, ignore_errors=True)
                    _, again = run_mergeyard(cfg_path, again_home, f"{kind}-{method}")
                    shutil.rmtree(again_home, ignore_errors=True)
                    row["same_seed"] = again["digest"] == info["digest"]
            except RuntimeError as exc:
                row["error"] = f"mergeyard: {exc}"
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("ours", "theirs")}), file=sys.stderr)
    print_table(rows)
    (args.work / "mergekit_parity.json").write_text(json.dumps(rows, indent=1))


def print_table(rows: list[dict]) -> None:
    print(f"\n{'set':<6} {'method':<17} {'frac>1e-5':>10} {'max|Δ|':>9} {'mergeyard s':>11} {'mergekit s':>10} "
          f"{'ratio':>6}  notes")
    for r in rows:
        if "error" in r:
            print(f"{r['set']:<6} {r['method']:<17} {'—':>10} {'—':>9} {'—':>11} {'—':>10} {'—':>6}  {r['error']}")
            continue
        notes = []
        if r["missing"]:
            notes.append(f"names only in one output: {len(r['missing'])}")
        if r.get("max_untied") is not None:
            notes.append(f"max|Δ| outside threshold ties {r['max_untied']:.1e} (differing elements at ties: {r['n_tied']})")
        if r["method"] in RANDOM:
            o, t = r["ours"], r["theirs"]
            notes.append(f"kept {o['kept']:.4f}/{t['kept']:.4f} mean {o['mean']:.2e}/{t['mean']:.2e} "
                         f"std {o['std']:.3e}/{t['std']:.3e} (mergeyard/mergekit); same seed → same digest: "
                         f"{r['same_seed']}")
        print(f"{r['set']:<6} {r['method']:<17} {r['frac']:>10.2e} {r['max']:>9.2e} {r['mergeyard_s']:>11.2f} "
              f"{r['mergekit_s']:>10.2f} {r['mergekit_s'] / r['mergeyard_s']:>5.2f}×  {'; '.join(notes)}")
    print("\nratio: mergekit's whole process / mergeyard's. Random methods: the masks differ by design (each tool's "
          "own generator); compare their statistics.")


if __name__ == "__main__":
    main()
