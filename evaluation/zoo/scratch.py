"""Models trained from scratch on disjoint class subsets of one task family: MuDSC's setting.

The paper's pattern is CIFAR-100 split 50+50: two networks of one
architecture, trained from different random initialisations on disjoint
halves of the classes, merged into one network whose stacked heads answer the
joint task. Here the family is `glyphs`: 32 printed symbols (0-9, A-V) drawn
by the zoo's renderer in its task domain (other fonts, palette drift, sensor
noise), so no data is downloaded. Architectures are a small CNN with
BatchNorm, an MLP and the zoo's ViT tower with a linear head.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.zoo import render as R
from evaluation.zoo.clip_model import CONFIG, to_input

GLYPHS = [str(i) for i in range(10)] + [chr(ord("A") + i) for i in range(22)]
FAMILY_VERSION = "glyphs-v1"
SPLITS = {"train": 0, "calibration": 1, "validation": 2, "test": 3}


@dataclass(frozen=True)
class FamilySplit:
    images: torch.Tensor  # N×32×32×3 uint8
    labels: torch.Tensor  # N int64, over the whole family

    def digest(self) -> str:
        h = hashlib.sha256(FAMILY_VERSION.encode())
        h.update(self.images.numpy().tobytes())
        h.update(self.labels.numpy().astype("<i8").tobytes())
        return h.hexdigest()

    def subset(self, classes: list[int]) -> "FamilySplit":
        keep = torch.isin(self.labels, torch.tensor(classes))
        return FamilySplit(self.images[keep], self.labels[keep])


@lru_cache(maxsize=16)
def glyph_split(split: str, per_class: int, seed: int = 0) -> FamilySplit:
    rng = np.random.default_rng([seed, 7919, SPLITS[split], per_class])
    labels = np.repeat(np.arange(len(GLYPHS)), per_class)
    rng.shuffle(labels)
    images = []
    for c in labels:
        img, d = R.canvas(rng, "task")
        R.glyph(d, GLYPHS[c], rng, "task", R.random_colour(rng, "task"), 22)
        images.append(R.finish(img, rng, "task"))
    return FamilySplit(torch.from_numpy(np.stack(images)), torch.from_numpy(labels.astype(np.int64)))


def disjoint_subsets(n_models: int, n_classes: int = len(GLYPHS), seed: int = 0) -> list[list[int]]:
    """The classes split into n equal, disjoint subsets (a seeded shuffle, so no subset is all digits)."""
    order = np.random.default_rng([seed, 104729]).permutation(n_classes).tolist()
    size = n_classes // n_models
    return [sorted(order[i * size:(i + 1) * size]) for i in range(n_models)]


class SmallCNN(nn.Module):
    def __init__(self, classes: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, classes)

    def forward(self, x):
        return self.head(self.features(x))


class MLP(nn.Module):
    def __init__(self, classes: int, width: int = 512):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, width), nn.ReLU(), nn.Linear(width, width),
                                  nn.ReLU(), nn.Linear(width, width // 2), nn.ReLU())
        self.head = nn.Linear(width // 2, classes)

    def forward(self, x):
        return self.head(self.body(x))


class ViTClassifier(nn.Module):
    """The zoo's image tower (random init) with a linear head on its embedding."""

    def __init__(self, classes: int, width: int | None = None):
        super().__init__()
        from evaluation.zoo.clip_model import create_vision_tower

        self.tower = create_vision_tower()
        self.head = nn.Linear(CONFIG["embed_dim"], classes)

    def forward(self, x):
        return self.head(self.tower(x))

    def permutation_spec(self, outputs: str = "shared"):
        """The tower's groups with its embedding aligned too; the head reads the embedding and its outputs
        stay in place (`shared`) or are stacked per model (`concat`)."""
        from merging.algorithms.mudsc import Group, Member
        from merging.algorithms.mudsc.vit import vit_spec

        spec = vit_spec(self.tower, prefix="tower.", outputs="aligned")
        embedding = spec.group("embedding")
        embedding.members += (Member("head.weight", 1, "in"),)
        if outputs == "concat":
            spec.groups.append(Group("outputs", self.head.out_features,
                                     (Member("head.weight", 0, "out"), Member("head.bias", 0, "out")),
                                     zippable=False, kind="concat"))
        return spec


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"cnn": SmallCNN, "mlp": MLP, "vit": ViTClassifier}


def train_on_subset(arch: str, classes: list[int], *, seed: int, steps: int = 600, batch: int = 128, lr: float = 2e-3,
                    per_class: int = 150, width: int | None = None, progress=None) -> nn.Module:
    """A model of `arch` trained from its own random initialisation (`seed`) on `classes` only; its head
    predicts their positions in `classes`."""
    torch.manual_seed(seed)
    kwargs = {"width": width} if width else {}
    model = ARCHITECTURES[arch](len(classes), **kwargs)
    data = glyph_split("train", per_class).subset(classes)
    local = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([local[int(c)] for c in data.labels])
    images = to_input(data.images)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(labels), (batch,), generator=g)
        x = images[idx]
        shift = torch.randint(-2, 3, (2,), generator=g)  # small translations: the glyphs move in the test set too
        x = torch.roll(x, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress(f"train {arch} seed {seed}", step + 1, steps)
    return model.eval()


@torch.no_grad()
def joint_accuracy(logits_fn: Callable[[torch.Tensor], torch.Tensor], joint_classes: list[int], split: FamilySplit,
                   batch: int = 512) -> float:
    """Accuracy on the joint task: logits over `joint_classes` (in that order), scored on every test image
    of those classes."""
    data = split.subset(joint_classes)
    position = {c: i for i, c in enumerate(joint_classes)}
    labels = torch.tensor([position[int(c)] for c in data.labels])
    correct = 0
    for start in range(0, len(labels), batch):
        out = logits_fn(to_input(data.images[start:start + batch]))
        correct += int((out.argmax(-1) == labels[start:start + batch]).sum())
    return correct / len(labels)
