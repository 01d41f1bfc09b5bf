"""The content digest: a checkpoint's identity everywhere in mergeyard.

sha256 over, for each tensor in sorted-name order: its name, dtype, shape and
raw little-endian bytes, each length-prefixed so no two checkpoints can
collide by shifting bytes between fields. It ignores file names, sharding and
safetensors metadata: the same tensors give the same digest however stored.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from merging.checkpoints.checkpoint import Checkpoint

DIGEST_VERSION = b"mergeyard-digest-v1"


class DigestBuilder:
    """Feeds tensors, in sorted-name order, into the digest as they are produced."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._h.update(DIGEST_VERSION)
        self._last: str | None = None
        self._remaining = 0

    def _field(self, data: bytes) -> None:
        self._h.update(struct.pack("<Q", len(data)))
        self._h.update(data)

    def begin_tensor(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
        if self._remaining:
            raise RuntimeError("previous tensor's bytes are incomplete")
        if self._last is not None and name <= self._last:
            raise RuntimeError(f"tensors must be digested in sorted order ({name!r} after {self._last!r})")
        self._last = name
        self._field(name.encode("utf-8"))
        self._field(dtype.encode())
        self._field(struct.pack(f"<{len(shape)}Q", *shape))
        self._h.update(struct.pack("<Q", nbytes))
        self._remaining = nbytes

    def update(self, data: bytes | memoryview) -> None:
        self._remaining -= len(data)
        if self._remaining < 0:
            raise RuntimeError("more bytes than the tensor declared")
        self._h.update(data)

    def hexdigest(self) -> str:
        if self._remaining:
            raise RuntimeError("last tensor's bytes are incomplete")
        return "sha256:" + self._h.hexdigest()


def sequential_files(ckpt: Checkpoint) -> dict[Path, int]:
    """The checkpoint's files whose tensors, visited in name order, are the file's bytes in order after its header
    (what safetensors writes for one dtype): {file: where its data starts}. Reading such a file for the digest
    reads it front to back, so the same read gives the file's own sha256."""
    by_file: dict[Path, list] = {}
    for name in ckpt.names:
        by_file.setdefault(ckpt._file_of[name], []).append(ckpt.entries[name])
    out = {}
    for file, entries in by_file.items():
        with open(file, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
        position = data_start = 8 + header_len
        for entry in entries:
            if entry.start != position:
                break
            position = entry.end
        else:
            if position == file.stat().st_size:
                out[file] = data_start
    return out


def checkpoint_digest(source: str | Path | Checkpoint, checksums: dict[str, str] | None = None,
                      inspect: Callable[[str, str, memoryview], None] | None = None,
                      file_sha256: dict[str, str] | None = None) -> str:
    """The digest of a checkpoint on disk (any layout). With `checksums`, also fills it with each tensor's
    `tensor_checksum` in the same read, so a later check can name the tensors whose bytes changed; `inspect`
    (name, safetensors dtype, block) sees every block of bytes too (validation shares the read); `file_sha256`
    gets the whole-file sha256 of each file the read went through front to back (`sequential_files`), which the
    store then records without reading the file again."""
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint(source)
    builder = DigestBuilder()
    crcs: dict[str, int] = {}
    whole: dict = {}  # file -> its sha256 so far
    if file_sha256 is not None:
        for file, data_start in sequential_files(ckpt).items():
            with open(file, "rb") as fh:
                whole[file] = hashlib.sha256(fh.read(data_start))

    def side(name: str, dtype: str, block: memoryview) -> None:
        if checksums is not None:
            crcs[name] = zlib.crc32(block, crcs.get(name, 0))
        if inspect is not None:
            inspect(name, dtype, block)
        hasher = whole.get(ckpt._file_of[name]) if whole else None
        if hasher is not None:
            hasher.update(block)

    # sha256, crc32 and torch's reductions all release the GIL: the checksum and the inspection of a block run on a
    # second thread while the digest hashes it (validating ingest is ~1.6x faster on 2 cores). Each block is done
    # with before the next is read into the same buffer.
    extra = checksums is not None or inspect is not None or bool(whole)
    pool = ThreadPoolExecutor(1, thread_name_prefix="mergeyard-scan") if extra else None
    try:
        for name in ckpt.names:
            entry = ckpt.entries[name]
            builder.begin_tensor(name, entry.dtype, entry.shape, entry.nbytes)
            crcs[name] = 0
            for block in ckpt.iter_raw(name):
                pending = pool.submit(side, name, entry.dtype, block) if pool else None
                builder.update(block)
                if pending is not None:
                    pending.result()
            if checksums is not None:
                checksums[name] = _checksum(entry, crcs[name])
    finally:
        if pool is not None:
            pool.shutdown()
    if file_sha256 is not None:
        file_sha256.update({str(file): h.hexdigest() for file, h in whole.items()})
    return builder.hexdigest()


def _checksum(entry, crc: int) -> str:
    return f"{entry.dtype}:{','.join(map(str, entry.shape))}:{crc:08x}"


def tensor_checksums(source: str | Path | Checkpoint) -> dict[str, str]:
    """Per tensor: dtype, shape and a CRC-32 of its bytes. Not an identity (the digest is): a cheap way to say
    which tensors of a stored copy differ from the ones recorded when it was registered."""
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint(source)
    out = {}
    for name in ckpt.names:
        crc = 0
        for block in ckpt.iter_raw(name):
            crc = zlib.crc32(block, crc)
        out[name] = _checksum(ckpt.entries[name], crc)
    return out
