"""A safetensors checkpoint on object storage (s3://, gs://, az://, …), read by ranged GETs from its header offsets.

The header is two small reads; a tensor, or a row range of it, is one ranged read of exactly its bytes — so a Dask
worker merging a few tensors of a 140 GB model fetches those and nothing else. Paths are `upath.UPath`s over
fsspec (s3fs for S3: credentials and the endpoint from the usual AWS variables, or `AWS_ENDPOINT_URL` for MinIO
or moto). The layouts are a local checkpoint's: one file, a folder holding `model.safetensors`, or shards with
their index.
"""

from __future__ import annotations

import math
import socket
from typing import Iterator

import torch

from merging.checkpoints.checkpoint import INDEX_NAME, PICKLE_SUFFIXES, SINGLE_NAME, Checkpoint, index_shard_names
from merging.checkpoints.safetensors_format import DTYPES, itemsize
from merging.errors import CheckpointError

LOCAL_PROTOCOLS = ("", "file", "local")


def is_remote_url(text: str) -> bool:
    """Whether `text` names a location fsspec reaches other than this machine's disk (s3://, gs://, memory://)."""
    if "://" not in text:
        return False
    from fsspec.registry import known_implementations

    protocol = text.split("://", 1)[0].lower()
    return protocol not in LOCAL_PROTOCOLS and protocol in known_implementations


def remote_path(url: str):
    from upath import UPath

    # not fsspec's shared instance: it is keyed by the arguments only, so one made before AWS_ENDPOINT_URL or the
    # credentials changed (an earlier ingest in a long-lived worker) would keep reaching the old endpoint. A path
    # and the paths joined to it make their own client, once, in this process (a Dask worker: with its environment)
    protocol, rest = url.split("://", 1)
    try:
        return UPath(f"{protocol.lower()}://{rest}", skip_instance_cache=True)
    except (ValueError, ImportError) as exc:  # an unknown scheme, a malformed bucket, the backend not installed
        raise CheckpointError(f"{url}: not a location object storage can reach ({exc})") from None


def _where() -> str:
    """This process, for an error message: the Dask worker's address where it is one, else the host name."""
    try:
        from distributed import get_worker

        return f"worker {get_worker().address}"
    except (ImportError, ValueError):
        return f"host {socket.gethostname()}"


def _unreachable(path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: cannot read from object storage on {_where()} ({type(exc).__name__}: {exc}); "
                           "check the bucket, the credentials and AWS_ENDPOINT_URL there")


def remote_files(path) -> list:
    """The safetensors files of the checkpoint at `path` (a UPath), in shard order."""
    try:
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: a pickled checkpoint; mergeyard refuses to unpickle, convert it first")
        if path.name.endswith(".safetensors") and path.is_file():
            return [path]
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such object or prefix")
        index = path / INDEX_NAME
        if index.is_file():
            names = index_shard_names(index)
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise CheckpointError(f"{path}: index names shards that are missing: {', '.join(missing)}")
            return [path / n for n in names]
        if (path / SINGLE_NAME).is_file():
            return [path / SINGLE_NAME]
        found = sorted(p for p in path.iterdir() if p.name.endswith(".safetensors"))
        if len(found) == 1:
            return found
        raise CheckpointError(f"{path}: {'no' if not found else len(found)} .safetensors objects under this prefix"
                              + ("" if not found else f" but no {INDEX_NAME}"))
    except CheckpointError:
        raise
    except Exception as exc:  # botocore's and aiohttp's errors are not OSErrors
        raise _unreachable(path, exc) from None


class RemoteCheckpoint(Checkpoint):
    """`Checkpoint` with its bytes on object storage: every read a ranged GET of exactly the bytes asked for."""

    def __init__(self, path, files: list | None = None):
        try:
            super().__init__(path, files if files is not None else remote_files(path))
        except CheckpointError:
            raise
        except Exception as exc:
            raise _unreachable(path, exc) from None

    def _range(self, name: str, start: int, stop: int) -> bytes:
        file = self._file_of[name]
        try:
            data = file.fs.cat_file(file.path, start=start, end=stop)
        except Exception as exc:
            raise _unreachable(file, exc) from None
        if len(data) != stop - start:
            raise CheckpointError(f"{file}: truncated inside tensor {name!r} ({len(data)} of {stop - start} bytes)")
        return data

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        entry = self.entries[name]
        shape = list(entry.shape)
        start, stop = entry.start, entry.end
        if rows is not None and shape and not (rows.start in (0, None) and rows.stop >= shape[0]):
            row_bytes = math.prod(shape[1:]) * itemsize(entry.dtype)
            first, last = rows.start or 0, min(rows.stop, shape[0])
            start, stop = entry.start + first * row_bytes, entry.start + last * row_bytes
            shape[0] = last - first
        if stop == start:
            return torch.empty(shape, dtype=DTYPES[entry.dtype])
        # a writable buffer: torch warns on a read-only one, and the merge never writes into it anyway
        return torch.frombuffer(bytearray(self._range(name, start, stop)), dtype=DTYPES[entry.dtype]).reshape(shape)

    def iter_raw(self, name: str, block_bytes: int = 64 << 20) -> Iterator[memoryview]:
        entry = self.entries[name]
        step = max(block_bytes - block_bytes % 8, 8)
        for start in range(entry.start, entry.end, step):
            yield memoryview(self._range(name, start, min(start + step, entry.end)))


def open_checkpoint(path) -> Checkpoint:
    """A `Checkpoint` for a local path, a `RemoteCheckpoint` for a UPath (or URL) on object storage."""
    if isinstance(path, str) and is_remote_url(path):
        path = remote_path(path)
    protocol = getattr(path, "protocol", "")
    if protocol not in LOCAL_PROTOCOLS:
        return RemoteCheckpoint(path)
    return Checkpoint(path)
