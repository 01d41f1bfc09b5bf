"""A model family: how a checkpoint and a suite's tasks become class scores or token losses.

Every evaluation, objective (FW-Merging, relevance scores) and calibration set
(MuDSC) goes through this interface, so every data-informed method works on
every family. A family names the architecture that merges combine (its state
dict is the merged checkpoint); a `Runner` built from it on a device scores a
task's batch under any state of that architecture, differentiably.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from merging.checkpoints.alignment import align_entries, state_entries
from merging.errors import MergeyardError


@dataclass
class Outputs:
    """A batch's outputs: class scores (classification, multiple choice) or token losses (language modelling)."""

    scores: torch.Tensor | None = None  # B × classes
    nll: torch.Tensor | None = None  # B: summed negative log-likelihood of each row's tokens
    tokens: torch.Tensor | None = None  # B: how many tokens each row scored


class Runner(ABC):
    """A family's models on one device, ready to score batches under a given state."""

    #: float tensors of the merged architecture the outputs depend on (objectives differentiate these)
    names: tuple[str, ...]
    #: every tensor of the architecture, as matching sees it (name → TensorSpec)
    entries: dict
    #: samples a batch when collecting linear layers' inputs (1 where a batch would pad rows it cannot mask)
    gram_batch_size: int = 1

    def __init__(self, family: "Family", device: torch.device):
        self.family = family
        self.device = device

    def adapt(self, state: Mapping[str, torch.Tensor], label: str = "checkpoint") -> dict[str, torch.Tensor]:
        """The checkpoint's tensors under the architecture's names, on the device: a task model's wrapper
        prefix is stripped and its own head dropped (each task's head comes from the suite)."""
        try:
            alignment = align_entries(self.entries, state_entries(state), f"suite family {self.family.name!r}", label)
        except MergeyardError as exc:
            raise MergeyardError(f"{label} does not fit the suite's architecture: {exc}") from None
        out = {}
        for name, spec in self.entries.items():
            source = alignment.prefix + name
            if source in state:
                t = state[source]
                out[name] = t.to(self.device, torch.float32) if spec.is_float else t.to(self.device)
        return out

    @abstractmethod
    def prepare(self, task, raw: Any) -> Any:
        """Raw inputs of a task (texts, images, choices) → the model's input batch on the device."""

    @abstractmethod
    def outputs(self, task, batch: Any, state: Mapping[str, torch.Tensor]) -> Outputs:
        """The task's outputs for a prepared batch under `state` (differentiable in its float tensors)."""

    def linear_modules(self) -> dict[str, torch.nn.Linear]:
        """The merged architecture's linear layers, keyed by their weight's checkpoint name (RegMean's layers)."""
        return linear_modules_of(self.shared_module(), self.module_to_checkpoint())

    def shared_module(self) -> torch.nn.Module:
        """The module holding the merged tensors (what every task's forward runs through)."""
        raise NotImplementedError

    def module_to_checkpoint(self) -> dict[str, str]:
        """The shared module's tensor names → checkpoint names (the same, unless transformers renames them)."""
        return {}


def linear_modules_of(module: torch.nn.Module, renamed: dict[str, str]) -> dict[str, torch.nn.Linear]:
    return {renamed.get(f"{name}.weight", f"{name}.weight"): m for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear)}


class Family(ABC):
    """Registered by name (`evaluation.families`); a suite holds one instance, configured for its model.

    What a suite file needs of a family: the metrics it measures (the first is a task's default), the column its
    inputs come from, whether every task names a head (`load_head` reads one), and `from_suite_file`.
    """

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1")
    input_column: ClassVar[str] = "text"
    uses_heads: ClassVar[bool] = False

    @classmethod
    def load_head(cls, path: Path, label: str):
        raise MergeyardError(f"{label}: {cls.name} tasks take no head")

    @classmethod
    def from_suite_file(cls, heads: dict, model_dir: Path | None, explicit_model: bool, options: dict) -> "Family":
        """The family for a suite file: its tasks' heads, the `model:` directory (or None: the evaluated model's,
        bound later by `Suite.for_model`), whether the file named it, and its `options`."""
        return cls(heads, model_dir, explicit_model, options)

    @abstractmethod
    def create_model(self) -> torch.nn.Module:
        """A fresh module of the merged architecture (its state dict keys are the merged checkpoint's)."""

    @abstractmethod
    def identity(self) -> dict:
        """What defines the family's behaviour for the suite digest (architecture, preprocessing files)."""

    def head_bytes(self, task) -> bytes:
        """The bytes of a task's head, for the suite digest."""
        head = task.head
        if head is None:
            return b"no-head"
        if isinstance(head, torch.Tensor):
            return head.detach().to(torch.float32).contiguous().numpy().tobytes()
        return str(getattr(head, "digest", head)).encode()

    @abstractmethod
    def runner(self, device: torch.device) -> Runner:
        """This family's models on `device`."""

    def with_model_dirs(self, directories: list[Path]) -> "Family":
        """The family reading config and preprocessing from the first of `directories` that holds them, where
        its suite names no model."""
        return self


def as_dirs(model_dir: Path | list[Path] | None) -> list[Path]:
    """A family's model directories: the suite's `model:` ([one]) or the evaluated model's lineage (several)."""
    if model_dir is None:
        return []
    return [Path(model_dir)] if isinstance(model_dir, (str, Path)) else [Path(d) for d in model_dir]


def first_with(directories: list[Path], names: tuple[str, ...]) -> Path | None:
    """The first directory holding any of `names`."""
    for directory in directories:
        directory = directory if directory.is_dir() else directory.parent
        if any((directory / n).is_file() for n in names):
            return directory
    return None
