"""Exact k-th smallest magnitude over a stream, without holding the stream.

Global TIES trims each task vector by a threshold taken over the whole model:
the k-th smallest |τ| among d parameters. Sorting d values (d·N for N models)
is what costs FusionBench its memory. For non-negative IEEE-754 float32, the
order of values is the order of their bit patterns read as integers, so a
radix select finds the exact k-th value in two histogram passes:
  1. a 32 768-bin histogram of the high 16 bits → the bin holding rank k;
  2. a 65 536-bin histogram of the low 16 bits of the values in that bin.
Memory is two small histograms per selector, whatever d is.
"""

from __future__ import annotations

import torch

_HI_BINS = 1 << 15  # finite non-negative float32 has a high half ≤ 0x7F7F
_LO_BINS = 1 << 16


class RankSelector:
    """Finds the value of rank `rank` (1-based, ascending) among the |x| fed to it.

    Feed every chunk to `feed_coarse`, call `settle_coarse`, feed every chunk
    (same values, any order) to `feed_fine`, call `settle_fine`. Afterwards
    `value`, `n_less` and `n_equal` describe the selected value exactly.
    """

    def __init__(self, rank: int, count: int, device: torch.device | str = "cpu"):
        if not 1 <= rank <= count:
            raise ValueError(f"rank {rank} outside 1..{count}")
        self.rank = rank
        self.count = count
        self._coarse = torch.zeros(_HI_BINS, dtype=torch.int64, device=device)
        self._fine = torch.zeros(_LO_BINS, dtype=torch.int64, device=device)
        self._bin: int | None = None
        self._below = 0
        # The high halves of the last chunk fed: reused by feed_fine when it is given
        # the very same tensor (a tensor selected in memory, not streamed).
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._feeds = 0
        self.value: float | None = None
        self.n_less = 0
        self.n_equal = 0

    @staticmethod
    def _bits(abs_values: torch.Tensor) -> torch.Tensor:
        return abs_values.reshape(-1).view(torch.int32)

    def feed_coarse(self, abs_values: torch.Tensor) -> None:
        hi = self._bits(abs_values) >> 16
        self._coarse += torch.bincount(hi, minlength=_HI_BINS)
        self._feeds += 1
        self._last = (abs_values, hi) if self._feeds == 1 else None

    def settle_coarse(self) -> None:
        cum = self._coarse.cumsum(0)
        if int(cum[-1]) != self.count:
            raise RuntimeError(f"selector fed {int(cum[-1])} values, expected {self.count}")
        self._bin = int(torch.searchsorted(cum, torch.tensor(self.rank, device=cum.device)))
        self._below = int(cum[self._bin - 1]) if self._bin > 0 else 0

    def feed_fine(self, abs_values: torch.Tensor) -> None:
        bits = self._bits(abs_values)
        if self._last is not None and self._last[0] is abs_values:
            hi = self._last[1]
        else:
            hi = bits >> 16
            self._last = None  # streamed: don't hold on to a chunk's worth of bits
        in_bin = bits[hi == self._bin]
        if in_bin.numel():
            self._fine += torch.bincount(in_bin & 0xFFFF, minlength=_LO_BINS)

    def settle_fine(self) -> None:
        self._last = None
        cum = self._fine.cumsum(0)
        lo = int(torch.searchsorted(cum, torch.tensor(self.rank - self._below, device=cum.device)))
        bits = (self._bin << 16) | lo
        self.value = float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])
        self.n_less = self._below + (int(cum[lo - 1]) if lo > 0 else 0)
        self.n_equal = int(self._fine[lo])

    # ---- the same two passes as a map (a histogram per tensor, anywhere) and an exact reduce (their sum) ----

    @property
    def bin(self) -> int | None:
        """The high-16-bit bin the first pass settled on (None before it settles)."""
        return self._bin

    def histogram(self, stage: int, abs_values: torch.Tensor) -> torch.Tensor:
        """Stage 0: the histogram of the values' high 16 bits; stage 1: of the low 16 bits of those in the bin
        stage 0 settled on. Summing a stream's histograms gives what feeding it would have."""
        return self.histogram_of(stage, self._bin, abs_values)

    @classmethod
    def histogram_of(cls, stage: int, bin: int | None, abs_values: torch.Tensor) -> torch.Tensor:
        """`histogram` given only the settled bin: what a map elsewhere needs of a selector."""
        bits = cls._bits(abs_values)
        if stage == 0:
            return torch.bincount(bits >> 16, minlength=_HI_BINS)
        return torch.bincount(bits[(bits >> 16) == bin] & 0xFFFF, minlength=_LO_BINS)

    def add(self, stage: int, histogram: torch.Tensor) -> None:
        (self._coarse if stage == 0 else self._fine).add_(histogram.to(self._coarse.device))

    def settle(self, stage: int) -> None:
        self.settle_coarse() if stage == 0 else self.settle_fine()

    @property
    def n_greater(self) -> int:
        return self.count - self.n_less - self.n_equal
