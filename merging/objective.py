"""What data-informed merges (FW-Merging, AdaMerging, MuDSC calibration) need from data.

`merging/` defines the protocol; `evaluation/` implements it for task suites.
A merge method sees only tensors: the loss of a model state and its gradient
with respect to the floating-point tensors it names. A method asks for its
data with requests (`ObjectiveRequest`, `CalibrationRequest`) built from its
parameters; whoever runs the recipe turns each into the object here, so the
flows never need to know which method is running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Protocol, runtime_checkable

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


# ---- what a data-informed method asks for: it names the data, whoever runs the recipe builds it -----------------


@dataclass(frozen=True)
class ObjectiveRequest:
    """A loss on a suite's data, built into an `Objective`: cross-entropy on the labelled calibration budget, or
    the entropy of the predictions on unlabelled inputs. `per_task`: one objective per task (a dict task → it)."""

    suite: str  # a suite name or a suite file
    tasks: tuple[str, ...] | None
    budget: int
    loss: Literal["cross_entropy", "entropy"] = "cross_entropy"
    per_task: bool = False
    minibatch: int | None = None  # each gradient on the next this-many samples per task (None: the whole budget)


@dataclass(frozen=True)
class CalibrationRequest:
    """Unlabelled inputs of a suite's tasks and its architecture, built into a `Calibration`."""

    suite: str
    tasks: tuple[str, ...] | None
    samples: int



@dataclass(frozen=True)
class ScoreRequest:
    """The suite's metric on its calibration split (never its evaluation split), built into a `Scorer`: what an
    `auto` coefficient is chosen by (merging.algorithms.search)."""

    suite: str
    tasks: tuple[str, ...] | None
    budget: int


@dataclass(frozen=True)
class Score:
    value: float  # the mean over tasks of each task's metric, higher is better (a lower-is-better one negated)
    loss: float  # the mean over tasks of each task's loss: breaks ties between equal values
    tasks: dict[str, float]  # each task's metric as measured


@runtime_checkable
class Scorer(Protocol):
    """Scores a model state on labelled calibration data."""

    #: identifies the data exactly (suite digest, tasks, budget, split): recorded with the choice it made
    digest: str

    def score(self, state: Mapping[str, torch.Tensor]) -> Score: ...


@dataclass(frozen=True)
class StatisticsRequest:
    """Per-model statistics on a suite's calibration data, built into a `Statistics`: the diagonal Fisher
    (mean squared per-sample gradient) or the Gram matrix XᵀX of every linear layer's inputs. `model_tasks`
    names the task each model is measured on (default: model i on task i when they pair up, else all tasks)."""

    suite: str
    tasks: tuple[str, ...] | None
    budget: int
    model_tasks: tuple[str, ...] | None = None


@runtime_checkable
class Statistics(Protocol):
    """What Fisher merging and RegMean read: statistics of a model state on a suite's data."""

    digest: str  # identifies the data (the suite digest, the tasks, the budget)
    tasks: tuple[str, ...]

    def fisher(self, state: Mapping[str, torch.Tensor], tasks: list[str]) -> dict[str, torch.Tensor]:
        """Diagonal Fisher of every float tensor the family scores (same shapes as the tensors)."""

    def grams(self, state: Mapping[str, torch.Tensor], tasks: list[str],
              only: set[str] | None = None) -> dict[str, torch.Tensor]:
        """XᵀX (in × in, float64) of the inputs of each linear layer, keyed by the layer's weight name."""

    def linear_layers(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """The weight names of the linear layers, in the order a forward pass reaches them."""
