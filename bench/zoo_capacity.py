"""How much does one fine-tune make the zoo's CLIP forget the other tasks, and what changes that? A short
pre-training at a given width (or the committed asset), then full TA8-protocol fine-tunes of a few targets,
each scored on every ta8-mini task.

    python bench/zoo_capacity.py [--width 128] [--embed 128] [--steps 1000] [--patch 8] [--tasks digits,colours,position]
                                 [--task-looks] [--asset] [--prompts '{"digits": "the number {c}", ...}'] [--scale S]

Run it at two widths and compare the `others` columns: the mean accuracy of the other seven tasks under
θ0 + α·τ_t (zero-shot in parentheses), and how far τ_t turns image features (mean 1 − cos to the base's) on
the task's own test images and on the others'. Pre-training here is short (1,000 steps, not the asset's
4,000), so it compares widths with each other, not with the committed zoo. Nothing is written to disk.

`--scale`: the logit scale fine-tunes use. Since stop 18 it is the CLIP's own learned one (TA8's heads carry
logit_scale.exp(); the asset's is 27.5); before, a fixed 100, at which every figure in the next three paragraphs
was measured (`--scale 100` reproduces them). With the asset (`--asset`), a full fine-tune of
digits / colours / position leaves the other tasks at 36.7 / 36.7 / 36.3 at the learned scale and 23.8 / 26.8 /
33.5 at `--scale 100` (zero-shot 46.8 / 44.9 / 48.4), own accuracy 93.2-99.6 either way: the sharper temperature is
what made the fine-tunes forget.

Measured on 2 cores (torch 2.14.1), pre-training 1,000 steps: width 128 (0.84M-parameter tower) 303 s,
width 256 (3.25M) 746 s; the whole run about 10 and 20 minutes. Others under a full fine-tune of
digits / colours / position: 21.3 / 24.8 / 31.2 at width 128, 21.5 / 23.5 / 32.2 at width 256,
19.9 / 19.8 / 26.2 at width 128 with `--embed 512` (pre-training 357 s).

`--task-looks` gives each ta8-mini task its own background (near-black for digits, paper for letters, grey for
colours, green felt for counts, ...) in pre-training and task images alike, as each TA8 dataset has its own look:
if the damage came from every task's images looking alike, it would shrink. Measured at width 128: others
23.4 / 25.4 / 26.8 (zero-shot 46.1 / 43.5 / 42.8) — no better.

`--asset` skips pre-training and fine-tunes the committed asset, as `mergeyard zoo build` does; `--prompts` rewords
the zero-shot heads of some targets (a JSON object of task → template with `{c}`), and the run first lists, per
target, the prompt words that no pre-training caption contains (the text tower never trained their embeddings).
Six of the eight committed prompts hold one ("digit", "colour", "texture", "count", "place", "border"). Reworded from
caption words only (`{"digits": "the number {c}", "colours": "a {c} shape", "textures": "a picture with {c}",
"counts": "a die showing {c}", "position": "a shape at the {c}", "frames": "{c}"}`), zero-shot rises from 45.8 to
65.1, yet a full fine-tune of digits / colours / position still takes the others from 64.0 / 62.2 / 61.0 to
37.4 / 39.1 / 43.4: the untrained words lower zero-shot, they do not cause the forgetting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import evaluation.zoo.clip_model as clip_model  # noqa: E402
import evaluation.zoo.render as render  # noqa: E402
import evaluation.zoo.tasks as zoo_tasks  # noqa: E402
import evaluation.zoo.train as zoo_train  # noqa: E402
from evaluation.zoo.asset import load_asset  # noqa: E402
from evaluation.zoo.build import settings_for  # noqa: E402
from evaluation.zoo.data import make_split  # noqa: E402
from evaluation.zoo.tasks import TA8_MINI  # noqa: E402
from evaluation.zoo.train import finetune, pretrain  # noqa: E402


# --task-looks: each target's background colour (RGB) and the spread of its brightness
LOOKS = {"digits": ((8, 8, 8), 10), "letters": ((225, 215, 190), 15), "colours": ((125, 125, 125), 15),
         "textures": ((20, 25, 70), 12), "counts": ((25, 80, 35), 12), "position": ((70, 30, 80), 12),
         "frequency": ((60, 40, 20), 12), "frames": ((110, 70, 40), 12)}


def use_task_looks() -> None:
    """Every task draws its canvas through render.background: while a target draws, answer with its own look
    (the task domain 20 levels brighter, as the plain task domain is); the other tasks keep the shared one."""
    drawing, shared = [None], render.background

    def background(rng, domain):
        if drawing[0] not in LOOKS:
            return shared(rng, domain)
        rgb, spread = LOOKS[drawing[0]]
        level = int(rng.integers(-spread, spread + 1)) + (0 if domain == "pretrain" else 20)
        tint = rng.integers(-6, 7, size=3)
        return tuple(int(np.clip(c + level + t, 0, 255)) for c, t in zip(rgb, tint))

    def wrapped(name, draw):
        def draw_with_look(rng, label, domain):
            drawing[0] = name
            try:
                return draw(rng, label, domain)
            finally:
                drawing[0] = None
        return draw_with_look

    render.background = background
    for name in LOOKS:
        zoo_tasks.TASKS[name] = dataclasses.replace(zoo_tasks.TASKS[name], draw=wrapped(name, zoo_tasks.TASKS[name].draw))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=128, help="the image tower's width (the asset's: 128)")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--embed", type=int, default=128, help="the joint image-text embedding's size (the asset's: 128)")
    ap.add_argument("--steps", type=int, default=1000, help="pre-training steps")
    ap.add_argument("--tasks", default="digits,colours,position", help="targets to fine-tune")
    ap.add_argument("--alphas", default="0.5,1.0")
    ap.add_argument("--task-looks", action="store_true", help="give each target task its own background, in both domains")
    ap.add_argument("--asset", action="store_true", help="fine-tune the committed asset instead of pre-training")
    ap.add_argument("--prompts", default="{}", help="JSON {task: prompt template with {c}} for the zero-shot heads")
    ap.add_argument("--scale", type=float, default=None,
                    help="fine-tune at this logit scale instead of the CLIP's own learned one (before stop 18: 100)")
    args = ap.parse_args()
    targets = args.tasks.split(",")
    try:
        prompts = json.loads(args.prompts)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --prompts is not JSON: {e}")
    if not isinstance(prompts, dict) or any(t not in TA8_MINI or "{c}" not in str(p) for t, p in prompts.items()):
        raise SystemExit("error: --prompts must map ta8-mini tasks to templates containing {c}")
    if args.asset and (args.width, args.patch, args.embed, args.task_looks) != (128, 8, 128, False):
        raise SystemExit("error: --asset fine-tunes the committed asset: it takes no --width, --patch, --embed or --task-looks")
    if args.width % 32:
        raise SystemExit("error: --width must be a multiple of 32 (the tower's head width)")
    if unknown := [t for t in targets if t not in TA8_MINI]:
        raise SystemExit(f"error: {unknown[0]!r} is not a ta8-mini task")
    # Every zoo step builds its model from clip_model.CONFIG: changing it here changes the tower everywhere
    # in this process (pre-training, fine-tunes, scoring) and nowhere else.
    clip_model.CONFIG["vision_cfg"].update(width=args.width, patch_size=args.patch)
    clip_model.CONFIG["embed_dim"] = args.embed
    if args.task_looks:
        use_task_looks()

    started = time.perf_counter()
    if args.asset:
        clip, record = load_asset()
        print(f"the committed asset {record['digest'][:19]}", flush=True)
    else:
        clip = pretrain(args.steps, batch=256, lr=2e-3, per_class=400, noise=10.0, seed=0)
        parameters = sum(p.numel() for p in clip.visual.parameters())
        print(f"width {args.width}, patch {args.patch}, embedding {args.embed}: {parameters / 1e6:.2f}M-parameter tower, "
              f"pre-trained {args.steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    if args.scale is not None:  # finetune() asks train.logit_scale for its temperature
        zoo_train.logit_scale = lambda _clip: args.scale
    print(f"fine-tunes at logit scale {zoo_train.logit_scale(clip):.2f}")
    # The vocabulary is fixed by now (pre-training or the asset's check built it), so a reworded prompt's new
    # words tokenize as <unk>; the heads and the fine-tunes below read the reworded templates.
    for task, template in prompts.items():
        zoo_tasks.TASKS[task] = dataclasses.replace(zoo_tasks.TASKS[task], prompt=template)
    caption_words = {w for t in zoo_tasks.TASKS.values() for c in t.classes for w in clip_model._words(t.caption.format(c=c))}
    for t in TA8_MINI:
        task = zoo_tasks.TASKS[t]
        unseen = sorted({w for c in task.classes for w in clip_model._words(task.prompt.format(c=c))} - caption_words)
        print(f"  {t:<10} prompt {task.prompt!r:<24} words no caption holds: {', '.join(unseen) or '-'}")
    heads = {t: clip_model.zero_shot_head(clip, t) for t in TA8_MINI}
    test = {t: make_split(t, "test", 60, 0) for t in TA8_MINI}
    base = {k: v.detach().clone() for k, v in clip.visual.state_dict().items()}

    @torch.no_grad()
    def score(state):
        tower = clip_model.create_vision_tower()
        tower.load_state_dict(state)
        tower.eval()
        accuracy, features = {}, {}
        for t in TA8_MINI:
            f = F.normalize(tower(clip_model.to_input(test[t].images)), dim=-1)
            features[t] = f
            accuracy[t] = 100 * float(((f @ heads[t].T).argmax(-1) == test[t].labels).float().mean())
        return accuracy, features

    zero_shot, base_features = score(base)
    print(f"zero-shot average {sum(zero_shot.values()) / len(zero_shot):.1f}")
    print(f"{'fine-tune':<12}{'α':>5}{'own':>7}{'(zs)':>7}{'others':>8}{'(zs)':>7}{'turn own':>10}{'turn others':>13}"
          f"{'‖τ‖/‖θ0‖':>10}")
    for task in targets:
        tuned = finetune(clip, task, settings_for(task, False), seed=0)
        floats = [k for k in base if base[k].is_floating_point()]
        ratio = (sum(float((tuned[k] - base[k]).norm() ** 2) for k in floats)
                 / sum(float(base[k].norm() ** 2) for k in floats)) ** 0.5
        others = [t for t in TA8_MINI if t != task]
        for alpha in (float(a) for a in args.alphas.split(",")):
            state = {k: base[k] + alpha * (tuned[k] - base[k]) if k in floats else base[k] for k in base}
            accuracy, features = score(state)
            turn = {t: float((1 - (features[t] * base_features[t]).sum(-1)).mean()) for t in TA8_MINI}
            mean = lambda d: sum(d[t] for t in others) / len(others)  # noqa: E731
            print(f"{task:<12}{alpha:5g}{accuracy[task]:7.1f}{zero_shot[task]:7.1f}{mean(accuracy):8.1f}"
                  f"{mean(zero_shot):7.1f}{turn[task]:10.2f}{mean(turn):13.2f}{ratio:10.3f}", flush=True)


if __name__ == "__main__":
    main()
