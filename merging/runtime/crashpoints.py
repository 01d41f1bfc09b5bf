"""Named points where the fault-injection tests kill the process (SIGKILL), as a crash or an OOM killer would.

Set MERGEYARD_TEST_CRASH_AT=NAME (or NAME#N: at the N-th time the point is reached) in a test; unset, a point
costs one dictionary lookup. The names are listed where they are placed (grep `crashpoint(`).
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

ENV = "MERGEYARD_TEST_CRASH_AT"
_hits: Counter = Counter()


def crashpoint(name: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _hits[name] += 1
    if _hits[name] >= int(nth or 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
