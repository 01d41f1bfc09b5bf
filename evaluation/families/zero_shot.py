"""Image classification by an image tower against frozen zero-shot heads (CLIP's protocol, TA8's).

A task's head is a classes × embed matrix of normalised class embeddings (from
the text tower and the task's prompts); logits are the CLIP's own learned
temperature times the cosine between an image's features and each row. The
offline zoo's small CLIP and the real TA8's ViT-B/32 are both instances.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch.func import functional_call

from evaluation.families.base import Family, Outputs, Runner
from merging.checkpoints.alignment import state_entries


class ZeroShotRunner(Runner):
    gram_batch_size = 128  # images: nothing is padded
    def __init__(self, family: "ZeroShotImageFamily", device: torch.device):
        super().__init__(family, device)
        self.module = family.create_model().to(device).eval()
        state = self.module.state_dict()
        self.entries = state_entries(state)
        self.names = tuple(k for k, v in state.items() if v.is_floating_point())
        self._heads: dict[str, torch.Tensor] = {}

    def shared_module(self) -> torch.nn.Module:
        return self.module

    def prepare(self, task, raw):
        return self.family.preprocess(raw).to(self.device)

    def head(self, task) -> torch.Tensor:
        if task.name not in self._heads:
            self._heads[task.name] = task.head.to(self.device)
        return self._heads[task.name]

    def outputs(self, task, batch, state: Mapping[str, torch.Tensor]) -> Outputs:
        features = functional_call(self.module, dict(state), (batch,), strict=False)
        return Outputs(scores=self.family.logits(features, self.head(task)))


class ZeroShotImageFamily(Family):
    """`create_model` builds the image tower; `preprocess` turns raw images into its input."""

    name = "image-classification"

    def __init__(self, create_model: Callable[[], torch.nn.Module], preprocess: Callable[[torch.Tensor], torch.Tensor],
                 logit_scale: float = 100.0, label: str = "zero-shot"):
        self._create = create_model
        self.preprocess = preprocess
        # logits = logit_scale · cos(image, head row): the scored CLIP's own learned temperature, as TA8's heads
        # carry it (the zero-shot weights are multiplied by logit_scale.exp()); it sets losses and objectives,
        # not which class wins
        self.logit_scale = logit_scale
        self.label = label

    def create_model(self) -> torch.nn.Module:
        return self._create()

    def identity(self) -> dict:
        return {"family": self.name, "heads": "zero-shot", "model": self.label, "logit_scale": repr(self.logit_scale)}

    def logits(self, features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Class scores of a batch of image features: the evaluator's and the objectives' one definition."""
        return self.logit_scale * torch.nn.functional.normalize(features, dim=-1) @ head.T

    def runner(self, device: torch.device) -> ZeroShotRunner:
        return ZeroShotRunner(self, device)

    def with_scale(self, logit_scale: float) -> "ZeroShotImageFamily":
        return ZeroShotImageFamily(self._create, self.preprocess, logit_scale, self.label)
