"""What a merge method sees: the inputs of one merge, read chunk by chunk.

A method never opens files. It asks for a tensor's chunks: row ranges of the
base and of every model, already on the compute device in float32 and
flattened, so elementwise methods are oblivious to shapes and a large tensor
never has to be resident whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from merging.checkpoints.checkpoint import Checkpoint
from merging.errors import MergeyardError, NonFiniteError
from merging.checkpoints.finite import all_finite

# Elements per input chunk: 4M float32 = 16 MiB per model; every tensor of a
# ViT-B/32 fits in one, an LLM embedding matrix takes a few dozen.
DEFAULT_CHUNK_ELEMS = 1 << 22

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class Chunk:
    offset: int  # flat index of this chunk's first element in the tensor
    base: torch.Tensor | None  # float32, flat, on the compute device
    models: list[torch.Tensor]  # float32, flat, one per model

    def task_vectors(self) -> list[torch.Tensor]:
        """τ_i = θ_i − θ_base for this chunk (new tensors)."""
        assert self.base is not None
        return [m - self.base for m in self.models]


def check_input_finite(ckpt: Checkpoint, name: str, values: torch.Tensor | None = None) -> None:
    if not all_finite(ckpt.read(name) if values is None else values):
        raise NonFiniteError(f"{ckpt.path}: tensor {name!r} holds NaN or infinity; fix or drop this checkpoint")


@dataclass
class TensorInputs:
    """One tensor of every input, read in row chunks."""

    name: str
    shape: tuple[int, ...]
    base: Checkpoint | None
    models: list[Checkpoint]
    weights: list[float]
    device: torch.device
    seed: int = 0
    chunk_elems: int = DEFAULT_CHUNK_ELEMS
    check_finite: bool = True
    # each model's own values of per-model parameters for this tensor (`MethodParams.per_model`)
    overrides: list[dict] = field(default_factory=list)
    _cached: Chunk | None = field(default=None, repr=False)

    def per_model(self, params, key: str) -> list:
        """`key` for each model: its own value for this tensor where it set one, else the recipe's."""
        default = getattr(params, key)
        return [(self.overrides[i] if i < len(self.overrides) else {}).get(key, default)
                for i in range(len(self.models))]

    def whole(self) -> Chunk:
        """The whole tensor of every input at once (for methods that need all of it: norms, sorts, ranks)."""
        chunks = list(self.chunks())
        if len(chunks) == 1:
            return chunks[0]
        base = torch.cat([c.base for c in chunks]) if chunks[0].base is not None else None
        return Chunk(0, base, [torch.cat([c.models[i] for c in chunks]) for i in range(len(self.models))])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def row_ranges(self) -> list[slice]:
        if not self.shape or self.numel <= self.chunk_elems:
            return [slice(None)]
        row = math.prod(self.shape[1:]) or 1
        rows_per_chunk = max(1, self.chunk_elems // row)
        return [slice(r, min(r + rows_per_chunk, self.shape[0])) for r in range(0, self.shape[0], rows_per_chunk)]

    @property
    def single_chunk(self) -> bool:
        return len(self.row_ranges()) == 1

    def _load(self, ckpt: Checkpoint, rows: slice) -> torch.Tensor:
        t = ckpt.read(self.name, None if rows == slice(None) else rows)
        t = t.to(self.device, dtype=torch.float32).reshape(-1)
        if self.check_finite:
            check_input_finite(ckpt, self.name, t)
        return t

    def base_whole(self) -> torch.Tensor:
        """The base's whole tensor in its shape (float32, on the device): for methods that decompose a matrix."""
        assert self.base is not None
        return self._load(self.base, slice(None)).reshape(self.shape)

    def model_whole(self, i: int) -> torch.Tensor:
        """Model i's whole tensor in its shape; read one model at a time, a method holds one of them, not N."""
        return self._load(self.models[i], slice(None)).reshape(self.shape)

    def chunks(self) -> Iterator[Chunk]:
        """Chunks in order. A tensor that fits one chunk is read once and reused on later passes."""
        if self._cached is not None:
            yield self._cached
            return
        ranges = self.row_ranges()
        offset = 0
        for rows in ranges:
            chunk = Chunk(
                offset=offset,
                base=self._load(self.base, rows) if self.base is not None else None,
                models=[self._load(m, rows) for m in self.models],
            )
            if len(ranges) == 1:
                self._cached = chunk
            offset += chunk.models[0].numel()
            yield chunk


@dataclass
class MergeInputs:
    """Every tensor of every input, plus what the recipe says about them."""

    base: Checkpoint | None
    models: list[Checkpoint]
    weights: list[float]
    names: list[str]  # float tensors to merge, sorted
    device: torch.device
    seed: int = 0
    chunk_elems: int = DEFAULT_CHUNK_ELEMS
    check_finite: bool = True
    progress: ProgressFn | None = None
    # opens another ref the recipe names (a registered statistics artifact) as the engine's inputs are opened
    resolve: Callable[[str], "Path"] | None = None

    def open(self, ref: str) -> Checkpoint:
        if self.resolve is None:
            raise MergeyardError(f"{ref}: this merge cannot open other inputs (no resolver)")
        return Checkpoint(self.resolve(ref))

    def reference(self) -> Checkpoint:
        return self.base if self.base is not None else self.models[0]

    def tensor(self, name: str) -> TensorInputs:
        return TensorInputs(
            name=name,
            shape=self.reference().entries[name].shape,
            base=self.base,
            models=self.models,
            weights=self.weights,
            device=self.device,
            seed=self.seed,
            chunk_elems=self.chunk_elems,
            check_finite=self.check_finite,
        )

    @property
    def total_elems(self) -> int:
        ref = self.reference()
        return sum(ref.entries[n].numel for n in self.names)

    def report(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)
