"""Counter-based uniform random numbers for DARE's drop masks.

A stateful generator would make the mask depend on how a tensor is chunked
and on the device. Here each element's number is a hash of (seed, stream,
flat index), so the same recipe gives the same mask on CPU or CUDA, in one
piece or in chunks. The hash is `lowbias32` (Chris Wellons' hash-prospector),
applied twice to mix the index halves with the stream key; 24 bits give the
float in [0, 1).
"""

from __future__ import annotations

import zlib

import torch

_M32 = 0xFFFFFFFF


def mix32(x):
    """lowbias32 on a Python int or an int64 tensor holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32  # int64 multiply may wrap; the low 32 bits stay exact
    return x ^ (x >> 16)


def stream_key(seed: int, *parts: object) -> int:
    """A 32-bit key for one random stream, e.g. (seed, model index, tensor name)."""
    text = "\x00".join(str(p) for p in (seed, *parts)).encode("utf-8")
    return mix32(zlib.crc32(text) & _M32)


def uniform(key: int, offset: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 numbers in [0, 1) for flat indices offset .. offset+count-1 of the stream `key`."""
    idx = torch.arange(offset, offset + count, dtype=torch.int64, device=device)
    h = mix32((idx & _M32) ^ key)
    h = mix32(h ^ (idx >> 32) ^ mix32(key ^ 0x9E3779B9))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))
