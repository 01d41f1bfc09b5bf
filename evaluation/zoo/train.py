"""Pre-training the zoo's CLIP and fine-tuning its image tower per task (the TA8 protocol).

Pre-training is contrastive at the class level: each image is scored against
the captions of every class of every task, so two images of one class are
never each other's negatives. Fine-tuning trains the image tower only, against
the task's frozen zero-shot head (normalised prompt embeddings) at the CLIP's
own learned logit scale, as TA8's heads are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from evaluation.zoo.clip_model import create_clip, logit_scale, logits, to_input, tokenize, zero_shot_head
from evaluation.zoo.data import make_split
from evaluation.zoo.tasks import TASKS

Progress = Callable[[str, int, int], None] | None


@dataclass(frozen=True)
class FinetuneSettings:
    """One fine-tune's budget: AdamW steps, peak learning rate, batch, training images a class, and AdamW's eps."""
    steps: int
    lr: float
    batch: int
    per_class: int
    eps: float = 1e-8


def _captions() -> tuple[list[str], dict[tuple[str, int], int]]:
    texts, index = [], {}
    for name, task in TASKS.items():
        for c, phrase in enumerate(task.classes):
            index[(name, c)] = len(texts)
            texts.append(task.caption.format(c=phrase))
    return texts, index


def _cosine_lr(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _optimise(opt: torch.optim.Optimizer, steps: int, lr: float, warmup: int, loss_at: Callable[[], torch.Tensor],
              stage: str, progress: Progress) -> None:
    """AdamW-style loop with linear warm-up and cosine decay; `loss_at()` draws a batch and returns its loss."""
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr, warmup)
        loss = loss_at()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            progress(stage, step + 1, steps)


def noisy(images_uint8: torch.Tensor, g: torch.Generator, max_sigma: float) -> torch.Tensor:
    """Per-image Gaussian pixel noise of a random strength: features that survive the task domain's noise."""
    x = images_uint8.float()
    sigma = torch.rand(len(x), 1, 1, 1, generator=g) * max_sigma
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 255)


def pretrain(steps: int, batch: int = 256, lr: float = 2e-3, per_class: int = 300, seed: int = 0,
             noise: float = 10.0, progress: Progress = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    clip = create_clip()
    texts, index = _captions()
    tokens = tokenize(texts)
    images, targets = [], []
    for name in TASKS:
        split = make_split(name, "pretrain", per_class, seed)
        images.append(split.images)
        targets.append(torch.tensor([index[(name, int(c))] for c in split.labels]))
    images, targets = torch.cat(images), torch.cat(targets)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.1)

    def contrastive_loss() -> torch.Tensor:
        idx = torch.randint(len(images), (batch,), generator=g)
        img = F.normalize(clip.encode_image(to_input(noisy(images[idx], g, noise))), dim=-1)
        txt = F.normalize(clip.encode_text(tokens), dim=-1)
        return F.cross_entropy(clip.logit_scale.exp().clamp(max=100) * img @ txt.T, targets[idx])

    clip.train()
    _optimise(opt, steps, lr, max(1, steps // 20), contrastive_loss, "pretrain", progress)
    clip.eval()
    return clip


def finetune(clip: torch.nn.Module, task: str, settings: FinetuneSettings, seed: int = 0,
             progress: Progress = None) -> dict[str, torch.Tensor]:
    """The fine-tuned image tower's state dict (the head stays frozen, as in TA8, at the CLIP's own logit scale)."""
    torch.manual_seed(seed)
    head, scale = zero_shot_head(clip, task), logit_scale(clip)
    visual = create_clip().visual
    visual.load_state_dict(clip.visual.state_dict())
    train = make_split(task, "train", settings.per_class, seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(visual.parameters(), lr=settings.lr, eps=settings.eps, weight_decay=0.0)

    def classification_loss() -> torch.Tensor:
        idx = torch.randint(len(train.labels), (settings.batch,), generator=g)
        return F.cross_entropy(logits(visual, head, to_input(train.images[idx]), scale), train.labels[idx])

    visual.train()
    _optimise(opt, settings.steps, settings.lr, max(1, settings.steps // 10), classification_loss, f"finetune {task}",
              progress)
    visual.eval()
    return {k: v.detach().clone() for k, v in visual.state_dict().items()}
