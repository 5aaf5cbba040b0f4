"""GGUF k-quants (super-blocks of 256 weights): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Re-expressed from the formats and the reference search of llama.cpp (ggml-quants.c): every
super-block is split into 16- or 32-weight sub-blocks, each gets a scale (and a min for the
asymmetric types) from a small search around round-to-nearest, and the sub-block scales are
themselves quantized to 4, 6 or 8 bits against a half-precision super-block scale. The arithmetic
follows llama.cpp's reference quantizer exactly in float32 (same operation order, C rounding), so
without an importance matrix the bytes equal llama.cpp's. With one (``--calib``) the search weighs
each column's error by the matrix, as llama.cpp's ``quantize_row_*_impl`` do.

Searches (names as in ggml-quants.c, our code):
- ``_qx``: symmetric signed levels, scale refined over 18 trial inverse scales (Q6_K);
- ``_q3``: symmetric, then coordinate descent on each level (Q3_K);
- ``_qkx2``: asymmetric (scale, min) by weighted least squares over ``nstep`` trial scales (Q2_K, Q4_K, Q5_K).
"""

from __future__ import annotations

import numba
import numpy as np

from mergequant.gguf.blocks import get_f16, put_f16

EPS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS: a sub-block below this is all zeros


@numba.njit(cache=True)
def _nint(v):
    """llama.cpp's nearest_int: round half to even (adding 1.5 * 2^23 in float32)."""
    return np.int64(np.rint(v))


@numba.njit(cache=True)
def _round_codes(x, start, n, dd, shift, lo, hi, L, l0):
    """Codes of ``n`` values ``x[start:]`` on a sub-block grid: ``L[l0 + k] = clamp(nint((x + shift) / dd),
    lo, hi) - lo`` (``shift`` the sub-block's min for the asymmetric types, 0 for the symmetric ones)."""
    for k in range(n):
        q = _nint((x[start + k] + shift) / dd)
        L[l0 + k] = max(lo, min(hi, q)) - lo


@numba.njit(cache=True)
def _qx(x, s, n, nmax, L, lo, qw, use_qw):
    """Symmetric levels in [-nmax, nmax-1] for x[s:s+n] (stored + nmax in L[lo:lo+n]); returns the scale.
    Weights: ``qw`` when ``use_qw``, else x^2 (rmse_type 1)."""
    mx = np.float32(0.0)
    amax = np.float32(0.0)
    for i in range(n):
        ax = np.abs(x[s + i])
        if ax > amax:
            amax = ax
            mx = x[s + i]
    if amax < EPS:
        for i in range(n):
            L[lo + i] = 0
        return np.float32(0.0)
    iscale = np.float32(-nmax) / mx
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        xi = x[s + i]
        q = _nint(iscale * xi)
        q = max(-nmax, min(nmax - 1, q))
        L[lo + i] = q + nmax
        w = qw[s + i] if use_qw else xi * xi
        fl = np.float32(q)
        sumlx += w * xi * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else np.float32(0.0)
    best = scale * sumlx
    for t in range(-9, 10):
        if t == 0:
            continue
        iscale = -(np.float32(nmax) + np.float32(0.1) * np.float32(t)) / mx
        sumlx = np.float32(0.0)
        suml2 = np.float32(0.0)
        for i in range(n):
            xi = x[s + i]
            q = _nint(iscale * xi)
            q = max(-nmax, min(nmax - 1, q))
            w = qw[s + i] if use_qw else xi * xi
            fl = np.float32(q)
            sumlx += w * xi * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                q = _nint(iscale * x[s + i])
                L[lo + i] = nmax + max(-nmax, min(nmax - 1, q))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@numba.njit(cache=True)
def _q3(x, s, n, nmax, L, lo):
    """Symmetric levels with coordinate descent (make_q3_quants, do_rmse); L stored + nmax."""
    mx = np.float32(0.0)
    amax = np.float32(0.0)
    for i in range(n):
        ax = np.abs(x[s + i])
        if ax > amax:
            amax = ax
            mx = x[s + i]
    if amax < EPS:
        for i in range(n):
            L[lo + i] = 0
        return np.float32(0.0)
    iscale = np.float32(-nmax) / mx
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        xi = x[s + i]
        q = _nint(iscale * xi)
        q = max(-nmax, min(nmax - 1, q))
        L[lo + i] = q
        w = xi * xi
        sumlx += w * xi * np.float32(q)
        suml2 += w * np.float32(q) * np.float32(q)
    for _ in range(5):
        changed = 0
        for i in range(n):
            xi = x[s + i]
            w = xi * xi
            li = np.float32(L[lo + i])
            slx = sumlx - w * xi * li
            if slx > 0:
                sl2 = suml2 - w * li * li
                nl = _nint(xi * sl2 / slx)
                nl = max(-nmax, min(nmax - 1, nl))
                if nl != L[lo + i]:
                    fn = np.float32(nl)
                    slx += w * xi * fn
                    sl2 += w * fn * fn
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[lo + i] = nl
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    for i in range(n):
        L[lo + i] += nmax
    return sumlx / suml2 if suml2 > 0 else np.float32(0.0)


@numba.njit(cache=True)
def _qkx2(x, s, n, nmax, w, L, lo, aux, rmin, rdelta, nstep, use_mad):
    """Asymmetric levels in [0, nmax] (make_qkx2_quants): returns (scale, -min)."""
    mn = x[s]
    mx = x[s]
    sum_w = w[0]
    sum_x = sum_w * x[s]
    for i in range(1, n):
        xi = x[s + i]
        if xi < mn:
            mn = xi
        if xi > mx:
            mx = xi
        sum_w += w[i]
        sum_x += w[i] * xi
    if mn > 0:
        mn = np.float32(0.0)
    if mx == mn:
        for i in range(n):
            L[lo + i] = 0
        return np.float32(0.0), -mn
    fnmax = np.float32(nmax)
    iscale = fnmax / (mx - mn)
    scale = np.float32(1.0) / iscale
    best = np.float32(0.0)
    for i in range(n):
        q = _nint(iscale * (x[s + i] - mn))
        q = max(0, min(nmax, q))
        L[lo + i] = q
        diff = scale * np.float32(q) + mn - x[s + i]
        diff = np.abs(diff) if use_mad else diff * diff
        best += w[i] * diff
    if nstep < 1:
        return scale, -mn
    for t in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(t) + fnmax) / (mx - mn)
        sum_l = np.float32(0.0)
        sum_l2 = np.float32(0.0)
        sum_xl = np.float32(0.0)
        for i in range(n):
            q = _nint(iscale * (x[s + i] - mn))
            q = max(0, min(nmax, q))
            aux[i] = q
            fl = np.float32(q)
            sum_l += w[i] * fl
            sum_l2 += w[i] * fl * fl
            sum_xl += w[i] * fl * x[s + i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = np.float32(0.0)
                this_scale = sum_xl / sum_l2
            cur = np.float32(0.0)
            for i in range(n):
                diff = this_scale * np.float32(aux[i]) + this_min - x[s + i]
                diff = np.abs(diff) if use_mad else diff * diff
                cur += w[i] * diff
            if cur < best:
                for i in range(n):
                    L[lo + i] = aux[i]
                best = cur
                scale = this_scale
                mn = this_min
    return scale, -mn


@numba.njit(cache=True)
def _pack2(L, out, pos):
    """Four 2-bit planes: byte j/4 + l of each 128 holds L[j+l], L[j+l+32] << 2, +64 << 4, +96 << 6."""
    for j in range(0, 256, 128):
        for k in range(32):
            out[pos + j // 4 + k] = np.uint8((L[j + k] | (L[j + k + 32] << 2) | (L[j + k + 64] << 4)
                                              | (L[j + k + 96] << 6)) & 0xFF)


@numba.njit(cache=True, parallel=True)
def _q2_k(x, out, qw, use_qw):
    nb = x.size // 256
    for i in numba.prange(nb):  # super-blocks are independent
        L = np.zeros(256, dtype=np.int64)
        aux = np.zeros(16, dtype=np.int64)
        w = np.zeros(16, dtype=np.float32)
        scales = np.zeros(16, dtype=np.float32)
        mins = np.zeros(16, dtype=np.float32)
        s0 = i * 256
        b = i * 84
        max_scale = np.float32(0.0)
        max_min = np.float32(0.0)
        for j in range(16):
            for k in range(16):
                w[k] = np.abs(x[s0 + 16 * j + k])
            sc, m = _qkx2(x, s0 + 16 * j, 16, 3, w, L, 16 * j, aux, np.float32(-0.5), np.float32(0.1), 15, True)
            scales[j] = sc
            mins[j] = m
            if sc > max_scale:
                max_scale = sc
            if m > max_min:
                max_min = m
        if max_scale > 0:
            iscale = np.float32(15.0) / max_scale
            for j in range(16):
                out[b + j] = np.uint8(_nint(iscale * scales[j]) & 0xFF)
            d = put_f16(out, b + 80, max_scale / np.float32(15.0))
        else:
            for j in range(16):
                out[b + j] = 0
            d = put_f16(out, b + 80, np.float32(0.0))
        if max_min > 0:
            iscale = np.float32(15.0) / max_min
            for j in range(16):
                out[b + j] = np.uint8((out[b + j] | (_nint(iscale * mins[j]) << 4)) & 0xFF)
            dmin = put_f16(out, b + 82, max_min / np.float32(15.0))
        else:
            dmin = put_f16(out, b + 82, np.float32(0.0))
        for j in range(16):
            sc = np.int64(out[b + j])
            dd = d * np.float32(sc & 0xF)
            if dd == 0:
                continue
            _round_codes(x, s0 + 16 * j, 16, dd, dmin * np.float32(sc >> 4), 0, 3, L, 16 * j)
        _pack2(L, out, b + 16)


@numba.njit(cache=True, parallel=True)
def _q3_k(x, out, qw, use_qw):
    nb = x.size // 256
    for i in numba.prange(nb):  # super-blocks are independent
        L = np.zeros(256, dtype=np.int64)
        scales = np.zeros(16, dtype=np.float32)
        s0 = i * 256
        b = i * 110  # hmask[32] qs[64] scales[12] d
        max_scale = np.float32(0.0)
        amax = np.float32(0.0)
        for j in range(16):
            sc = _q3(x, s0 + 16 * j, 16, 4, L, 16 * j)
            scales[j] = sc
            if np.abs(sc) > amax:
                amax = np.abs(sc)
                max_scale = sc
        Ls = np.zeros(16, dtype=np.int64)  # stored scales (+ 32); an all-zero block keeps zero bytes, as llama.cpp
        if max_scale != 0:
            iscale = np.float32(-32.0) / max_scale
            for j in range(16):
                q = _nint(iscale * scales[j])
                q = ((q + 128) & 0xFF) - 128  # int8_t
                Ls[j] = max(-32, min(31, q)) + 32
            d = put_f16(out, b + 108, np.float32(1.0) / iscale)
        else:
            d = put_f16(out, b + 108, np.float32(0.0))
        _put_q3_scales(Ls, out, b)
        _codes_q3_k(x, s0, out, b, d, L)


@numba.njit(cache=True)
def _put_q3_scales(Ls, out, b):
    """The 16 stored sub-block scales ``Ls`` (6-bit, signed scale + 32) into the Q3_K block at ``out[b]``:
    low nibbles in bytes 96..103, two high bits per sub-block in bytes 104..107 (``_q3_scale`` reads them)."""
    for k in range(12):
        out[b + 96 + k] = 0
    for j in range(16):
        q = Ls[j]
        if j < 8:
            out[b + 96 + j] = np.uint8(q & 0xF)
        else:
            out[b + 96 + j - 8] = np.uint8(out[b + 96 + j - 8] | ((q & 0xF) << 4))
        q >>= 4
        out[b + 96 + 8 + j % 4] = np.uint8(out[b + 96 + 8 + j % 4] | (q << (2 * (j // 4))))


@numba.njit(cache=True)
def _codes_q3_k(x, s0, out, b, d, L):
    """Round x[s0:s0+256] to nearest on the Q3_K grid already stored at ``out[b]`` (super-block scale ``d``,
    the sub-block scales) and pack the codes; ``L`` is a 256-long scratch."""
    for j in range(16):
        dd = d * np.float32(_q3_scale(out, b, j))
        if dd == 0:
            continue
        _round_codes(x, s0 + 16 * j, 16, dd, np.float32(0.0), -4, 3, L, 16 * j)
    _pack_q3_codes(L, out, b)


@numba.njit(cache=True)
def _q3_scale(out, b, j):
    """Sub-block j's signed 6-bit scale of the Q3_K block at ``out[b]`` (low nibbles in bytes 96..103, two high
    bits per sub-block in bytes 104..107, stored + 32)."""
    if j < 8:
        sc = np.int64(out[b + 96 + j]) & 0xF
    else:
        sc = np.int64(out[b + 96 + j - 8]) >> 4
    return (sc | (((np.int64(out[b + 96 + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


@numba.njit(cache=True)
def _pack_q3_codes(L, out, b):
    """Q3_K codes L (0..7, i.e. level + 4) into the block at ``out[b]``: the high bit of code j in bit j // 32 of
    hmask byte j % 32, the low two bits as ``_pack2`` planes at b + 32. Leaves L holding the low bits."""
    for k in range(32):
        out[b + k] = 0
    m = 0
    hm = 1
    for j in range(256):
        if L[j] > 3:
            out[b + m] = np.uint8(out[b + m] | hm)
            L[j] -= 4
        m += 1
        if m == 32:
            m = 0
            hm <<= 1
    _pack2(L, out, b + 32)


@numba.njit(cache=True)
def _scale_min_k4(j, out, p):
    if j < 4:
        return np.int64(out[p + j]) & 63, np.int64(out[p + j + 4]) & 63
    d = (np.int64(out[p + j + 4]) & 0xF) | ((np.int64(out[p + j - 4]) >> 6) << 4)
    m = (np.int64(out[p + j + 4]) >> 4) | ((np.int64(out[p + j]) >> 6) << 4)
    return d, m


@numba.njit(cache=True)
def _put_scale_min_k4(j, ls, lm, out, p):
    """Sub-block j's 6-bit scale ``ls`` and min ``lm`` into the 12-byte field at ``out[p]`` (the inverse of
    ``_scale_min_k4``: j < 4 in the low 6 bits of bytes j and j + 4, j >= 4 split over byte j + 4's nibbles and
    the top 2 bits of bytes j - 4 and j)."""
    if j < 4:
        out[p + j] = np.uint8(ls & 0xFF)
        out[p + j + 4] = np.uint8(lm & 0xFF)
    else:
        out[p + j + 4] = np.uint8(((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF)
        out[p + j - 4] = np.uint8((out[p + j - 4] | ((ls >> 4) << 6)) & 0xFF)
        out[p + j] = np.uint8((out[p + j] | ((lm >> 4) << 6)) & 0xFF)


@numba.njit(cache=True)
def _codes_q45_k(x, s0, out, b, p, d, dmin, nmax, L):
    """A Q4_K/Q5_K super-block's codes from its stored d, dmin and 6-bit scales/mins (what a decoder will
    use, so rounding matches it), packed after them: low nibbles, and for Q5_K (nmax 31) the fifth bits."""
    for j in range(8):
        sc, m = _scale_min_k4(j, out, p)
        dd = d * np.float32(sc)
        if dd == 0:
            continue
        _round_codes(x, s0 + 32 * j, 32, dd, dmin * np.float32(m), 0, nmax, L, 32 * j)
    _pack_q45_codes(L, out, b, nmax)


@numba.njit(cache=True)
def _pack_q45_codes(L, out, b, nmax):
    """Q4_K (nmax 15) / Q5_K (nmax 31) codes L into the block at ``out[b]``: Q4_K's 128 bytes of nibbles at
    b + 16 (byte k of each 32 holds codes j + k and j + k + 32 of a 64-run); Q5_K's fifth bits in qh (b + 16,
    two bits per 64-run) and its low nibbles at b + 48."""
    if nmax == 15:
        q = b + 16
        for j in range(0, 256, 64):
            for k in range(32):
                out[q + k] = np.uint8(L[j + k] | (L[j + k + 32] << 4))
            q += 32
    else:
        qh = b + 16
        ql = b + 48
        for k in range(32):
            out[qh + k] = 0
        m1 = 1
        m2 = 2
        for n in range(0, 256, 64):
            for k in range(32):
                l1 = L[n + k]
                if l1 > 15:
                    l1 -= 16
                    out[qh + k] = np.uint8(out[qh + k] | m1)
                l2 = L[n + k + 32]
                if l2 > 15:
                    l2 -= 16
                    out[qh + k] = np.uint8(out[qh + k] | m2)
                out[ql + k] = np.uint8(l1 | (l2 << 4))
            m1 <<= 2
            m2 <<= 2
            ql += 32


@numba.njit(cache=True, parallel=True)
def _q45_k(x, out, nmax, rmin, rdelta, nstep, bpb, qw, use_qw):
    """Q4_K (nmax 15, 144-byte blocks) and Q5_K (nmax 31, 176): d, dmin, 12 bytes of 6-bit scales/mins,
    [Q5_K: qh 32 bytes], 128 bytes of low nibbles."""
    nb = x.size // 256
    for i in numba.prange(nb):  # super-blocks are independent
        L = np.zeros(256, dtype=np.int64)
        aux = np.zeros(32, dtype=np.int64)
        w = np.zeros(32, dtype=np.float32)
        scales = np.zeros(8, dtype=np.float32)
        mins = np.zeros(8, dtype=np.float32)
        s0 = i * 256
        b = i * bpb
        max_scale = np.float32(0.0)
        max_min = np.float32(0.0)
        for j in range(8):
            sum_x2 = np.float32(0.0)
            for k in range(32):
                sum_x2 += x[s0 + 32 * j + k] * x[s0 + 32 * j + k]
            av_x = np.sqrt(sum_x2 / np.float32(32.0))
            for k in range(32):
                w[k] = av_x + np.abs(x[s0 + 32 * j + k])
            sc, m = _qkx2(x, s0 + 32 * j, 32, nmax, w, L, 32 * j, aux, rmin, rdelta, nstep, False)
            scales[j] = sc
            mins[j] = m
            if sc > max_scale:
                max_scale = sc
            if m > max_min:
                max_min = m
        inv_scale = np.float32(63.0) / max_scale if max_scale > 0 else np.float32(0.0)
        inv_min = np.float32(63.0) / max_min if max_min > 0 else np.float32(0.0)
        p = b + 4
        for j in range(8):
            ls = min(63, _nint(inv_scale * scales[j]) & 0xFF)
            lm = min(63, _nint(inv_min * mins[j]) & 0xFF)
            _put_scale_min_k4(j, ls, lm, out, p)
        d = put_f16(out, b, max_scale / np.float32(63.0))
        dmin = put_f16(out, b + 2, max_min / np.float32(63.0))
        _codes_q45_k(x, s0, out, b, p, d, dmin, nmax, L)


@numba.njit(cache=True, parallel=True)
def _q6_k(x, out, qw, use_qw):
    nb = x.size // 256
    for i in numba.prange(nb):  # super-blocks are independent
        L = np.zeros(256, dtype=np.int64)
        scales = np.zeros(16, dtype=np.float32)
        s0 = i * 256
        b = i * 210  # ql[128] qh[64] scales[16] d
        max_scale = np.float32(0.0)
        max_abs = np.float32(0.0)
        for ib in range(16):
            sc = _qx(x, s0 + 16 * ib, 16, 32, L, 16 * ib, qw, use_qw)
            scales[ib] = sc
            if np.abs(sc) > max_abs:
                max_abs = np.abs(sc)
                max_scale = sc
        if max_abs < EPS:
            for k in range(210):
                out[b + k] = 0
            continue
        iscale = np.float32(-128.0) / max_scale
        d = put_f16(out, b + 208, np.float32(1.0) / iscale)
        for ib in range(16):
            q = min(127, _nint(iscale * scales[ib]))
            out[b + 192 + ib] = np.uint8(q & 0xFF)
        for j in range(16):
            sc = np.int64(out[b + 192 + j])
            if sc > 127:
                sc -= 256
            dd = d * np.float32(sc)
            if dd == 0:
                continue
            _round_codes(x, s0 + 16 * j, 16, dd, np.float32(0.0), -32, 31, L, 16 * j)
        _pack_q6_codes(L, out, b)


@numba.njit(cache=True)
def _pack_q6_codes(L, out, b):
    """Q6_K codes L (0..63, level + 32) into the block at ``out[b]``: low nibbles in ql (b, 64 bytes per
    128-run: codes k and k + 64 in byte k, k + 32 and k + 96 in byte k + 32), high two bits in qh (b + 128)."""
    ql = b
    qh = b + 128
    for j in range(0, 256, 128):
        for k in range(32):
            q1 = L[j + k] & 0xF
            q2 = L[j + k + 32] & 0xF
            q3 = L[j + k + 64] & 0xF
            q4 = L[j + k + 96] & 0xF
            out[ql + k] = np.uint8(q1 | (q3 << 4))
            out[ql + k + 32] = np.uint8(q2 | (q4 << 4))
            out[qh + k] = np.uint8((L[j + k] >> 4) | ((L[j + k + 32] >> 4) << 2) | ((L[j + k + 64] >> 4) << 4)
                                   | ((L[j + k + 96] >> 4) << 6))
        ql += 64
        qh += 32


# ---- a finished block's grid and codes, and codes put back (GPTQ error feedback: mergequant.gguf.gptq_grid) ----
# Every k-quant decodes weight j of a super-block as step_j * (code_j - zero) - offset_j, with step and offset
# constant over a sub-block. Per type: (kind id, bytes per block, zero, largest code, weights per sub-block).
K_LAYOUT = {"Q2_K": (2, 84, 0, 3, 16), "Q3_K": (3, 110, 4, 7, 16), "Q4_K": (4, 144, 0, 15, 32),
            "Q5_K": (5, 176, 0, 31, 32), "Q6_K": (6, 210, 32, 63, 16)}


@numba.njit(cache=True)
def _unpack2(out, pos, L):
    """The inverse of ``_pack2``: four 2-bit planes at ``out[pos]`` into L[0:256]."""
    for j in range(0, 256, 128):
        for k in range(32):
            v = np.int64(out[pos + j // 4 + k])
            L[j + k] = v & 3
            L[j + k + 32] = (v >> 2) & 3
            L[j + k + 64] = (v >> 4) & 3
            L[j + k + 96] = (v >> 6) & 3


@numba.njit(cache=True)
def _unpack_codes(out, b, kind, L):
    """The codes of the k-quant block at ``out[b]`` into L (the inverse of the type's packer)."""
    if kind == 2:
        _unpack2(out, b + 16, L)
    elif kind == 3:
        _unpack2(out, b + 32, L)
        for j in range(256):
            if (np.int64(out[b + j % 32]) >> (j // 32)) & 1:
                L[j] += 4
    elif kind == 4:
        for n in range(4):
            for k in range(32):
                v = np.int64(out[b + 16 + 32 * n + k])
                L[64 * n + k] = v & 0xF
                L[64 * n + k + 32] = v >> 4
    elif kind == 5:
        for n in range(4):
            for k in range(32):
                v = np.int64(out[b + 48 + 32 * n + k])
                h = np.int64(out[b + 16 + k]) >> (2 * n)
                L[64 * n + k] = (v & 0xF) | ((h & 1) << 4)
                L[64 * n + k + 32] = (v >> 4) | (((h >> 1) & 1) << 4)
    else:
        for t in range(2):
            for k in range(32):
                lo1 = np.int64(out[b + 64 * t + k])
                lo2 = np.int64(out[b + 64 * t + k + 32])
                h = np.int64(out[b + 128 + 32 * t + k])
                L[128 * t + k] = (lo1 & 0xF) | ((h & 3) << 4)
                L[128 * t + k + 32] = (lo2 & 0xF) | (((h >> 2) & 3) << 4)
                L[128 * t + k + 64] = (lo1 >> 4) | (((h >> 4) & 3) << 4)
                L[128 * t + k + 96] = (lo2 >> 4) | (((h >> 6) & 3) << 4)


@numba.njit(cache=True, parallel=True)
def _grid_k(blocks, kind, bpb, step, offset, codes):
    """Per weight of the k-quant blocks ``blocks`` (uint8, blocks end to end): the step and offset of its
    sub-block (value = step * (code - zero) - offset, as the decoder computes it in float32: d * scale and
    dmin * min) and its stored code."""
    nb = blocks.size // bpb
    for i in numba.prange(nb):
        b = i * bpb
        s0 = i * 256
        _unpack_codes(blocks, b, kind, codes[s0:s0 + 256])
        if kind == 2:
            d = get_f16(blocks, b + 80)
            dmin = get_f16(blocks, b + 82)
            for j in range(16):
                sc = np.int64(blocks[b + j])
                step[s0 + 16 * j:s0 + 16 * j + 16] = d * np.float32(sc & 0xF)
                offset[s0 + 16 * j:s0 + 16 * j + 16] = dmin * np.float32(sc >> 4)
        elif kind == 3:
            d = get_f16(blocks, b + 108)
            for j in range(16):
                step[s0 + 16 * j:s0 + 16 * j + 16] = d * np.float32(_q3_scale(blocks, b, j))
                offset[s0 + 16 * j:s0 + 16 * j + 16] = 0
        elif kind == 4 or kind == 5:
            d = get_f16(blocks, b)
            dmin = get_f16(blocks, b + 2)
            for j in range(8):
                sc, m = _scale_min_k4(j, blocks, b + 4)
                step[s0 + 32 * j:s0 + 32 * j + 32] = d * np.float32(sc)
                offset[s0 + 32 * j:s0 + 32 * j + 32] = dmin * np.float32(m)
        else:
            d = get_f16(blocks, b + 208)
            for j in range(16):
                sc = np.int64(blocks[b + 192 + j])
                if sc > 127:
                    sc -= 256
                step[s0 + 16 * j:s0 + 16 * j + 16] = d * np.float32(sc)
                offset[s0 + 16 * j:s0 + 16 * j + 16] = 0


@numba.njit(cache=True, parallel=True)
def _put_codes_k(blocks, kind, bpb, codes):
    """Write ``codes`` (256 per block) into the k-quant blocks, leaving their scales untouched."""
    nb = blocks.size // bpb
    for i in numba.prange(nb):
        b = i * bpb
        L = codes[i * 256:(i + 1) * 256].copy()  # the Q3_K packer consumes its codes
        if kind == 2:
            _pack2(L, blocks, b + 16)
        elif kind == 3:
            _pack_q3_codes(L, blocks, b)
        elif kind == 4:
            _pack_q45_codes(L, blocks, b, 15)
        elif kind == 5:
            _pack_q45_codes(L, blocks, b, 31)
        else:
            _pack_q6_codes(L, blocks, b)


def block_grid(blocks: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(step, offset, codes) per weight of finished ``qtype`` blocks ``blocks`` (uint8 [rows, row_bytes]), each
    [rows, row_bytes / bpb * 256]: weight = step * (code - zero) - offset with ``K_LAYOUT[qtype]``'s zero. The
    grid a GPTQ column loop rounds on (``mergequant.gguf.gptq_grid``)."""
    kind, bpb = K_LAYOUT[qtype][:2]
    flat = np.ascontiguousarray(blocks).reshape(-1)
    n = flat.size // bpb * 256
    step, offset = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
    codes = np.empty(n, dtype=np.int64)
    _grid_k(flat, kind, bpb, step, offset, codes)
    shape = (blocks.shape[0], -1)
    return step.reshape(shape), offset.reshape(shape), codes.reshape(shape)


def put_codes(blocks: np.ndarray, qtype: str, codes: np.ndarray) -> None:
    """Write ``codes`` (int [rows, weights]) into the ``qtype`` blocks ``blocks`` (uint8 [rows, row_bytes], C
    order, modified in place); their scales are kept."""
    kind, bpb = K_LAYOUT[qtype][:2]
    if not blocks.flags.c_contiguous:
        raise ValueError("blocks must be C-contiguous (written in place)")
    _put_codes_k(blocks.reshape(-1), kind, bpb, np.ascontiguousarray(codes, dtype=np.int64).reshape(-1))


_NO_W = np.zeros(1, dtype=np.float32)


def quantize_k(flat: np.ndarray, out: np.ndarray, qtype: str, cols: int, imatrix: np.ndarray | None = None) -> None:
    """Quantize ``flat`` (float32, rows of ``cols`` end to end) into ``out`` as k-quant ``qtype``."""
    if imatrix is not None:
        from mergequant.gguf.imatrix import quantize_k_weighted

        quantize_k_weighted(flat, out, qtype, cols, imatrix)
        return
    if qtype == "Q2_K":
        _q2_k(flat, out, _NO_W, False)
    elif qtype == "Q3_K":
        _q3_k(flat, out, _NO_W, False)
    elif qtype == "Q4_K":
        _q45_k(flat, out, 15, np.float32(-1.0), np.float32(0.1), 20, 144, _NO_W, False)
    elif qtype == "Q5_K":
        _q45_k(flat, out, 31, np.float32(-0.5), np.float32(0.1), 15, 176, _NO_W, False)
    elif qtype == "Q6_K":
        _q6_k(flat, out, _NO_W, False)
    else:
        raise ValueError(f"not a k-quant type: {qtype}")
