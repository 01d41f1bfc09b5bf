"""MuDSC on models trained from different random initialisations (the paper's CIFAR-100 50+50 pattern).

Two (and four) networks of one architecture, each trained from its own seed on a disjoint subset of
the 32-class `glyphs` family, are merged into one whose stacked heads answer the joint task. Rows:
each model alone (its own head, on the joint test set), the ensemble of all of them (an upper bound:
K networks run), plain weight averaging (heads stacked), averaging with BatchNorm statistics reset,
weight matching (α = 1), activation matching (α = 0), MuDSC over an α grid in align and zip modes, and
MuDSC with α chosen on a validation split (never on the test split).

    .venv/bin/python bench/mudsc.py [--arch cnn|mlp|vit] [--models 2,4] [--steps 800]

Trained models are cached under bench/.work/mudsc/ by their settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / ".work" / "mudsc"


def trained(arch: str, classes: list[int], seed: int, steps: int, width: int | None, per_class: int):
    from evaluation.zoo.scratch import ARCHITECTURES, train_on_subset

    key = f"{arch}-w{width}-s{seed}-steps{steps}-pc{per_class}-{'_'.join(map(str, classes))}"
    path = WORK / f"{key}.safetensors"
    kwargs = {"width": width} if width else {}
    if path.is_file():
        model = ARCHITECTURES[arch](len(classes), **kwargs)
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    model = train_on_subset(arch, classes, seed=seed, steps=steps, width=width, per_class=per_class)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def main() -> None:
    from evaluation.zoo.clip_model import to_input
    from evaluation.zoo.scratch import ARCHITECTURES, disjoint_subsets, glyph_split, joint_accuracy
    from merging.algorithms.mudsc import MuDSCParams, Matching, merge_states, mudsc, permutation_spec, reset_batchnorm
    from merging.algorithms.mudsc.matching import concat_target, identity_target

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="cnn", choices=["cnn", "mlp", "vit"])
    ap.add_argument("--models", default="2,4")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--alphas", default="0,0.1,0.3,0.5,0.7,0.9,1")
    ap.add_argument("--calibration", type=int, default=16, help="calibration images per class")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    alphas = [float(a) for a in args.alphas.split(",")]
    test = glyph_split("test", 40)
    validation = glyph_split("validation", 20)
    report = {}
    for k in (int(x) for x in args.models.split(",")):
        started = time.perf_counter()
        subsets = disjoint_subsets(k)
        joint = [c for s in subsets for c in s]
        models = [trained(args.arch, s, seed=100 + i, steps=args.steps, width=args.width, per_class=args.per_class)
                  for i, s in enumerate(subsets)]
        trained_s = time.perf_counter() - started
        kwargs = {"width": args.width} if args.width else {}

        def create_merged():
            return ARCHITECTURES[args.arch](len(joint), **kwargs)

        def create_single():
            return ARCHITECTURES[args.arch](len(subsets[0]), **kwargs)

        calib_split = glyph_split("calibration", args.calibration)
        calib_split = calib_split.subset(joint)
        calib = [to_input(calib_split.images[i:i + 128]) for i in range(0, len(calib_split.labels), 128)]
        example = calib[0][:8]
        spec = permutation_spec(create_single(), example, outputs="concat")
        states = [m.state_dict() for m in models]

        def score(state, split) -> float:
            net = create_merged()
            net.load_state_dict(state)
            net.eval()
            return joint_accuracy(net, joint, split)

        rows: list[tuple[str, float, float]] = []
        for i, m in enumerate(models):  # alone: its own head, the other classes never predicted
            pad = len(joint) - len(subsets[i])
            offset = sum(len(s) for s in subsets[:i])

            def alone(x, m=m, offset=offset, pad=pad):
                out = m(x)
                full = torch.full((out.shape[0], len(joint)), -1e9)
                full[:, offset:offset + out.shape[1]] = out
                return full

            rows.append((f"model {i} alone", joint_accuracy(alone, joint, validation), joint_accuracy(alone, joint, test)))
        ensemble = lambda x: torch.cat([m(x) for m in models], dim=1)  # noqa: E731
        rows.append((f"ensemble of {k} (upper bound, {k}× compute)", joint_accuracy(ensemble, joint, validation),
                     joint_accuracy(ensemble, joint, test)))
        plain = {g.name: Matching(concat_target(k, g.size) if g.kind == "concat" else identity_target(k, g.size),
                                  k * g.size if g.kind == "concat" else g.size) for g in spec.groups}
        averaged = merge_states(states, [1.0] * k, spec, plain)
        rows.append(("weight averaging (heads stacked)", score(averaged, validation), score(averaged, test)))
        if spec.has_batchnorm:
            reset = reset_batchnorm(create_merged, averaged, calib)
            rows.append(("weight averaging + BatchNorm reset", score(reset, validation), score(reset, test)))
        grid: dict[str, dict[float, tuple[float, float]]] = {}
        timings = {}
        for mode in ("align", "zip"):
            grid[mode] = {}
            for alpha in alphas:
                t0 = time.perf_counter()
                result = mudsc(states, spec, create_single, calib, MuDSCParams(alpha=alpha, mode=mode),
                               create_merged=create_merged)
                timings[(mode, alpha)] = time.perf_counter() - t0
                grid[mode][alpha] = (score(result.state, validation), score(result.state, test))
                print(f"  k={k} {mode} α={alpha:g}: val {100 * grid[mode][alpha][0]:.1f} "
                      f"test {100 * grid[mode][alpha][1]:.1f} ({timings[(mode, alpha)]:.1f} s, {result.sweeps} sweeps)",
                      flush=True)
        if 1.0 in grid["align"]:
            rows.append(("weight matching (align, α=1)", *grid["align"][1.0]))
        if 0.0 in grid["align"]:
            rows.append(("activation matching (align, α=0)", *grid["align"][0.0]))
        if 0.0 in grid["zip"]:
            rows.append(("ZipIt (zip, α=0)", *grid["zip"][0.0]))
        for mode in ("align", "zip"):
            for alpha, (v, t) in grid[mode].items():
                rows.append((f"MuDSC {mode} α={alpha:g}", v, t))
        best = {mode: max(grid[mode], key=lambda a: grid[mode][a][0]) for mode in grid}
        for mode, alpha in best.items():
            rows.append((f"MuDSC {mode}, α={alpha:g} chosen on validation", *grid[mode][alpha]))

        print(f"\n{args.arch}, {k} models trained from different seeds on disjoint {len(subsets[0])}-class subsets "
              f"of glyphs ({len(joint)} classes); trained in {trained_s:.0f} s")
        print(f"{'method':<52}{'val %':>8}{'test %':>8}")
        print("-" * 68)
        for label, v, t in rows:
            print(f"{label:<52}{100 * v:>8.1f}{100 * t:>8.1f}")
        averaging = dict((r[0], r[2]) for r in rows)["weight averaging (heads stacked)"]
        chosen = {mode: grid[mode][best[mode]][1] for mode in best}
        print("\nacceptance (test accuracy; α chosen on the validation split)")
        for mode, value in chosen.items():
            single = {a: grid[mode][a][1] for a in (0.0, 1.0) if a in grid[mode]}
            better = max(single.values()) if single else 0.0
            print(f"  [{'x' if value >= averaging + 0.20 else ' '}] MuDSC {mode} ≥ averaging + 20 points: "
                  f"{100 * value:.1f} vs {100 * (averaging + 0.2):.1f}")
            print(f"  [{'x' if value >= better else ' '}] MuDSC {mode} ≥ the better single-space matching in {mode} "
                  f"mode (α=0: {100 * single.get(0.0, 0):.1f}, α=1: {100 * single.get(1.0, 0):.1f}): {100 * value:.1f}")
        report[k] = {"rows": rows, "grid": {m: {str(a): v for a, v in g.items()} for m, g in grid.items()},
                     "seconds": {f"{m}/{a}": round(s, 2) for (m, a), s in timings.items()}}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
