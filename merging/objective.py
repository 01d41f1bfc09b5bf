"""What data-informed merges (FW-Merging, AdaMerging, MuDSC calibration) need from data.

`merging/` defines the protocol; `evaluation/` implements it for task suites.
A merge method sees only tensors: the loss of a model state and its gradient
with respect to the floating-point tensors it names.
"""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import torch


@runtime_checkable
class Objective(Protocol):
    """A differentiable loss of a model state (tensor name → tensor), lower is better."""

    #: tensor names the objective reads; gradients come back for exactly these
    names: tuple[str, ...]

    def loss(self, state: Mapping[str, torch.Tensor]) -> float:
        """The loss, without gradients."""

    def loss_and_grad(self, state: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        """The loss and ∂loss/∂tensor for every name in `names` (float32, same shapes)."""


@runtime_checkable
class Calibration(Protocol):
    """Unlabelled inputs for methods that read activations (MuDSC), and the architecture they run through."""

    #: identifies the inputs exactly (recorded in lineage: a merge is reproducible only with the same data)
    digest: str

    def create_model(self) -> torch.nn.Module:
        """A fresh module of the checkpoints' architecture (its state dict keys are the checkpoints' tensors)."""

    def batches(self) -> list[torch.Tensor]:
        """Model inputs, in a fixed order."""
