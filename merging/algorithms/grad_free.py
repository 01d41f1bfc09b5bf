"""`@without_grad`: `torch.no_grad()` as a decorator that imports torch when the function is called, not when its
module is imported (listing methods and their parameters must not wait a second for torch)."""

from __future__ import annotations

import functools


def without_grad(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper
