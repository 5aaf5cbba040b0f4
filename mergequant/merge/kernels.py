"""Fused CPU kernels for the task-arithmetic family (numba), with exact top-k statistics.

Why: in eager torch, TIES on one chunk is ~25 separate elementwise passes (delta, abs, compare,
where, weight, sign, elect, agree, sum, divide, ...), each streaming the chunk through memory.
One compiled loop does all of it per element in registers. The kernels work on float32 arrays
or bfloat16 bits (the engine converts each input chunk once; ``common_layout`` gives all inputs of one
call the same layout, so any mix of bf16/fp16/fp32 inputs works) and release the GIL, so the engine's worker threads
run them in parallel. When numba is not installed (or on CUDA) the engine uses the torch path in
``methods.py``; tests check that both give the same result.

Exact top-k without sorting (``topk_threshold``): |delta| is non-negative, so its float32 bit
pattern orders like its value. A histogram of the top 16 bits finds the bin holding the k-th largest
value; a histogram of the low 16 bits inside that bin gives the exact threshold and how many entries
equal it; when only some of those equal entries fit in k, a last pass (stopping early) finds the flat
index of the last one kept. O(n) time, 1 MiB of memory, whatever the value distribution (bf16
inputs produce heavy ties at the threshold, which sample-based brackets choke on).
"""

from __future__ import annotations


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
_BLOCK = 4096  # elements per inner block: the scratch rows stay in L1/L2

# Inputs and outputs are "raw" numpy arrays: float32, or uint16 holding bfloat16 bits (the usual
# on-disk dtype, read straight from the memory map with no conversion pass). ``_decode``/``_encode``
# convert one block; numba compiles a specialization per dtype combination.


def _decode(src, s, m, f32, u32):
    """Block src[s:s+m] -> float32 scratch ``f32`` (``u32`` is the same memory viewed as uint32).
    Compiled per source dtype through the overloads below."""
    raise NotImplementedError


def _encode(f32, u32, dst, s, m):
    """float32 block -> dst[s:s+m]; for bfloat16, round to nearest even, NaN as 0xFFFF (as torch's CPU conversion does)."""
    raise NotImplementedError


if AVAILABLE:
    from numba import types
    from numba.extending import overload

    @overload(_decode, inline="always")
    def _decode_impl(src, s, m, f32, u32):
        if src.dtype == types.uint16:  # bfloat16 bits: the float32 with the same top 16 bits
            def decode_bf16(src, s, m, f32, u32):
                v = src[s:s + m]
                for j in range(m):
                    u32[j] = np.uint32(v[j]) << np.uint32(16)
            return decode_bf16

        def decode_float(src, s, m, f32, u32):
            v = src[s:s + m]
            for j in range(m):
                f32[j] = v[j]
        return decode_float

    @overload(_encode, inline="always")
    def _encode_impl(f32, u32, dst, s, m):
        if dst.dtype == types.uint16:
            def encode_bf16(f32, u32, dst, s, m):
                d = dst[s:s + m]
                for j in range(m):
                    u = u32[j]
                    r = (u + ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)) >> np.uint32(16)
                    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
                    d[j] = np.uint16(r + np.uint32(nan) * (np.uint32(0xFFFF) - r))
            return encode_bf16

        def encode_float(f32, u32, dst, s, m):
            d = dst[s:s + m]
            for j in range(m):
                d[j] = f32[j]
        return encode_float


@njit(nogil=True, cache=True)
def _scratch():
    """Two block buffers, each viewed as uint32 bits and as float32 values (for _decode/_encode)."""
    ub = np.empty(_BLOCK, np.uint32)
    ux = np.empty(_BLOCK, np.uint32)
    return ub, ub.view(np.float32), ux, ux.view(np.float32)


@njit(nogil=True, cache=True, error_model="numpy")
def _abs_delta_bits(base, x, s, m, fb, ub, fx, ux):
    """|x - base| of block [s, s+m) into fx; its bits are in ux (same memory)."""
    _decode(base, s, m, fb, ub)
    _decode(x, s, m, fx, ux)
    for j in range(m):
        fx[j] = abs(fx[j] - fb[j])


@njit(nogil=True, cache=True, error_model="numpy")
def _hist_high(base, x, hist):
    """hist[top 16 bits of |x - base|] += 1 for every element."""
    n = base.shape[0]
    ub, fb, ux, fx = _scratch()
    for s in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s)
        _abs_delta_bits(base, x, s, m, fb, ub, fx, ux)
        for j in range(m):
            hist[ux[j] >> np.uint32(16)] += 1


@njit(nogil=True, cache=True, error_model="numpy")
def _hist_low(base, x, high, hist):
    """hist[low 16 bits] += 1 for the elements whose top 16 bits equal ``high`` (branch-free: adds 0 or 1)."""
    n = base.shape[0]
    ub, fb, ux, fx = _scratch()
    for s in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s)
        _abs_delta_bits(base, x, s, m, fb, ub, fx, ux)
        for j in range(m):
            u = ux[j]
            hist[u & np.uint32(0xFFFF)] += (u >> np.uint32(16)) == high


@njit(nogil=True, cache=True, error_model="numpy")
def _nth_equal(base, x, bits, remaining, offset):
    """Scan for the ``remaining``-th element whose |x - base| has exactly ``bits``. Returns
    (flat index or -1, how many are still to find after this chunk)."""
    n = base.shape[0]
    ub, fb, ux, fx = _scratch()
    for s in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s)
        _abs_delta_bits(base, x, s, m, fb, ub, fx, ux)
        count = 0
        for j in range(m):
            count += ux[j] == bits
        if count < remaining:
            remaining -= count
            continue
        for j in range(m):
            remaining -= ux[j] == bits
            if remaining == 0:
                return offset + s + j, 0
    return -1, remaining


@njit(nogil=True, cache=True, error_model="numpy")
def _combine(base, xs, weights, factors, mode, thr, cutoff, masks, offset, consensus, normalize, lam, out):
    """out = base + lam * combine(sparsified, weighted deltas) for one chunk; returns the NaN/inf count.

    Operation order follows the reference formulas (delta, mask, rescale, weight, elect sign from
    the sum, agreeing sum, divide, lambda, add base), all in float32. Work proceeds in small blocks
    with one simple loop per step over contiguous elements, which LLVM vectorizes; masks are
    applied by multiplying with 0/1 rather than branching (data-dependent branches mispredict).
    A delta agrees when its sign equals the elected one (sign of the total, 0 counting as +);
    zeros never agree.
    """
    k = len(xs)
    n = base.shape[0]
    one = np.float32(1.0)
    zero = np.float32(0.0)
    use_masks = masks.shape[1] > 1
    D = np.empty((k, _BLOCK), np.float32)
    ub, fb, ux, fx = _scratch()
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
        _decode(base, s, m, fb, ub)
        for i in range(k):
            _decode(xs[i], s, m, fx, ux)
            w = weights[i]
            f = factors[i]
            t = thr[i]
            c = cutoff[i] - offset - s  # tie cut-off as an index into this block
            md = mode[i]
            Di = D[i]
            if md == 1:
                for j in range(m):
                    d = fx[j] - fb[j]
                    a = abs(d)
                    keep = (a > t) | ((a == t) & (j <= c))
                    Di[j] = ((d * f) * w) * np.float32(keep)
            elif md == 2 and use_masks:
                mi = masks[i, s:s + m]
                for j in range(m):
                    Di[j] = (((fx[j] - fb[j]) * f) * w) * np.float32(mi[j] != 0)
            else:
                for j in range(m):
                    Di[j] = ((fx[j] - fb[j]) * f) * w
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
            v = fb[j] + mixed[j]
            fb[j] = v
            nonfinite += (v - v) != zero  # NaN or inf
        _encode(fb, ub, out, s, m)
    return nonfinite


@njit(nogil=True, cache=True, error_model="numpy")
def _linear(xs, weights, normalize, out):
    """out = sum_i w_i x_i (/ sum_i w_i), accumulated in float32 in input order; returns the NaN/inf count."""
    k = len(xs)
    n = out.shape[0]
    zero = np.float32(0.0)
    wsum = zero
    for i in range(k):
        wsum += weights[i]
    ua, fa, ux, fx = _scratch()
    nonfinite = 0
    for s in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s)
        for j in range(m):
            fa[j] = zero
        for i in range(k):
            _decode(xs[i], s, m, fx, ux)
            w = weights[i]
            for j in range(m):
                fa[j] += fx[j] * w
        if normalize:
            for j in range(m):
                fa[j] = fa[j] / wsum
        for j in range(m):
            v = fa[j]
            nonfinite += (v - v) != zero
        _encode(fa, ua, out, s, m)
    return nonfinite


@njit(nogil=True, cache=True)
def _order_hist(values, bins, hist):
    """Histograms of float32 ``values`` by their order key (the float bits made monotone as uint32:
    negatives flipped, -0.0 as +0.0). ``bins`` empty: hist[0, key >> 16] += 1 for every value; else
    hist[r, key & 0xFFFF] += 1 for the values whose high 16 bits equal bins[r]. (methods/_select.py;
    the same bins as its torch fallback.)"""
    u = values.view(np.uint32)
    nb = bins.shape[0]
    sign = np.uint32(0x80000000)
    for j in range(u.shape[0]):
        x = u[j]
        if x == sign:
            x = np.uint32(0)
        if x & sign:
            key = np.uint32(0xFFFFFFFF) - x
        else:
            key = x | sign
        high = key >> np.uint32(16)
        if nb == 0:
            hist[0, high] += 1
        else:
            for r in range(nb):
                if high == bins[r]:
                    hist[r, key & np.uint32(0xFFFF)] += 1


def order_hist(values: torch.Tensor, bins: list[int], hist: np.ndarray) -> None:
    """Add one chunk of float32 values (a CPU tensor) to ``hist`` (see ``_order_hist``)."""
    v = values.reshape(-1).contiguous().numpy()
    _order_hist(v, np.asarray(bins, np.int64), hist)


@njit(nogil=True, cache=True)
def _window_mask(values, lo, hi, wvals, first, last, seen, out):
    """out[j] = lo < v < hi, or v equals boundary value wvals[w] and the number of equal values seen
    before it (seen[w], updated) lies in [first[w], last[w]] (methods/_select.RankWindow)."""
    nw = wvals.shape[0]
    for j in range(values.shape[0]):
        x = values[j]
        keep = (x > lo) & (x < hi)
        for w in range(nw):
            if x == wvals[w]:
                e = seen[w]
                seen[w] = e + 1
                keep |= (e >= first[w]) & (e <= last[w])
        out[j] = keep


def window_mask(values: torch.Tensor, lo: float, hi: float, windows, seen: np.ndarray) -> torch.Tensor:
    """The keep-mask of one chunk of float32 values (CPU) for a rank window; ``seen`` is updated."""
    v = values.reshape(-1).contiguous().numpy()
    out = np.empty(v.shape[0], np.bool_)
    _window_mask(v, np.float32(lo), np.float32(hi), np.array([w[0] for w in windows], np.float32),
                 np.array([w[1] for w in windows], np.int64), np.array([w[2] for w in windows], np.int64), seen, out)
    return torch.from_numpy(out)


def raw(t: torch.Tensor) -> np.ndarray:
    """A numpy view the kernels accept: bfloat16 as its uint16 bits and float32 as is (zero-copy, also
    over a memory map); any other floating dtype (float16, float8, float64) is converted to float32.

    Non-float tensors are refused: the plan rejects a tensor whose inputs mix integer and float dtypes,
    so reaching here with one is a bug, and converting it silently would merge garbage."""
    if not t.dtype.is_floating_point:
        raise TypeError(f"kernels take floating-point tensors, got {t.dtype}")
    t = t.reshape(-1)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float32:
        return t.numpy()
    return t.to(torch.float32).numpy()


def _as_float32(a: np.ndarray) -> np.ndarray:
    """One raw array as float32 values: bfloat16 bits become the float32 with the same top 16 bits
    (exact, like ``_decode``); float32 is returned as is."""
    if a.dtype == np.float32:
        return a
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
    raise TypeError(f"not a raw kernel array: {a.dtype}")


def common_layout(arrays) -> tuple:
    """The raw arrays of one kernel call in a single layout.

    Why: numba compiles a kernel per argument type, and ``xs`` is a tuple indexed by a loop variable,
    which it can only type when every element has the same type; a bf16 base next to an fp16 or
    fp32 fine-tune (``uint16`` bits next to ``float32``) was a TypingError. When the layouts differ,
    every array becomes float32. The kernels compute in float32 anyway and bf16/fp16 -> float32 is
    exact, so this is the one cast of each input and the result is the all-float32 computation's,
    rounded once when the output is encoded. All-bf16 inputs keep the zero-copy bit view."""
    arrays = tuple(arrays)
    if len({a.dtype for a in arrays}) <= 1:
        return arrays
    return tuple(_as_float32(a) for a in arrays)


def raw_out(dtype: torch.dtype, n: int) -> tuple[np.ndarray, torch.Tensor]:
    """An output buffer the kernels can write directly for ``dtype`` (bf16 bits or float32), and the
    torch tensor to hand to the writer (converted afterwards when ``dtype`` is neither)."""
    if dtype == torch.bfloat16:
        t = torch.empty(n, dtype=torch.bfloat16)
        return t.view(torch.int16).numpy().view(np.uint16), t
    t = torch.empty(n, dtype=torch.float32)
    return t.numpy(), t


def combine_chunk(base: np.ndarray, xs: tuple, weights, factors, mode, thr, cutoff, masks, offset: int, out: np.ndarray, *,
                  consensus: bool, normalize: bool, lam: float) -> int:
    """Merge one chunk into ``out`` (a raw buffer from ``raw_out``); returns how many values are NaN or inf.
    Inputs may come in different raw layouts (see ``common_layout``)."""
    base, *xs = common_layout((base, *xs))
    return int(_combine(base, tuple(xs), np.asarray(weights, np.float32), np.asarray(factors, np.float32),
                        np.asarray(mode, np.int8), np.asarray(thr, np.float32), np.asarray(cutoff, np.int64), masks,
                        offset, consensus, normalize, np.float32(lam), out))


def linear_chunk(xs: tuple, weights, normalize: bool, out: np.ndarray) -> int:
    """Weighted sum of one chunk into ``out``; returns the NaN/inf count. Inputs may mix raw layouts."""
    return int(_linear(common_layout(xs), np.asarray(weights, np.float32), normalize, out))


class Selection:
    """Exact top-k as (threshold, cutoff): keep |d| > threshold, and |d| == threshold at flat index <= cutoff."""

    def __init__(self, threshold: float, cutoff: int, keep_all: bool = False):
        self.threshold, self.cutoff, self.keep_all = threshold, cutoff, keep_all


def _kth_bin(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and how many elements lie in higher bins."""
    above = np.cumsum(hist[::-1])[::-1]  # above[b] = elements in bins >= b
    b = int(np.nonzero(above >= k)[0][-1])
    return b, int(above[b] - hist[b])


def topk_threshold(chunks, n: int, k: int) -> Selection:
    """Exact selection of the k largest |x - base| of a tensor delivered as ``chunks()`` -> (offset, base, x)
    raw arrays, ties at the threshold broken by flat position (lowest first)."""
    if k >= n:
        return Selection(-1.0, -1, keep_all=True)
    hist = np.zeros(1 << 16, np.int64)
    for _, base, x in chunks():
        _hist_high(base, x, hist)
    high, above_high = _kth_bin(hist, k)
    hist[:] = 0
    for _, base, x in chunks():
        _hist_low(base, x, np.uint32(high), hist)
    low, above = _kth_bin(hist, k - above_high)
    above += above_high
    bits = np.uint32((high << 16) | low)
    threshold = float(np.array([bits], np.uint32).view(np.float32)[0])
    quota, equal = k - above, int(hist[low])
    if quota == equal:
        return Selection(threshold, n)  # every equal element is kept
    remaining = quota
    for offset, base, x in chunks():
        found, remaining = _nth_equal(base, x, bits, remaining, offset)
        if found >= 0:
            return Selection(threshold, int(found))
    raise AssertionError("unreachable: the histogram counted these elements")
