"""The safetensors container format, read and written at the byte level.

Two things the `safetensors` package does not offer and the engine needs:
  * the byte offsets of each tensor (to hash raw bytes for the digest without
    decoding, and to validate a header against the file size before any read);
  * a writer that streams one tensor's bytes chunk by chunk, so an output
    tensor never has to exist whole in memory.
Tensors themselves are read through `safetensors.safe_open` (memory-mapped).
Format: 8-byte little-endian header length, a JSON header, then the raw
little-endian tensor bytes at the header's `data_offsets` (relative to the end
of the header). https://github.com/huggingface/safetensors#format
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, BinaryIO, Iterator

from merging.errors import CheckpointError

if TYPE_CHECKING:
    import torch

# safetensors dtype names -> torch dtype attribute names (those torch can compute with), and their element sizes:
# plain names, so reading a header, hashing or validating never needs torch imported (`mergeyard digest` starts
# in a tenth of a second; torch takes a second).
_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_ITEMSIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class _TorchDtypes(Mapping):
    """safetensors name -> torch.dtype, resolved on first use."""

    def __getitem__(self, name: str) -> "torch.dtype":
        import torch

        return getattr(torch, _TORCH_NAMES[name])

    def __contains__(self, name: object) -> bool:  # Mapping's would resolve the dtype, importing torch
        return name in _TORCH_NAMES

    def __iter__(self) -> Iterator[str]:
        return iter(_TORCH_NAMES)

    def __len__(self) -> int:
        return len(_TORCH_NAMES)


class _DtypeNames(Mapping):
    """torch.dtype -> safetensors name."""

    _cache: dict | None = None

    def _table(self) -> dict:
        if self._cache is None:
            self._cache = {DTYPES[k]: k for k in _TORCH_NAMES}
        return self._cache

    def __getitem__(self, dtype: "torch.dtype") -> str:
        return self._table()[dtype]

    def __iter__(self):
        return iter(self._table())

    def __len__(self) -> int:
        return len(_TORCH_NAMES)


DTYPES: Mapping[str, "torch.dtype"] = _TorchDtypes()
DTYPE_NAMES: Mapping["torch.dtype", str] = _DtypeNames()
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
# Refuse absurd headers before json-parsing them (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def itemsize(dtype_name: str) -> int:
    return _ITEMSIZES[dtype_name]


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate a safetensors header: entries by name, and metadata.

    Raises CheckpointError for anything unreadable: short file, bad JSON,
    unknown dtype, offsets that disagree with shapes or run past the file end.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:  # a local Path, or a UPath on object storage (two ranged reads)
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes); re-save it with safetensors")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: not a safetensors file or truncated (header of {header_len} bytes in a {size}-byte file); "
                    "re-download or re-save it"
                )
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON); re-save it with safetensors") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: malformed header (__metadata__ must map strings to strings)")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    data_end = data_start
    for name, info in header.items():
        try:
            dtype, shape, (lo, hi) = info["dtype"], tuple(_whole(d) for d in info["shape"]), info["data_offsets"]
            lo, hi = _whole(lo), _whole(hi)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from exc
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, which mergeyard cannot merge")
        entry = TensorEntry(name, dtype, shape, data_start + lo, data_start + hi)
        if hi < lo or entry.nbytes != entry.numel * itemsize(dtype):
            raise CheckpointError(f"{path}: tensor {name!r} has offsets that do not match its shape {list(shape)}")
        data_end = max(data_end, entry.end)
        entries[name] = entry
    spans = sorted((e.start, e.end, n) for n, e in entries.items() if e.nbytes)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:  # two tensors over the same bytes: a write to one would be a write to the other
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the file; re-save it with safetensors")
    if data_end > size:
        raise CheckpointError(
            f"{path}: truncated (tensors need {data_end} bytes, the file has {size}); re-download or re-save it"
        )
    return entries, metadata


def _whole(value) -> int:
    """A non-negative integer from the header (a bool, a float or a negative number is malformed)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value


def _header_bytes(layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    sizes = []
    for name, dtype, shape in layout:
        nbytes = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        sizes.append(nbytes)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns tensor data to 8 bytes
    return struct.pack("<Q", len(blob)) + blob, sizes


class StreamingFileWriter:
    """Writes one safetensors file whose layout is known up front, bytes streamed in order.

    The caller declares every tensor (name, dtype, shape) before writing; then it
    writes each tensor's bytes, in the declared order, in as many pieces as it
    likes. `close()` checks every declared byte arrived.
    """

    def __init__(self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        self.path = path
        header, self._sizes = _header_bytes(layout, metadata or {})
        self._names = [name for name, _, _ in layout]
        self._fh: BinaryIO = open(path, "wb")
        self._fh.write(header)
        self.header = header
        self._index = 0
        self._written = 0
        self._skip_empty()

    def _skip_empty(self) -> None:
        # zero-size tensors are complete as soon as they are reached
        while self._index < len(self._sizes) and self._sizes[self._index] == 0:
            self._index += 1

    def write(self, name: str, data: bytes | memoryview) -> None:
        if len(data) == 0:
            return
        if self._index >= len(self._names) or self._names[self._index] != name:
            raise RuntimeError(f"write order broken: got {name!r}, expected {self._names[self._index:self._index + 1]}")
        self._fh.write(data)
        self._written += len(data)
        if self._written > self._sizes[self._index]:
            raise RuntimeError(f"{name!r}: more bytes written than its shape holds")
        if self._written == self._sizes[self._index]:
            self._index += 1
            self._written = 0
            self._skip_empty()

    def close(self) -> None:
        complete = self._index == len(self._names)
        self._fh.close()
        if not complete:
            raise RuntimeError(f"{self.path}: closed before every tensor was written")

    def abort(self) -> None:
        self._fh.close()
