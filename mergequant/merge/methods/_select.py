"""Exact order statistics of a streamed tensor, in O(n) time and O(1) memory in the tensor's size.

Several methods need a value at a given rank of a whole tensor: breadcrumbs keeps the |d| ranks between
two cut-offs, sce the largest variances, arcee_fusion three quantiles of its importance scores. Sorting a
whole tensor (as mergekit does) needs it in memory; here the values arrive chunk by chunk, twice:

1. a histogram of the top 16 bits of each value's order key (a monotone map of float32 bits to int32)
   tells which of 65,536 bins holds each wanted rank;
2. a histogram of the low 16 bits of the values inside those bins gives the exact value.

The histograms are counted by a numba kernel (``kernels.order_hist``) where numba is installed, else by
``torch.bincount``; both use the same bins.

``chunks()`` must produce the same values in the same order each time it is called (the callers compute
them from the memory-mapped inputs). Ties are broken by position: among equal values an *earlier* one
counts as larger (as the fused TIES kernel does), which makes every selection a deterministic set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from mergequant.merge import kernels as K

_BINS = 1 << 16


def order_key(v: torch.Tensor) -> torch.Tensor:
    """float32 values -> int32 keys with the same order as signed integers (-0.0 counted as +0.0):
    the bits of a negative float with its 31 low bits flipped."""
    bits = (v.float() + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _split(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high bin in [0, 65536), low 16 bits) of int32 keys, both ordered like the keys."""
    return (key >> 16) + 32768, key & 0xFFFF


def key_value(high: int, low: int) -> float:
    """The float32 value of the key with this high bin and low 16 bits (inverse of ``order_key``)."""
    key = np.array([((high - 32768) << 16) | low], np.int64).astype(np.int32)
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return float(bits.view(np.float32)[0])


@dataclass(frozen=True)
class OrderStat:
    """The value at a rank (ascending, 0-based), how many values are smaller, and how many equal it."""

    value: float
    less: int
    equal: int


def order_statistics(chunks: Callable[[], Iterable[torch.Tensor]], ranks) -> list[OrderStat]:
    """Exact values at ``ranks`` (ascending order, 0-based) of all values ``chunks()`` yields.

    ``ranks`` is a list of ints, or a function of the number of values and of zeros in them returning
    one (sce's top-k is a fraction of the non-zero variances)."""
    fused = K.AVAILABLE
    high = np.zeros((1, _BINS), np.int64)
    n = zeros = 0
    for v in chunks():
        v = v.reshape(-1).float().cpu()
        if fused:
            K.order_hist(v, [], high)
        else:
            hi, _ = _split(order_key(v))
            high[0] += torch.bincount(hi.to(torch.int64), minlength=_BINS).numpy()
        n += v.numel()
        zeros += int((v == 0).sum())
    if callable(ranks):
        ranks = ranks(n, zeros)
    if not ranks:
        return []
    if any(not 0 <= r < n for r in ranks):
        raise ValueError(f"rank out of range for {n} values: {ranks}")
    cum = np.cumsum(high[0])
    where = []
    for r in ranks:
        b = int(np.searchsorted(cum, r, side="right"))
        where.append((b, int(cum[b] - high[0, b])))
    bins = sorted({b for b, _ in where})
    low = np.zeros((len(bins), _BINS), np.int64)
    for v in chunks():
        v = v.reshape(-1).float().cpu()
        if fused:
            K.order_hist(v, bins, low)
        else:
            hi, lo = _split(order_key(v))
            for r, b in enumerate(bins):
                sel = lo[hi == b]
                if sel.numel():
                    low[r] += torch.bincount(sel.to(torch.int64), minlength=_BINS).numpy()
    out = []
    for r, (b, below) in zip(ranks, where):
        h = low[bins.index(b)]
        cl = np.cumsum(h)
        j = int(np.searchsorted(cl, r - below, side="right"))
        out.append(OrderStat(key_value(b, j), below + int(cl[j] - h[j]), int(h[j])))
    return out


class RankWindow:
    """Keep the values whose rank (ascending; an earlier one of equal values ranks higher) lies in
    ``[r0, r1)``: everything strictly between the two boundary values, and at each boundary value the
    equal entries whose position among their equals falls inside the window. ``mask`` is called on the
    chunks in order (it counts the boundary-equal entries already seen); ``reset`` before a new pass."""

    def __init__(self, chunks: Callable[[], Iterable[torch.Tensor]], r0: int, r1: int, n: int):
        self.windows: list[tuple[float, int, int]] = []  # (value, first, last) on "equal entries before"
        self.lo = self.hi = 0.0
        self._set(r0, r1, n)
        if self.empty or self.all:
            return
        lo, hi = order_statistics(chunks, [r0, r1 - 1])
        self._bounds(lo, hi, r0, r1)

    @classmethod
    def from_counts(cls, chunks: Callable[[], Iterable[torch.Tensor]], window) -> "RankWindow":
        """A window that depends on the values' count and number of zeros: ``window(n, zeros) -> (r0, r1)``
        (sce keeps a fraction of the non-zero variances). The counting rides on the first histogram pass."""
        self = cls.__new__(cls)
        self.windows, self.lo, self.hi = [], 0.0, 0.0
        chosen = []

        def ranks(n, zeros):
            r0, r1 = window(n, zeros)
            chosen.append((r0, r1))
            self._set(r0, r1, n)
            return [] if self.empty or self.all else [r0, r1 - 1]

        stats = order_statistics(chunks, ranks)
        if stats:
            self._bounds(*stats, *chosen[0])
        return self

    def _set(self, r0: int, r1: int, n: int) -> None:
        self.empty = r1 <= r0
        self.all = r0 <= 0 and r1 >= n

    def _bounds(self, lo: OrderStat, hi: OrderStat, r0: int, r1: int) -> None:
        self.lo, self.hi = lo.value, hi.value
        for s in ([lo] if lo.value == hi.value else [lo, hi]):
            top = s.less + s.equal  # an entry with e equal entries before it has rank top - 1 - e
            self.windows.append((s.value, max(0, top - r1), min(s.equal - 1, top - 1 - r0)))
        self.seen = np.zeros(len(self.windows), np.int64)

    def reset(self) -> None:
        self.seen = np.zeros(len(self.windows), np.int64)

    def mask(self, v: torch.Tensor) -> torch.Tensor:
        if self.empty:
            return torch.zeros(v.shape, dtype=torch.bool, device=v.device)
        if self.all:
            return torch.ones(v.shape, dtype=torch.bool, device=v.device)
        v = v.reshape(-1).float()
        if K.AVAILABLE and v.device.type == "cpu":
            return K.window_mask(v, self.lo, self.hi, self.windows, self.seen)
        keep = (v > self.lo) & (v < self.hi)
        for w, (value, first, last) in enumerate(self.windows):
            eq = v == value
            count = int(eq.sum())
            if count:
                e = torch.cumsum(eq.to(torch.int64), 0) - 1 + int(self.seen[w])
                keep |= eq & (e >= first) & (e <= last)
                self.seen[w] += count
        return keep
