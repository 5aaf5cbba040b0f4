"""Importance-weighted k-quants (``--calib``): llama.cpp's "imatrix" search, our implementation.

The importance of input column c is the mean over calibration tokens of x_c^2 (what llama.cpp's
``llama-imatrix`` stores; ``mergequant.gguf.driver.collect_imatrix`` gets it from our own layer runner).
With it, every k-quant's search weighs each weight's squared error by ``imatrix[c] * sqrt(sigma^2 +
w^2)`` (sigma^2: the super-block's mean square), searches the sub-block scales more finely (37 trial
scales, ``_qkx2`` with rmin -0.9, step 0.05) and quantizes the sub-block scales themselves with a
weighted search (``_qp``) instead of plain rounding: the scheme of llama.cpp's ``quantize_row_*_impl``
(ggml-quants.c), re-expressed here. Q6_K weighs by the importance alone; Q4_0, Q4_1, Q5_0 and Q5_1 use
the row's mean square for sigma^2 and the same weighted searches per 32-weight block. Q8_0 ignores it.
With the same matrix the bytes equal llama.cpp's quantizer's (tests/test_gguf_llama_cpp.py).

Opt-in (``MERGEQUANT_GGUF_REFINE=1``, off by default so the equality above holds): after that search,
``_refine_affine`` (Q2_K, Q4_K, Q5_K) and ``_refine_sym`` (Q3_K) lower the same weighted error further
per super-block -- each sub-block's integer scale (and min) moves to the best neighbouring value with
its levels re-rounded, then the half-precision super-block scale(s) are refitted by weighted least
squares; steps are kept only when the error falls. Measured in bench/gguf_bench.py (docs/benchmarks.md).
"""

from __future__ import annotations

import os

import numba
import numpy as np

from mergequant.gguf.blocks import f16_to_f32, f32_to_f16, put_f16
from mergequant.gguf.kquants import (EPS, _codes_q3_k, _codes_q45_k, _nint, _pack2, _put_q3_scales, _put_scale_min_k4,
                                     _q6_k, _qkx2, _qx, _round_codes, _scale_min_k4)


@numba.njit(cache=True)
def _qp(x, n, nmax, L, qw):
    """Non-negative levels in [0, nmax] for x[0:n] weighted by qw (make_qp_quants); returns the scale."""
    mx = np.float32(0.0)
    for i in range(n):
        if x[i] > mx:
            mx = x[i]
    if mx < EPS:
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    fn = np.float32(nmax)
    iscale = fn / mx
    for i in range(n):
        L[i] = _nint(iscale * x[i]) & 0xFF
    scale = np.float32(1.0) / iscale
    best = np.float32(0.0)
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        best += qw[i] * diff * diff
    for t in range(-4, 5):
        if t == 0:
            continue
        isc = (np.float32(0.1) * np.float32(t) + fn) / mx
        sc = np.float32(1.0) / isc
        mse = np.float32(0.0)
        for i in range(n):
            q = min(nmax, _nint(isc * x[i]))
            diff = x[i] - sc * np.float32(q)
            mse += qw[i] * diff * diff
        if mse < best:
            best = mse
            iscale = isc
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        q = min(nmax, _nint(iscale * x[i]))
        L[i] = q & 0xFF
        fl = np.float32(L[i])
        sumlx += qw[i] * x[i] * fl
        suml2 += qw[i] * fl * fl
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = qw[i]
            li = np.float32(L[i])
            slx = sumlx - w * x[i] * li
            sl2 = suml2 - w * li * li
            if slx > 0 and sl2 > 0:
                nl = min(nmax, _nint(x[i] * sl2 / slx))
                if nl != L[i]:
                    fnl = np.float32(nl)
                    slx += w * x[i] * fnl
                    sl2 += w * fnl * fnl
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = nl & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else np.float32(0.0)



@numba.njit(cache=True)
def _f16r(v):
    """``v`` rounded to half precision (what the file stores), as float32."""
    return f16_to_f32(f32_to_f16(v))


@numba.njit(cache=True)
def _err_affine(x, s0, W, j, sl, nmax, dd, dm, L, write):
    """Weighted squared error of sub-block j (``sl`` weights) dequantized as dd * q - dm, q rounded to nearest
    in [0, nmax]; with ``write`` the levels go to L."""
    e = np.float32(0.0)
    for k in range(sl):
        xi = x[s0 + sl * j + k]
        q = 0
        if dd != 0:
            q = max(0, min(nmax, _nint((xi + dm) / dd)))
        if write:
            L[sl * j + k] = q
        diff = dd * np.float32(q) - dm - xi
        e += W[sl * j + k] * diff * diff
    return e


@numba.njit(cache=True)
def _refine_affine(x, s0, W, nsub, sl, nmax, lmax, Ls, Lm, d, dmin, L):
    """Refinement of an affine k-quant super-block (Q2_K, Q4_K, Q5_K) after llama.cpp's search, on the same
    weighted objective: (1) each sub-block's integer scale and min move to the best of their +-1
    neighbours (levels re-rounded); (2) the super-block's d and dmin are refitted by weighted least squares
    to the chosen integer scales, mins and levels (then half-rounded). Repeated while the total error falls;
    a step is kept only if it lowers the error, so the result is never worse than the search's."""
    tot = np.float32(0.0)
    for j in range(nsub):
        tot += _err_affine(x, s0, W, j, sl, nmax, d * np.float32(Ls[j]), dmin * np.float32(Lm[j]), L, True)
    for _ in range(4):
        new_tot = np.float32(0.0)
        for j in range(nsub):
            b0, b1 = Ls[j], Lm[j]
            best = _err_affine(x, s0, W, j, sl, nmax, d * np.float32(b0), dmin * np.float32(b1), L, False)
            for a in range(max(0, Ls[j] - 1), min(lmax, Ls[j] + 1) + 1):
                for c in range(max(0, Lm[j] - 1), min(lmax, Lm[j] + 1) + 1):
                    e = _err_affine(x, s0, W, j, sl, nmax, d * np.float32(a), dmin * np.float32(c), L, False)
                    if e < best:
                        best, b0, b1 = e, a, c
            Ls[j], Lm[j] = b0, b1
            new_tot += _err_affine(x, s0, W, j, sl, nmax, d * np.float32(b0), dmin * np.float32(b1), L, True)
        # x ~ d * A - m * B with A = ls * q, B = lm: 2 x 2 weighted least squares
        saa = np.float32(0.0)
        sab = np.float32(0.0)
        sbb = np.float32(0.0)
        sxa = np.float32(0.0)
        sxb = np.float32(0.0)
        for j in range(nsub):
            for k in range(sl):
                w = W[sl * j + k]
                a = np.float32(Ls[j] * L[sl * j + k])
                bb = np.float32(Lm[j])
                xi = x[s0 + sl * j + k]
                saa += w * a * a
                sab += w * a * bb
                sbb += w * bb * bb
                sxa += w * xi * a
                sxb += w * xi * bb
        det = saa * sbb - sab * sab
        improved = new_tot < tot
        tot = min(tot, new_tot)
        if det > 0:
            nd = _f16r((sxa * sbb - sxb * sab) / det)
            nm = _f16r((sxa * sab - sxb * saa) / det)
            if nd > 0 and nm >= 0:
                t2 = np.float32(0.0)
                for j in range(nsub):
                    t2 += _err_affine(x, s0, W, j, sl, nmax, nd * np.float32(Ls[j]), nm * np.float32(Lm[j]), L, False)
                if t2 < tot:
                    d, dmin, tot, improved = nd, nm, t2, True
        if not improved:
            break
    for j in range(nsub):
        _err_affine(x, s0, W, j, sl, nmax, d * np.float32(Ls[j]), dmin * np.float32(Lm[j]), L, True)
    return d, dmin


@numba.njit(cache=True)
def _err_sym(x, s0, W, j, dd, L, write):
    """Q3_K sub-block j (16 weights) as dd * q, q in [-4, 3] (stored + 4 in L with ``write``)."""
    e = np.float32(0.0)
    for k in range(16):
        xi = x[s0 + 16 * j + k]
        q = 0
        if dd != 0:
            q = max(-4, min(3, _nint(xi / dd)))
        if write:
            L[16 * j + k] = q + 4
        diff = dd * np.float32(q) - xi
        e += W[16 * j + k] * diff * diff
    return e


@numba.njit(cache=True)
def _refine_sym(x, s0, W, Ls, d, L):
    """Q3_K's version of _refine_affine: signed 6-bit sub-block scales Ls in [-32, 31] move to the best of
    +-2, then d is refitted by weighted least squares; kept only while the weighted error falls."""
    tot = np.float32(0.0)
    for j in range(16):
        tot += _err_sym(x, s0, W, j, d * np.float32(Ls[j]), L, True)
    for _ in range(4):
        new_tot = np.float32(0.0)
        for j in range(16):
            b0 = Ls[j]
            best = _err_sym(x, s0, W, j, d * np.float32(b0), L, False)
            for a in range(max(-32, Ls[j] - 2), min(31, Ls[j] + 2) + 1):
                e = _err_sym(x, s0, W, j, d * np.float32(a), L, False)
                if e < best:
                    best, b0 = e, a
            Ls[j] = b0
            new_tot += _err_sym(x, s0, W, j, d * np.float32(b0), L, True)
        improved = new_tot < tot
        tot = min(tot, new_tot)
        sxa = np.float32(0.0)
        saa = np.float32(0.0)
        for j in range(16):
            for k in range(16):
                a = np.float32(Ls[j] * (L[16 * j + k] - 4))
                sxa += W[16 * j + k] * x[s0 + 16 * j + k] * a
                saa += W[16 * j + k] * a * a
        if saa > 0:
            nd = _f16r(sxa / saa)
            if nd != 0:
                t2 = np.float32(0.0)
                for j in range(16):
                    t2 += _err_sym(x, s0, W, j, nd * np.float32(Ls[j]), L, False)
                if t2 < tot:
                    d, tot, improved = nd, t2, True
        if not improved:
            break
    for j in range(16):
        _err_sym(x, s0, W, j, d * np.float32(Ls[j]), L, True)
    return d


@numba.njit(cache=True)
def _sigma2(x, s0, factor):
    sx2 = np.float32(0.0)
    for k in range(256):
        sx2 += x[s0 + k] * x[s0 + k]
    return np.float32(factor) * sx2 / np.float32(256.0)


@numba.njit(cache=True, parallel=True)
def _q45_k_w(x, out, nmax, bpb, qw, refine):
    nb = x.size // 256
    for i in numba.prange(nb):  # super-blocks are independent
        L = np.zeros(256, dtype=np.int64)
        aux = np.zeros(32, dtype=np.int64)
        w = np.zeros(32, dtype=np.float32)
        sw = np.zeros(8, dtype=np.float32)
        scales = np.zeros(8, dtype=np.float32)
        mins = np.zeros(8, dtype=np.float32)
        Ls = np.zeros(8, dtype=np.int64)
        Lm = np.zeros(8, dtype=np.int64)
        Wf = np.zeros(256, dtype=np.float32)
        s0 = i * 256
        b = i * bpb
        sigma2 = _sigma2(x, s0, 2.0)
        for j in range(8):
            sumw = np.float32(0.0)
            for k in range(32):
                xi = x[s0 + 32 * j + k]
                w[k] = qw[s0 + 32 * j + k] * np.sqrt(sigma2 + xi * xi)
                Wf[32 * j + k] = w[k]
            for k in range(32):
                sumw += w[k]
            sw[j] = sumw
            sc, m = _qkx2(x, s0 + 32 * j, 32, nmax, w, L, 32 * j, aux, np.float32(-0.9), np.float32(0.05), 36, False)
            scales[j] = sc
            mins[j] = m
        d_block = _qp(scales, 8, 63, Ls, sw)
        m_block = _qp(mins, 8, 63, Lm, sw)
        p = b + 4
        for j in range(8):
            ls = Ls[j] if nmax == 15 else min(63, Ls[j])
            lm = Lm[j] if nmax == 15 else min(63, Lm[j])
            _put_scale_min_k4(j, ls, lm, out, p)
        d = put_f16(out, b, d_block)
        dmin = put_f16(out, b + 2, m_block)
        if refine:
            for j in range(8):
                Ls[j], Lm[j] = _scale_min_k4(j, out, p)
            d, dmin = _refine_affine(x, s0, Wf, 8, 32, nmax, 63, Ls, Lm, d, dmin, L)
            for j in range(8):
                _put_scale_min_k4(j, Ls[j], Lm[j], out, p)
            d = put_f16(out, b, d)
            dmin = put_f16(out, b + 2, dmin)
        _codes_q45_k(x, s0, out, b, p, d, dmin, nmax, L)


@numba.njit(cache=True, parallel=True)
def _q3_k_w(x, out, qw, refine):
    nb = x.size // 256
    for i in numba.prange(nb):  # super-blocks are independent
        L = np.zeros(256, dtype=np.int64)
        W = np.zeros(256, dtype=np.float32)
        sw = np.zeros(16, dtype=np.float32)
        scales = np.zeros(16, dtype=np.float32)
        Ls = np.zeros(16, dtype=np.int64)
        s0 = i * 256
        b = i * 110
        sigma2 = _sigma2(x, s0, 2.0)
        for j in range(16):
            sumw = np.float32(0.0)
            for k in range(16):
                xi = x[s0 + 16 * j + k]
                W[16 * j + k] = qw[s0 + 16 * j + k] * np.sqrt(sigma2 + xi * xi)
            for k in range(16):
                sumw += W[16 * j + k]
            sw[j] = sumw
            # weights for this sub-block live at the same offsets as its values in a 256-scratch copy
            scales[j] = _qx_local(x, s0 + 16 * j, W, 16 * j, 4, L)
        d_block = _qx(scales, 0, 16, 32, Ls, 0, sw, True)
        _put_q3_scales(Ls, out, b)  # _qx stores levels + 32, as the block does
        d = put_f16(out, b + 108, d_block)
        if refine:
            for j in range(16):
                Ls[j] = max(-32, min(31, Ls[j] - 32))
            d = put_f16(out, b + 108, _refine_sym(x, s0, W, Ls, d, L))
            for j in range(16):
                Ls[j] += 32
            _put_q3_scales(Ls, out, b)
        _codes_q3_k(x, s0, out, b, d, L)


@numba.njit(cache=True)
def _qx_local(x, s, W, lo, nmax, L):
    """_qx on x[s:s+16] with weights W[lo:lo+16] (sub-block-local weights), levels into L[lo:lo+16]."""
    xs = np.empty(16, dtype=np.float32)
    ws = np.empty(16, dtype=np.float32)
    Lt = np.zeros(16, dtype=np.int64)
    for k in range(16):
        xs[k] = x[s + k]
        ws[k] = W[lo + k]
    sc = _qx(xs, 0, 16, nmax, Lt, 0, ws, True)
    for k in range(16):
        L[lo + k] = Lt[k]
    return sc


@numba.njit(cache=True, parallel=True)
def _q2_k_w(x, out, qw, refine):
    nb = x.size // 256
    for i in numba.prange(nb):  # super-blocks are independent
        L = np.zeros(256, dtype=np.int64)
        aux = np.zeros(16, dtype=np.int64)
        w = np.zeros(16, dtype=np.float32)
        sw = np.zeros(16, dtype=np.float32)
        scales = np.zeros(16, dtype=np.float32)
        mins = np.zeros(16, dtype=np.float32)
        Ls = np.zeros(16, dtype=np.int64)
        Lm = np.zeros(16, dtype=np.int64)
        Wf = np.zeros(256, dtype=np.float32)
        s0 = i * 256
        b = i * 84
        sigma2 = _sigma2(x, s0, 1.0)
        for j in range(16):
            sw[j] = np.float32(0.0)
            for k in range(16):
                xi = x[s0 + 16 * j + k]
                w[k] = qw[s0 + 16 * j + k] * np.sqrt(sigma2 + xi * xi)
                Wf[16 * j + k] = w[k]
            for k in range(16):
                sw[j] += w[k]
            sc, m = _qkx2(x, s0 + 16 * j, 16, 3, w, L, 16 * j, aux, np.float32(-0.9), np.float32(0.05), 36, False)
            scales[j] = sc
            mins[j] = m
        dm = _qp(scales, 16, 15, Ls, sw)
        mm = _qp(mins, 16, 15, Lm, sw)
        dm = put_f16(out, b + 80, dm)
        mm = put_f16(out, b + 82, mm)
        if refine:
            dm, mm = _refine_affine(x, s0, Wf, 16, 16, 3, 15, Ls, Lm, dm, mm, L)
            dm = put_f16(out, b + 80, dm)
            mm = put_f16(out, b + 82, mm)
        for j in range(16):
            out[b + j] = np.uint8((Ls[j] | (Lm[j] << 4)) & 0xFF)
        for j in range(16):
            sc = np.int64(out[b + j])
            dd = dm * np.float32(sc & 0xF)
            if dd == 0:
                continue
            _round_codes(x, s0 + 16 * j, 16, dd, mm * np.float32(sc >> 4), 0, 3, L, 16 * j)
        _pack2(L, out, b + 16)


@numba.njit(cache=True)
def _classic_w(x, out, kind, cols, qw):
    """Q4_0 (kind 0), Q4_1 (1), Q5_0 (2), Q5_1 (3) with importance weights qw (aligned with x): weights
    qw * sqrt(sigma^2 + x^2) with sigma^2 the row's mean square, then the weighted symmetric search (_0)
    or the weighted (scale, min) search (_1)."""
    bpb = (18, 20, 22, 24)[kind]
    nmax = (8, 15, 16, 31)[kind]
    rows = x.size // cols
    W = np.empty(x.size, dtype=np.float32)
    w = np.zeros(32, dtype=np.float32)
    L = np.zeros(32, dtype=np.int64)
    aux = np.zeros(32, dtype=np.int64)
    for r in range(rows):
        s0 = r * cols
        sx2 = np.float32(0.0)
        for j in range(cols):
            sx2 += x[s0 + j] * x[s0 + j]
        sigma2 = sx2 / np.float32(cols)
        for j in range(cols):
            W[s0 + j] = qw[s0 + j] * np.sqrt(sigma2 + x[s0 + j] * x[s0 + j])
        for ib in range(cols // 32):
            s = s0 + 32 * ib
            b = (s // 32) * bpb
            if kind == 0 or kind == 2:
                d = _qx(x, s, 32, nmax, L, 0, W, True)
                put_f16(out, b, d)
                q0 = 2
            else:
                for k in range(32):
                    w[k] = W[s + k]
                d, the_min = _qkx2(x, s, 32, nmax, w, L, 0, aux, np.float32(-0.9), np.float32(0.05), 36, False)
                put_f16(out, b, d)
                put_f16(out, b + 2, -the_min)
                q0 = 4
            if kind >= 2:
                qh = 0
                for j in range(16):
                    qh |= ((L[j] & 0x10) >> 4) << j
                    qh |= ((L[j + 16] & 0x10) >> 4) << (j + 16)
                for k in range(4):
                    out[b + q0 + k] = np.uint8((qh >> (8 * k)) & 0xFF)
                q0 += 4
            for j in range(16):
                out[b + q0 + j] = np.uint8(((L[j] & 0xF) | ((L[j + 16] & 0xF) << 4)) & 0xFF)


# Opt-in refinement of the importance-weighted Q2_K/Q3_K/Q4_K/Q5_K search (see _refine_affine, _refine_sym):
# off by default, so that --calib files stay equal to llama.cpp's quantizer handed the same matrix
# (tests/test_gguf_llama_cpp.py); MERGEQUANT_GGUF_REFINE=1 turns it on (bench/gguf_bench.py measures both).
REFINE = os.environ.get("MERGEQUANT_GGUF_REFINE", "") == "1"


def quantize_k_weighted(flat: np.ndarray, out: np.ndarray, qtype: str, cols: int, imatrix: np.ndarray,
                        refine: bool | None = None) -> None:
    """``flat`` (rows of ``cols`` end to end) as k-quant ``qtype`` with per-column importance ``imatrix``;
    ``refine`` (default: the module's REFINE) adds the refinement pass after llama.cpp's search."""
    refine = REFINE if refine is None else bool(refine)
    im = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    if im.size != cols:
        raise ValueError(f"importance matrix has {im.size} entries for rows of {cols}")
    qw = np.tile(im, flat.size // cols)
    if qtype == "Q2_K":
        _q2_k_w(flat, out, qw, refine)
    elif qtype == "Q3_K":
        _q3_k_w(flat, out, qw, refine)
    elif qtype == "Q4_K":
        _q45_k_w(flat, out, 15, 144, qw, refine)
    elif qtype == "Q5_K":
        _q45_k_w(flat, out, 31, 176, qw, refine)
    elif qtype == "Q6_K":
        _q6_k(flat, out, qw, True)
    elif qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        _classic_w(flat, out, ("Q4_0", "Q4_1", "Q5_0", "Q5_1").index(qtype), cols, qw)
    else:
        raise ValueError(f"not a k-quant type: {qtype}")
