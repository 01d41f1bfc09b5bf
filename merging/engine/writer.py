"""Writing a merged checkpoint: sharded safetensors + index, all or nothing.

Everything goes to a hidden temporary directory beside the destination and is
renamed into place only once every tensor, the index and the model card are
written. A failure at any point removes the temporary directory, so no
half-written output is ever visible under the destination name.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import shutil
import threading
from pathlib import Path
from typing import Callable

import torch

from merging.runtime.atomic import move_into_place, temp_beside
from merging.runtime.crashpoints import crashpoint
from merging.checkpoints.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint
from merging.checkpoints.digest import DigestBuilder, checkpoint_digest
from merging.errors import MergeyardError, OutputExistsError
from merging.checkpoints.safetensors_format import DTYPES, StreamingFileWriter, itemsize, read_header

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # Hugging Face's default shard size
Layout = list[tuple[str, str, tuple[int, ...]]]  # (name, safetensors dtype, shape), sorted by name


def plan_shards(layout: Layout, max_shard_bytes: int) -> list[Layout]:
    """Greedy split in name order; a tensor larger than the limit gets a shard of its own."""
    if max_shard_bytes <= 0:
        raise MergeyardError("the largest shard size must be a positive number of bytes")
    shards: list[Layout] = [[]]
    size = 0
    for name, dtype, shape in layout:
        nbytes = math.prod(shape) * itemsize(dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dtype, shape))
        size += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class _BackgroundIO:
    """Runs file writes and hashing on one thread, in submission order.

    Both release the GIL, so they overlap with the merge's arithmetic. The
    queue is bounded: at most `depth` chunks wait, whatever the model size.
    The first error is re-raised in the caller at its next submit or drain.
    """

    def __init__(self, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mergeyard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    fn, args = item
                    fn(*args)
            except BaseException as exc:  # surfaced in the caller's thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, fn, *args) -> None:
        self._raise()
        self._queue.put((fn, args))

    def drain(self) -> None:
        self._queue.join()
        self._raise()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class CheckpointWriter:
    """Streams tensors (in sorted-name order) into shards under a temporary directory."""

    def __init__(self, out_dir: Path, layout: Layout, max_shard_bytes: int, *, overwrite: bool = False,
                 metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise OutputExistsError(f"{self.out_dir} already exists; write elsewhere or allow overwriting it")
        self.overwrite = overwrite
        self.tmp_dir = temp_beside(self.out_dir)
        self._shards = plan_shards(layout, max_shard_bytes)
        self._file_names = shard_file_names(len(self._shards))
        self._shard_of = {name: s for s, shard in enumerate(self._shards) for name, _, _ in shard}
        self._layout = {name: (dtype, shape) for name, dtype, shape in layout}
        self._metadata = {"format": "pt", **(metadata or {})}
        self._current: StreamingFileWriter | None = None
        self._current_index = -1
        # Each finished shard's sha256, of the bytes as they were written (the store records it without reading the
        # file back); emptied by a patch. Hashed on a thread of its own: on the writer's, beside the digest, it
        # made the writer the slowest part of a task-arithmetic merge.
        self.file_sha256: dict[str, str] = {}
        self._file_hash = None
        self._hashes_valid = True
        self._hash_io = _BackgroundIO()
        self._digest = DigestBuilder()
        self._digest_valid = True
        self._total_size = sum(math.prod(s) * itemsize(d) for _, d, s in layout)
        self._io = _BackgroundIO()

    def _file_for(self, name: str) -> StreamingFileWriter:
        shard = self._shard_of[name]
        if shard != self._current_index:
            self._close_current()
            self._current_index = shard
            self._current = StreamingFileWriter(
                self.tmp_dir / self._file_names[shard], self._shards[shard], self._metadata
            )
            self._file_hash = hashlib.sha256(self._current.header)
        return self._current

    def _close_current(self) -> None:
        if self._current is not None:
            self._current.close()
            name, sha = self._current.path.name, self._file_hash
            self._hash_io.submit(lambda: self.file_sha256.__setitem__(name, sha.hexdigest()))
            self._current = None

    def begin_tensor(self, name: str) -> None:
        self._io.submit(self._begin_tensor, name)

    def _begin_tensor(self, name: str) -> None:
        dtype, shape = self._layout[name]
        self._file_for(name)
        self._digest.begin_tensor(name, dtype, shape, math.prod(shape) * itemsize(dtype))

    def write(self, name: str, values: torch.Tensor) -> None:
        """Append a chunk of tensor `name`, already in its output dtype. The caller must not modify it afterwards."""
        data = values.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._io.submit(self._write, name, data)
        crashpoint("merge.writing")  # part of the output written, in its temporary directory

    def _write(self, name: str, data) -> None:
        self._file_for(name).write(name, data.data)
        self._hash_io.submit(self._file_hash.update, data.data)  # keeps `data` alive until it is hashed
        self._digest.update(data.data)

    def patch(self, name: str, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite elements of an already written tensor (flat indices)."""
        self._io.drain()
        self._close_current()
        self._current_index = -1
        self._hash_io.drain()
        self._hashes_valid = False  # the shard's bytes are no longer what was hashed as they streamed
        dtype, _ = self._layout[name]
        path = self.tmp_dir / self._file_names[self._shard_of[name]]
        start = read_header(path)[0][name].start
        size = itemsize(dtype)
        raw = values.to(DTYPES[dtype]).contiguous().view(torch.uint8).numpy().tobytes()
        with open(path, "r+b") as fh:
            for n, index in enumerate(indices.tolist()):
                fh.seek(start + index * size)
                fh.write(raw[n * size:(n + 1) * size])
        self._digest_valid = False

    def commit_with(self, extra_files: Callable[[str], dict[str, str]],
                    copies: list[Path] = ()) -> tuple[str, list[str]]:
        """Finish the shards, write the index, the extra files (made from the finished digest) and copies of
        `copies` (a config, a tokenizer), move into place. Returns (digest, file names)."""
        self._io.drain()
        self._io.stop()
        self._close_current()
        self._hash_io.drain()
        self._hash_io.stop()
        if not self._hashes_valid:
            self.file_sha256.clear()
        if self._digest_valid:
            digest = self._digest.hexdigest()
        else:  # patched after streaming: hash the shards as they now are
            digest = checkpoint_digest(Checkpoint(self.tmp_dir, [self.tmp_dir / f for f in self._file_names]))
        files = list(self._file_names)
        if len(self._file_names) > 1:
            index = {
                "metadata": {"total_size": self._total_size, "mergeyard.digest": digest},
                "weight_map": {name: self._file_names[s] for name, s in sorted(self._shard_of.items())},
            }
            (self.tmp_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            files.append(INDEX_NAME)
        for fname, text in extra_files(digest).items():
            (self.tmp_dir / fname).write_text(text)
            files.append(fname)
        for source in copies:
            if source.name not in files:
                if isinstance(source, Path):
                    shutil.copyfile(source, self.tmp_dir / source.name)
                else:  # on object storage (a UPath)
                    (self.tmp_dir / source.name).write_bytes(source.read_bytes())
                files.append(source.name)
        self._move_into_place()
        return digest, files

    def _move_into_place(self) -> None:
        if not move_into_place(self.tmp_dir, self.out_dir, replace=self.overwrite):
            raise OutputExistsError(f"{self.out_dir} appeared while the merge ran; write elsewhere or allow overwriting it")

    def abort(self) -> None:
        self._io.stop()
        self._hash_io.stop()
        if self._current is not None:
            self._current.abort()
            self._current = None
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
