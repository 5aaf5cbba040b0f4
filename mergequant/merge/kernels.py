"""Fused CPU kernels for the task-arithmetic family (numba), with exact top-k statistics.

Why: in eager torch, TIES on one chunk is ~25 separate elementwise passes (delta, abs, compare,
where, weight, sign, elect, agree, sum, divide, ...), each streaming the chunk through memory.
One compiled loop does all of it per element in registers. The kernels work on float32 arrays
(the engine converts each input chunk once) and release the GIL, so the engine's worker threads
run them in parallel. When numba is not installed (or on CUDA) the engine uses the torch path in
``methods.py``; tests check that both give the same result.

Exact top-k without sorting (``topk_threshold``): a small block sample of |delta| brackets the
k-th largest value in [lo, hi]; one fused pass counts the elements above ``hi`` and collects the
(value, flat index) of those inside the bracket; the exact threshold and the tie cut-off are then
read from the few candidates. If the sample's bracket misses (rare), a wider pass repeats it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

try:  # numba is a dependency, but keep working (slower) where it cannot be installed
    from numba import njit

    AVAILABLE = True
except ImportError:  # pragma: no cover
    AVAILABLE = False

    def njit(*args, **kwargs):
        def wrap(f):
            return f
        return wrap(args[0]) if args and callable(args[0]) else wrap


MODE_ALL, MODE_THRESHOLD, MODE_MASK = 0, 1, 2


_BLOCK = 4096  # elements per inner block: the per-input scratch rows stay in L1/L2


@njit(nogil=True, cache=True, error_model="numpy")
def _bracket_pass(base, x, lo, hi, offset, cand_val, cand_idx, ncand):
    """Count |x - base| > hi; append values in [lo, hi] (and their flat index) to the candidate buffers.

    Returns (count above, candidates so far); a candidate count beyond the buffer's capacity means
    it overflowed (the caller widens the search). Blocked and branch-free: one vectorizable loop
    computes |delta| and the count, a second compacts candidates by always writing the current slot
    and advancing only when the element is inside (in-bracket elements are few but scattered, so a
    branch would mispredict on each)."""
    above = 0
    cap = cand_val.shape[0]
    n = base.shape[0]
    a = np.empty(_BLOCK, np.float32)
    for s in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s)
        xb = x[s:s + m]  # views indexed from 0: `arr[s + j]` would defeat vectorization (negative-index checks)
        bb = base[s:s + m]
        for j in range(m):
            v = abs(xb[j] - bb[j])
            a[j] = v
            above += v > hi
        if ncand + m <= cap:
            for j in range(m):
                v = a[j]
                cand_val[ncand] = v
                cand_idx[ncand] = offset + s + j
                ncand += (v >= lo) & (v <= hi)
        else:  # no room to compact into: only count (the caller sees ncand > cap)
            for j in range(m):
                v = a[j]
                ncand += (v >= lo) & (v <= hi)
            ncand = max(ncand, cap + 1)
    return above, ncand


@njit(nogil=True, cache=True, error_model="numpy")
def _combine(base, xs, weights, factors, mode, thr, cutoff, masks, offset, consensus, normalize, lam, out):
    """out = base + lam * combine(sparsified, weighted deltas) for one chunk.

    Operation order follows the reference formulas (delta, mask, rescale, weight, elect sign from
    the sum, agreeing sum, divide, lambda, add base), all in float32. Work proceeds in small blocks
    with one simple loop per step over contiguous elements, which LLVM vectorizes; masks are
    applied by multiplying with 0/1 rather than branching (data-dependent branches mispredict).
    A delta agrees when its sign equals the elected one (sign of the total, 0 counting as +);
    zeros never agree.
    """
    k = xs.shape[0]
    n = base.shape[0]
    one = np.float32(1.0)
    zero = np.float32(0.0)
    use_masks = masks.shape[1] > 1
    D = np.empty((k, _BLOCK), np.float32)
    total = np.empty(_BLOCK, np.float32)
    mixed = np.empty(_BLOCK, np.float32)
    div = np.empty(_BLOCK, np.float32)
    nonfinite = 0
    wsum = zero
    for i in range(k):
        wsum += weights[i]
    if abs(wsum) < 1e-8:
        wsum = one
    for s in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s)
        bb = base[s:s + m]  # views indexed from 0, so the loops vectorize
        ob = out[s:s + m]
        for i in range(k):
            w = weights[i]
            f = factors[i]
            t = thr[i]
            c = cutoff[i] - offset - s  # tie cut-off as an index into this block
            md = mode[i]
            Di = D[i]
            xi = xs[i, s:s + m]
            if md == 1:
                for j in range(m):
                    d = xi[j] - bb[j]
                    a = abs(d)
                    keep = (a > t) | ((a == t) & (j <= c))
                    Di[j] = ((d * f) * w) * np.float32(keep)
            elif md == 2 and use_masks:
                mi = masks[i, s:s + m]
                for j in range(m):
                    Di[j] = (((xi[j] - bb[j]) * f) * w) * np.float32(mi[j] != 0)
            else:
                for j in range(m):
                    Di[j] = ((xi[j] - bb[j]) * f) * w
        if consensus:
            for j in range(m):
                total[j] = D[0, j]
            for i in range(1, k):
                Di = D[i]
                for j in range(m):
                    total[j] += Di[j]
            for j in range(m):
                mixed[j] = zero
                div[j] = zero
            for i in range(k):
                Di = D[i]
                w = weights[i]
                for j in range(m):
                    d = Di[j]
                    agree = np.float32((d != zero) & ((d > zero) == (total[j] >= zero)))
                    mixed[j] += d * agree
                    div[j] += w * agree
            for j in range(m):
                div[j] += np.float32(div[j] == zero)  # no agreeing input: divide by 1
        else:
            for j in range(m):
                mixed[j] = D[0, j]
                div[j] = wsum
            for i in range(1, k):
                Di = D[i]
                for j in range(m):
                    mixed[j] += Di[j]
        if normalize:
            for j in range(m):
                mixed[j] = mixed[j] / div[j]
        if lam != one:
            for j in range(m):
                mixed[j] = mixed[j] * lam
        for j in range(m):
            v = bb[j] + mixed[j]
            ob[j] = v
            nonfinite += (v - v) != zero  # NaN or inf
    return nonfinite


def combine_chunk(base: np.ndarray, xs: np.ndarray, weights, factors, mode, thr, cutoff, masks, offset: int, *,
                  consensus: bool, normalize: bool, lam: float) -> tuple[np.ndarray, int]:
    """Returns the merged chunk and how many of its values are NaN or inf."""
    out = np.empty_like(base)
    bad = _combine(base, xs, np.asarray(weights, np.float32), np.asarray(factors, np.float32), np.asarray(mode, np.int8),
             np.asarray(thr, np.float32), np.asarray(cutoff, np.int64), masks, offset, consensus, normalize,
             np.float32(lam), out)
    return out, int(bad)


class Selection:
    """Exact top-k as (threshold, cutoff): keep |d| > threshold, and |d| == threshold at flat index <= cutoff."""

    def __init__(self, threshold: float, cutoff: int, keep_all: bool = False):
        self.threshold, self.cutoff, self.keep_all = threshold, cutoff, keep_all


def _select_from_candidates(vals: np.ndarray, idx: np.ndarray, rank: int) -> Selection:
    """The rank-th largest among candidates (1-based), ties broken by smaller flat index first."""
    order = np.lexsort((idx, -vals))  # value descending, then index ascending
    thr = vals[order[rank - 1]]
    kept = order[:rank]
    cutoff = int(idx[kept][vals[kept] == thr].max())
    return Selection(float(thr), cutoff)


def topk_threshold(chunks, n: int, k: int, sample: np.ndarray) -> Selection:
    """Exact selection of the k largest |delta| over a tensor delivered as ``chunks()`` -> (offset, base, x).

    ``sample`` is a representative sample of |delta| used only to guess the bracket.
    """
    if k >= n:
        return Selection(-1.0, -1, keep_all=True)
    s = np.sort(sample.astype(np.float32))
    m = s.shape[0]
    q = (n - k) / n  # ascending quantile of the threshold
    margin = int(8 * math.sqrt(max(m * q * (1 - q), 1.0))) + 16
    pos = int(q * m)
    brackets = [(s[max(0, pos - margin)], s[min(m - 1, pos + margin)])] if m else []
    brackets.append((np.float32(0.0), np.float32(np.inf)))  # fallback: everything is a candidate
    for lo, hi in brackets:
        expected = max(1 << 16, int(n * (2 * margin + 1) / max(m, 1) * 4)) if np.isfinite(hi) else n
        cap = min(n, expected + _BLOCK)
        vals = np.empty(cap, np.float32)
        idx = np.empty(cap, np.int64)
        above = ncand = 0
        for offset, base, x in chunks():
            a, ncand = _bracket_pass(base, x, np.float32(lo), np.float32(hi), offset, vals, idx, ncand)
            above += a
        if ncand > cap:  # buffer overflowed: widen to the exact fallback
            continue
        if above < k <= above + ncand:
            return _select_from_candidates(vals[:ncand], idx[:ncand], k - above)
    raise AssertionError("unreachable: the full bracket always contains the threshold")


def to_numpy_f32(t: torch.Tensor, out: np.ndarray | None = None) -> np.ndarray:
    """A float32 numpy copy of a (possibly bf16, memory-mapped) tensor chunk, optionally into ``out``."""
    if out is None:
        return t.to(torch.float32).numpy()
    torch.from_numpy(out).copy_(t)
    return out
