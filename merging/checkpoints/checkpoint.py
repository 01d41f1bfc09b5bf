"""Lazy, memory-mapped access to a safetensors checkpoint in any of its layouts.

A checkpoint is one of:
  * a single `.safetensors` file;
  * a directory holding `model.safetensors`;
  * a directory holding shards `model-0000k-of-0000n.safetensors` and
    `model.safetensors.index.json` (the Hugging Face layout).
Nothing is read beyond the headers until a tensor is asked for, and then only
that tensor (or a row range of it) comes off the memory map.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from merging.errors import CheckpointError, PickleCheckpointError
from merging.checkpoints.safetensors_format import DTYPES, TensorEntry, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle(path: Path) -> None:
    raise PickleCheckpointError(
        f"{path}: pickled checkpoints can run arbitrary code when loaded and mergeyard refuses them; "
        "convert to safetensors first (e.g. safetensors.torch.save_file(torch.load(p, weights_only=True), 'model.safetensors'))"
    )


def index_shard_names(index) -> list[str]:
    """The shard files an index (a Path or a UPath) names, each a plain name inside the checkpoint's folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: malformed index (no weight_map); re-save the checkpoint") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: malformed index (weight_map must map tensor names to shard files)")
    names = sorted(set(weight_map.values()))
    for name in names:
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{index}: shard name {name!r} points outside the checkpoint directory")
    return names


def resolve_files(path: Path) -> list[Path]:
    """The safetensors files that make up the checkpoint at `path`, in shard order."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        if path.name.endswith(".index.json"):
            return resolve_files(path.parent)
        return [path]
    if not path.is_dir():  # a device, a socket, a pipe
        raise CheckpointError(f"{path}: not a regular file or a directory")
    index = path / INDEX_NAME
    if index.is_file():
        shard_names = index_shard_names(index)
        root = path.resolve()
        for name in shard_names:
            if (path / name).is_symlink() and (path / name).resolve().parent != root:
                # a link out of the directory would read a file the user never named
                raise CheckpointError(f"{index}: shard {name!r} is a link to {(path / name).resolve()}, outside the "
                                      "checkpoint directory")
        missing = [n for n in shard_names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: index names shards that are missing: {', '.join(missing)}")
        return [path / n for n in shard_names]
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found
    pickles = [p for p in sorted(path.iterdir()) if p.suffix in PICKLE_SUFFIXES]
    if pickles and not found:
        _refuse_pickle(pickles[0])
    if found:
        raise CheckpointError(
            f"{path}: {len(found)} .safetensors files but no {INDEX_NAME}; point at one file or add an index"
        )
    raise CheckpointError(f"{path}: no safetensors checkpoint in this directory")


class Checkpoint:
    """A read-only view of one checkpoint. Tensors are read one at a time."""

    def __init__(self, path: str | Path, files: list[Path] | None = None):
        """`files` overrides the layout detection (the writer hashes shards before its index exists)."""
        self.path = Path(path) if isinstance(path, (str, os.PathLike)) else path  # a UPath (remote.py) stays one
        self.files = list(files) if files is not None else resolve_files(self.path)
        self.entries: dict[str, TensorEntry] = {}
        self._file_of: dict[str, Path] = {}
        self.metadata: dict[str, str] = {}
        for file in self.files:
            entries, metadata = read_header(file)
            self.metadata.update(metadata)
            for name, entry in entries.items():
                if name in self.entries:
                    raise CheckpointError(f"{self.path}: tensor {name!r} appears in more than one shard")
                self.entries[name] = entry
                self._file_of[name] = file
        self._handles: dict[Path, object] = {}
        self._source: dict[str, str] = {}  # a renamed view's name -> the name stored in the file

    def renamed(self, mapping: dict[str, str]) -> "Checkpoint":
        """A view holding only `mapping`'s tensors, each under its new name (new name → stored name)."""
        view = object.__new__(type(self))  # a remote checkpoint's view reads as it does
        view.path, view.files, view.metadata = self.path, self.files, self.metadata
        view.entries = {new: self.entries[old] for new, old in mapping.items()}
        view._file_of = {new: self._file_of[old] for new, old in mapping.items()}
        view._source = {new: self._source.get(old, old) for new, old in mapping.items()}
        view._handles = self._handles
        return view

    @staticmethod
    def joined(mapping: dict[str, tuple["Checkpoint", str]]) -> "Checkpoint":
        """A view of tensors from several checkpoints, each under a new name (new name → (checkpoint, its name))."""
        first = next(iter(mapping.values()))[0] if mapping else None
        kinds = {type(c) for c, _ in mapping.values()}
        view = object.__new__(kinds.pop() if len(kinds) == 1 else Checkpoint)
        view.path = first.path if first else Path(".")
        view.files = sorted({f for c, _ in mapping.values() for f in c.files})
        view.metadata = {}
        view.entries = {new: c.entries[old] for new, (c, old) in mapping.items()}
        view._file_of = {new: c._file_of[old] for new, (c, old) in mapping.items()}
        view._source = {new: c._source.get(old, old) for new, (c, old) in mapping.items()}
        view._handles = {}
        return view

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.entries)} tensors)"

    def __getstate__(self) -> dict:
        # sent to another process (a Dask worker): the open files stay here, the other side opens its own
        return {**self.__dict__, "_handles": {}}

    @property
    def names(self) -> list[str]:
        return sorted(self.entries)

    @cached_property
    def num_params(self) -> int:
        return sum(e.numel for e in self.entries.values())

    @cached_property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def _handle(self, name: str):
        file = self._file_of[name]
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own SafetensorError
                raise CheckpointError(f"{file}: cannot open as safetensors ({exc})") from exc
            self._handles[file] = handle
        return handle

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor `name` (or rows `rows` of its first dimension), in its stored dtype. It is a view of the
        file's memory map, shared with every later read of the same tensor from this checkpoint: never modify it in
        place (the file is safe, other reads in this process are not); `.clone()` what is to be changed."""
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        handle = self._handle(name)
        entry = self.entries[name]
        stored = self._source.get(name, name)
        if rows is None or not entry.shape or (rows.start in (0, None) and rows.stop >= entry.shape[0]):
            return handle.get_tensor(stored)
        return handle.get_slice(stored)[rows]

    def locate(self, name: str) -> list[tuple[Path, int, int, str]]:
        """Where the bytes of tensor `name` lie: [(file, offset, length, the name stored there)] (a merge plan's
        byte ranges; a view that computes a tensor from several, a LoRA view, lists each)."""
        entry = self.entries[name]
        return [(self._file_of[name], entry.start, entry.nbytes, self._source.get(name, name))]

    def iter_raw(self, name: str, block_bytes: int = 64 << 20) -> Iterator[memoryview]:
        """The stored bytes of one tensor, in blocks (for hashing); every block but the last holds a whole number
        of elements (`block_bytes` is a multiple of every item size)."""
        entry = self.entries[name]
        with open(self._file_of[name], "rb", buffering=0) as fh:
            fh.seek(entry.start)
            remaining = entry.nbytes
            buf = bytearray(min(block_bytes, max(remaining, 1)))
            view = memoryview(buf)
            while remaining > 0:
                want = min(len(buf), remaining)
                n = 0
                while n < want:  # a short read (a pipe-backed or network file) is completed, not yielded
                    got = fh.readinto(view[n:want])
                    if not got:
                        raise CheckpointError(f"{self._file_of[name]}: truncated inside tensor {name!r}")
                    n += got
                remaining -= n
                yield view[:n]

    def torch_dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name].dtype]
