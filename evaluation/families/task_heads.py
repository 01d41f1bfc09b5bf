"""Transformers task models with one head per task, sharing the merged encoder.

Users fine-tune a base with a task class (`AutoModelForSequenceClassification`,
`AutoModelForImageClassification`): the checkpoint holds the encoder under the
class's `base_model_prefix` (`bert.encoder…`) and the task's head beside it
(`classifier.*`). The standard protocol of task-vector papers is what this
family evaluates: the merged encoder plus each task's own head. A task's head
is read from the fine-tune the suite names for it (`head:`): its config (labels,
problem type) and the tensors outside the encoder.

Subclasses say which auto class builds the task model and how raw inputs
become its keyword arguments (a tokenizer for text, an image processor for
images).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch.func import functional_call

from evaluation.families.base import Family, Outputs, Runner, as_dirs, first_with
from evaluation.families.hf_names import checkpoint_names
from merging.checkpoints.alignment import state_entries
from merging.checkpoints.checkpoint import Checkpoint
from merging.checkpoints.companions import companion_files
from merging.checkpoints.digest import DigestBuilder
from merging.errors import MergeyardError
from merging.checkpoints.safetensors_format import DTYPE_NAMES

def files_digest(directory: Path) -> str:
    """sha256 over the config, tokenizer and preprocessing files a model directory holds (names and bytes): what
    enters a suite's digest when the suite names its model."""
    h = hashlib.sha256(b"preprocessing-v1")
    for path in companion_files(directory):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _generic(id2label: dict) -> bool:
    return all(str(v) == f"LABEL_{k}" for k, v in id2label.items())


@dataclass(frozen=True, eq=False)
class Head:
    """A task's head from a fine-tuned task model: its config and its tensors outside the encoder."""

    source: str
    config: Any  # a transformers PretrainedConfig
    tensors: dict[str, torch.Tensor] = field(repr=False)  # by the task model's names (classifier.weight, ...)
    prefix: str  # the task class's base_model_prefix
    task_class: type

    @cached_property
    def digest(self) -> str:
        builder = DigestBuilder()
        for name in sorted(self.tensors):
            t = self.tensors[name].contiguous()
            raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            builder.begin_tensor(name, DTYPE_NAMES[t.dtype], tuple(t.shape), len(raw))
            builder.update(raw)
        labels = json.dumps({"architecture": self.task_class.__name__, "labels": self.classes,
                             "problem_type": getattr(self.config, "problem_type", None)}, sort_keys=True)
        return hashlib.sha256((builder.hexdigest() + labels).encode()).hexdigest()

    @property
    def classes(self) -> list[str] | None:
        """The head's class names in output order, where its config names them (not LABEL_0, LABEL_1, ...)."""
        id2label = {int(k): v for k, v in (getattr(self.config, "id2label", None) or {}).items()}
        if not id2label or _generic(id2label):
            return None
        return [str(id2label[k]) for k in sorted(id2label)]

    @property
    def num_labels(self) -> int:
        return int(self.config.num_labels)


def task_class_for(config, auto_name: str) -> type:
    """The task class a config's `architectures` names, else the auto class's choice for its model type."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None and hasattr(cls, "base_model_prefix"):
            return cls
    auto = getattr(transformers, auto_name)
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        raise MergeyardError(f"transformers has no {auto_name} for model type {config.model_type!r}") from None


def load_head(path: Path, auto_name: str, label: str) -> Head:
    """A fine-tune's head: the tensors its task class keeps outside `base_model_prefix`."""
    from transformers import AutoConfig

    directory = path if path.is_dir() else path.parent
    if not (directory / "config.json").is_file():
        raise MergeyardError(f"{label}: the head checkpoint {path} has no config.json beside it (save the fine-tune "
                             "with save_pretrained, which writes its labels and architecture)")
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise MergeyardError(f"{label}: cannot read {directory / 'config.json'} ({str(exc).splitlines()[0]})") from None
    cls = task_class_for(config, auto_name)
    prefix = cls.base_model_prefix + "."
    ckpt = Checkpoint(path)
    tensors = {n: ckpt.read(n) for n in ckpt.names if not n.startswith(prefix)}
    if not any(t.is_floating_point() for t in tensors.values()):
        raise MergeyardError(f"{label}: {path} holds no head: every tensor is under {prefix!r} (the encoder); name a "
                             f"checkpoint saved by a task class such as {cls.__name__}")
    return Head(str(path), config, tensors, cls.base_model_prefix, cls)


class TaskHeadsRunner(Runner):
    gram_batch_size = 16  # texts pad, and their attention mask says which rows
    def __init__(self, family: "TaskHeadsFamily", device: torch.device):
        super().__init__(family, device)
        self.encoder = family.create_model().to(device).eval()
        head = family.reference_head
        prefix = head.prefix + "."
        self._task_models: dict[str, torch.nn.Module] = {}
        self._module_names: dict[str, dict[str, str]] = {}
        reference = self._build(head)
        names = self._module_names[id(head)]
        # the encoder's tensors by checkpoint name (what merges hold) → its module names (what scores them)
        self.to_module = {k[len(prefix):]: v[len(prefix):] for k, v in names.items() if k.startswith(prefix)}
        state = dict(reference.state_dict())
        self.entries = state_entries({k: state[prefix + v] for k, v in self.to_module.items()})
        self.names = tuple(k for k, spec in self.entries.items() if spec.is_float)
        self.batch_size = family.batch_size

    def _build(self, head: Head) -> torch.nn.Module:
        """The head's task class with the shared encoder inside (memory of one model for every task)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = head.task_class(head.config)
        setattr(model, head.prefix, self.encoder)
        names = checkpoint_names(model)
        self._module_names[id(head)] = names
        return model

    def prepare(self, task, raw) -> dict:
        return self.family.prepare(raw, self.device)

    def shared_module(self) -> torch.nn.Module:
        return self.encoder

    def module_to_checkpoint(self) -> dict[str, str]:
        return {module: checkpoint for checkpoint, module in self.to_module.items()}

    def task_model(self, task) -> torch.nn.Module:
        """The task's model: its head's task class around the shared encoder, with the head's weights."""
        if task.name not in self._task_models:
            head: Head = task.head
            model = self._build(head)
            names = self._module_names[id(head)]
            unknown = [k for k in head.tensors if k not in names]
            if unknown:
                raise MergeyardError(f"task {task.name!r}: its head's tensors {unknown[:3]} do not fit "
                                     f"{head.task_class.__name__}")
            model.load_state_dict({names[k]: v for k, v in head.tensors.items()}, strict=False)
            self._task_models[task.name] = model.to(self.device).eval()
        return self._task_models[task.name]

    def outputs(self, task, batch, state: Mapping[str, torch.Tensor]) -> Outputs:
        model = self.task_model(task)
        prefix = task.head.prefix + "."
        weights = {prefix + self.to_module[k]: v for k, v in state.items() if k in self.to_module}
        out = functional_call(model, weights, args=(), kwargs=batch, strict=False)
        return Outputs(scores=out.logits)


class TaskHeadsFamily(Family):
    auto_class: ClassVar[str]
    uses_heads = True

    @classmethod
    def load_head(cls, path: Path, label: str) -> Head:
        return load_head(path, cls.auto_class, label)

    def __init__(self, heads: dict[str, Head], model_dir: Path | list[Path] | None = None, explicit_model: bool = False,
                 options: dict | None = None):
        self.heads = heads
        self.model_dirs = as_dirs(model_dir)
        self.explicit_model = explicit_model
        self.options = dict(options or {})
        self.batch_size = int(self.options.get("batch_size", 32))

    @cached_property
    def reference_head(self) -> Head:
        if not self.heads:
            raise MergeyardError(f"a {self.name} suite needs a head for each task (`head:` naming a fine-tune)")
        return next(iter(self.heads.values()))

    def create_model(self) -> torch.nn.Module:
        """The encoder exactly as the task class holds it (ViT's task class has no pooler, for one)."""
        head = self.reference_head
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = head.task_class(head.config)
        return getattr(model, head.prefix)

    def identity(self) -> dict:
        model = files_digest(self.model_dirs[0]) if self.explicit_model and self.model_dirs else "lineage"
        return {"family": self.name, "model": model, "options": self.options}

    def head_bytes(self, task) -> bytes:
        return task.head.digest.encode()

    def with_model_dirs(self, directories: list[Path]) -> "TaskHeadsFamily":
        if self.explicit_model:
            return self
        return type(self)(self.heads, directories, False, self.options)

    def preprocessing_dir(self, what: str) -> Path:
        """Where the tokenizer or image processor comes from: the suite's `model:`, else the evaluated model's
        directory or its bases', else a head's fine-tune."""
        found = first_with([*self.model_dirs, *(Path(h.source) for h in self.heads.values())], self.preprocessing_files)
        if found is not None:
            return found
        raise MergeyardError(f"no {what} found for this {self.name} suite: give `model:` in the suite file (a "
                             f"directory holding the {what}), or evaluate a registered model whose files (or its "
                             "base's) include it")

    preprocessing_files: ClassVar[tuple[str, ...]] = ()  # any of them marks a directory holding the preprocessor
    preprocessor_class: ClassVar[str]  # the transformers auto class that loads it (AutoTokenizer, AutoImageProcessor)
    preprocessor_name: ClassVar[str]

    @cached_property
    def preprocessor(self):
        import transformers

        return getattr(transformers, self.preprocessor_class).from_pretrained(self.preprocessing_dir(self.preprocessor_name))

    def runner(self, device: torch.device) -> TaskHeadsRunner:
        return TaskHeadsRunner(self, device)

    def prepare(self, raw, device: torch.device) -> dict:
        """Raw inputs (texts, images) → the task model's keyword arguments on `device`."""
        raise NotImplementedError
