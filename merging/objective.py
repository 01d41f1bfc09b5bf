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
