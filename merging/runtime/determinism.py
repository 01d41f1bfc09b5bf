"""Same inputs, same bytes: solving in one thread.

A matmul's float rounding depends on how many threads split it. Methods
whose decisions follow from such sums (FW-Merging's selections, MuDSC's
matchings) must decide the same way in every process, a one-thread Dask
worker and a many-core laptop alike, or `reproduce` would not rebuild the
same digest. They solve single-threaded.
"""

from __future__ import annotations

import torch


class SingleThread:
    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
