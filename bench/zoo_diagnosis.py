"""Why merges of the zoo's fine-tunes score what they score: the measurements behind `bench/ta8_mini.py`.

    python bench/zoo_diagnosis.py --zoo DIR [--tasks digits,letters,...] [--alphas 0.125,0.25,0.5]

Task arithmetic at λ scores task t roughly as the sum of two effects, printed
here per task (accuracy %, on each task's own test split):

  own(α)     θ0 + α·τ_t                  how much of its fine-tune's gain a fraction of τ_t keeps
  others(α)  θ0 + α·Σ_{j≠t} τ_j          what the other task vectors do to task t (interference)

Merges reach zero-shot + 10 only where own(α) rises fast at small α and
others(α) stays near zero-shot. TIES assumes a task vector's few largest
entries carry it: `trim d` is the fine-tune with τ_t cut to its top d by
magnitude (global, as TIES's reference), with the share of ‖τ_t‖² kept.
Then where the interference comes from, per fine-tune t: how far its image
features turn (mean 1 − cos to the base's features) on its own test images and
on the other tasks', the share of the others' feature change that is the same
for every image (‖mean Δf‖² / mean ‖Δf‖²: a constant pull, which biases each
other task towards the classes whose heads lie along it), and the other tasks'
accuracy under θ0 + τ_t beside θ0 + ρ_t, where ρ_t is Gaussian noise with
τ_t's norm in every tensor (a control: a perturbation as large but without the
fine-tune's direction), and once more on images drawn in the pre-training
domain (an unseen draw: other fonts, palette and no sensor noise) — if the
damage came from the task domain's shift, which every task's test images
share, it would be smaller there.
Last, the tensors holding the largest shares of ‖τ_t‖² (where fine-tuning
moved the tower). Everything is computed in memory from the zoo's
safetensors; merges go through the engine into a temporary directory and are recorded nowhere.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from evaluation.evaluator import evaluate_state, load_state  # noqa: E402
from evaluation.suite import Suite  # noqa: E402
from evaluation.suites import load_suite, suite_tasks  # noqa: E402
from evaluation.zoo.data import make_split  # noqa: E402
from merging.engine import run_merge  # noqa: E402
from merging.recipes.recipe import parse_recipe  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:  # where the engine writes each merge it is asked for
        diagnose(Path(tmp))


def diagnose(tmp: Path) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, required=True, help="a built zoo (its manifest.json)")
    ap.add_argument("--tasks", default=None, help="comma-separated fine-tuned tasks (default: ta8-mini's)")
    ap.add_argument("--alphas", default="0.125,0.25,0.5")
    ap.add_argument("--densities", default="0.2,0.5")
    args = ap.parse_args()
    if not (args.zoo / "manifest.json").is_file():
        raise SystemExit(f"error: no zoo at {args.zoo} (no manifest.json); build one with `mergeyard zoo build --out DIR`")
    manifest = json.loads((args.zoo / "manifest.json").read_text())
    suite = load_suite("zoo-all", str(args.zoo / "manifest.json"))
    if args.tasks:
        tasks = args.tasks.split(",")
    else:  # a --small zoo fine-tunes only some of ta8-mini
        tasks = [t for t in suite_tasks("ta8-mini") if t in manifest["finetuned"]]
    missing = [t for t in tasks if t not in manifest["finetuned"]]
    if missing:
        raise SystemExit(f"error: the zoo at {args.zoo} has no fine-tune of {missing[0]!r}")
    base = load_state(args.zoo / manifest["base"]["path"])
    paths = {t: args.zoo / manifest["finetuned"][t]["path"] for t in tasks}
    taus = {t: {k: v - base[k] for k, v in load_state(paths[t]).items()} for t in tasks}

    # the same tasks and heads, scored on pre-training-domain images from a data seed the asset never saw
    pretrain_domain = replace(suite, tasks={u: replace(suite.tasks[u], test=make_split(u, "pretrain", 40, 99))
                                            for u in tasks}, reference_accuracy={})

    def accuracy(state: dict[str, torch.Tensor], task: str, on: Suite = suite) -> float:
        return 100 * evaluate_state(state, on.subset([task])).tasks[0].accuracy

    def merged(method: str, models: list[str], params: dict) -> dict[str, torch.Tensor]:
        """The streaming engine's merge, so the diagnosis measures exactly what `ta8_mini.py` merges."""
        recipe = parse_recipe({"method": method, "base": str(args.zoo / manifest["base"]["path"]),
                               "models": [str(paths[t]) for t in models], "parameters": params})
        run_merge(recipe, tmp / "merged", overwrite=True)
        return load_state(tmp / "merged")

    def shifted(models: list[str], alpha: float) -> dict[str, torch.Tensor]:
        return merged("task_arithmetic", models, {"lambda": alpha})

    def trimmed(task: str, density: float) -> tuple[dict[str, torch.Tensor], float]:
        # TIES of one model: its sign election keeps every surviving entry, so this is the trim alone
        state = merged("ties", [task], {"density": density, "aggregate": "sum", "lambda": 1.0})
        kept = sum(float(((state[k] - base[k]) ** 2).sum()) for k in base)
        return state, kept / sum(float((v ** 2).sum()) for v in taus[task].values())

    alphas = [float(a) for a in args.alphas.split(",")]
    densities = [float(d) for d in args.densities.split(",")]
    if not all(0.0 < d <= 1.0 for d in densities):
        raise SystemExit("error: densities must lie in (0, 1]")
    columns = (["zero-shot", "fine-tuned"] + [f"own {a:g}" for a in alphas] + [f"others {a:g}" for a in alphas]
               + [f"trim {d:g}" for d in densities])
    rows = {}
    for t in tasks:
        others = [u for u in tasks if u != t]
        row = [accuracy(base, t), accuracy(load_state(paths[t]), t)]
        row += [accuracy(shifted([t], a), t) for a in alphas]
        row += [accuracy(shifted(others, a) if others else base, t) for a in alphas]
        kept = []
        for d in densities:
            state, share = trimmed(t, d)
            row.append(accuracy(state, t))
            kept.append(share)
        rows[t] = (row, kept)
        print(f"  {t} done", file=sys.stderr, flush=True)
    print(f"{'task':<12}" + "".join(f"{c:>13}" for c in columns) + "".join(f"{'‖τ‖² kept ' + str(d):>16}" for d in densities))
    for t, (row, kept) in rows.items():
        print(f"{t:<12}" + "".join(f"{x:13.1f}" for x in row) + "".join(f"{100 * s:15.0f}%" for s in kept))
    means = [sum(r[0][i] for r in rows.values()) / len(rows) for i in range(len(columns))]
    print(f"{'mean':<12}" + "".join(f"{x:13.1f}" for x in means))
    print("\nwhere the interference comes from (features: mean 1 − cos to the base's, on the task's own test "
          "images / on the other tasks'; others: mean accuracy of the other tasks)")
    print(f"{'fine-tune':<12}{'turn own':>10}{'turn others':>13}{'constant':>10}{'others θ0':>11}{'θ0+τ':>8}{'θ0+ρ':>8}"
          f"{'pre-training domain: θ0':>25}{'θ0+τ':>8}")
    base_features = {u: _features(suite, base, u) for u in tasks}
    noise = torch.Generator().manual_seed(0)
    for t in tasks:
        others = [u for u in tasks if u != t]
        tuned = load_state(paths[t])
        features = {u: _features(suite, tuned, u) for u in tasks}
        turn = {u: float((1 - (features[u] * base_features[u]).sum(-1)).mean()) for u in tasks}
        moved = {u: features[u] - base_features[u] for u in tasks}
        # the part of the other tasks' feature change that is the same for every image: a constant pull
        # biases each other task towards the classes whose heads lie along it
        constant = [float(moved[u].mean(0).norm() ** 2 / (moved[u] ** 2).sum(-1).mean()) for u in others]
        control = {}
        for k, v in taus[t].items():  # same norm as τ_t in every tensor, random direction
            r = torch.randn(v.shape, generator=noise)
            control[k] = base[k] + r * (v.norm() / r.norm().clamp(min=1e-12))
        mean_over = lambda state, on=suite: sum(accuracy(state, u, on) for u in others) / max(1, len(others))  # noqa: E731
        zero_shot = sum(rows[u][0][0] for u in others) / max(1, len(others))  # the table's zero-shot column
        print(f"{t:<12}{turn[t]:10.2f}{sum(turn[u] for u in others) / max(1, len(others)):13.2f}"
              f"{sum(constant) / max(1, len(constant)):10.2f}"
              f"{zero_shot:11.1f}{mean_over(tuned):8.1f}{mean_over(control):8.1f}"
              f"{mean_over(base, pretrain_domain):25.1f}{mean_over(tuned, pretrain_domain):8.1f}")

    print("\nlargest shares of ‖τ‖² (tensor, share, ‖Δ‖/‖θ0‖ of that tensor)")
    for t in tasks:
        energy = {k: float((v ** 2).sum()) for k, v in taus[t].items()}
        total = sum(energy.values())
        top = sorted(energy, key=energy.get, reverse=True)[:4]
        print(f"  {t:<12}" + "; ".join(
            f"{k} {energy[k] / total:.2f} ({float(taus[t][k].norm() / base[k].norm().clamp(min=1e-12)):.2f})" for k in top))


@torch.no_grad()
def _features(suite, state: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """The tower's normalised image embeddings of the task's test images."""
    model = suite.family.create_model()
    model.load_state_dict(state)
    model.eval()
    images = suite.family.preprocess(suite.tasks[task].test.images)
    return torch.nn.functional.normalize(torch.cat([model(x) for x in images.split(512)]), dim=-1)


if __name__ == "__main__":
    main()
