"""Checking tensors for NaN/inf cheaply.

`torch.isfinite(x).all()` materialises a bool tensor and costs ~60× a plain
reduction here. A sum of finite values is either finite or overflows; any NaN
or infinity makes the sum non-finite. So a finite sum proves every element
finite, and only a non-finite sum (a real NaN/inf, or an overflow of large
values) needs the exact, slower check.
"""

from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def raw_finite(dtype: str, block: memoryview) -> bool:
    """`all_finite` of a block of a tensor's stored bytes (whole elements) in safetensors dtype `dtype`."""
    from merging.checkpoints.safetensors_format import DTYPES, FLOAT_DTYPES

    if dtype not in FLOAT_DTYPES or len(block) == 0:
        return True
    return all_finite(torch.frombuffer(block, dtype=DTYPES[dtype]))
