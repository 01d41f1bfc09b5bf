"""glibc's allocator tuned for a process that merges large tensors (a Dask worker).

Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_ set, and setting any malloc threshold turns off glibc's
dynamic mmap threshold: every buffer above 128 kB is then a fresh mmap, zero-filled page by page on first touch
and unmapped on free. A merge allocates and frees row chunks of megabytes continuously, so its units ran 3× slower
in a worker than in one process (the same units of a 1-layer Llama-7B pool, one thread: 130 s with the nanny's
MALLOC_TRIM_THRESHOLD_=65536, 42 s without; bench/distributed_merge.py's 2-worker rows went from 324 s to 117 s). Fixing the mmap threshold at glibc's own ceiling (32 MB) and keeping freed memory up to 128 MB
restores the one-process speed; memory returned to the system is then what the merge no longer reuses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20   # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc: the dynamic threshold's ceiling
TRIM_THRESHOLD = 128 << 20


@functools.cache
def tune_for_large_tensors() -> bool:
    """Once per process; False where the C library is not glibc (mallopt absent): nothing to tune there."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
