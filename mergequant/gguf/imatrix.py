"""Importance-weighted k-quants (``--calib``): llama.cpp's "imatrix" search, our implementation.

The importance of input column c is the mean over calibration tokens of x_c^2 (what llama.cpp's
``llama-imatrix`` stores; ``mergequant.gguf.driver.collect_imatrix`` gets it from our own layer runner).
With it, every k-quant's search weighs each weight's squared error by ``imatrix[c] * sqrt(sigma^2 +
w^2)`` (sigma^2: the super-block's mean square), searches the sub-block scales more finely (37 trial
scales, ``_qkx2`` with rmin -0.9, step 0.05) and quantizes the sub-block scales themselves with a
weighted search (``_qp``) instead of plain rounding: the scheme of llama.cpp's ``quantize_row_*_impl``
(ggml-quants.c), re-expressed here. Q6_K weighs by the importance alone; Q4_0, Q4_1, Q5_0 and Q5_1 use
the row's mean square for sigma^2 and the same weighted searches per 32-weight block. Q8_0 ignores it.
"""

from __future__ import annotations

import numba
import numpy as np

from mergequant.gguf.blocks import put_f16
from mergequant.gguf.kquants import EPS, _nint, _pack2, _q6_k, _qkx2, _qx, _scale_min_k4


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
def _sigma2(x, s0, factor):
    sx2 = np.float32(0.0)
    for k in range(256):
        sx2 += x[s0 + k] * x[s0 + k]
    return np.float32(factor) * sx2 / np.float32(256.0)


@numba.njit(cache=True, parallel=True)
def _q45_k_w(x, out, nmax, bpb, qw):
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
        s0 = i * 256
        b = i * bpb
        sigma2 = _sigma2(x, s0, 2.0)
        for j in range(8):
            sumw = np.float32(0.0)
            for k in range(32):
                xi = x[s0 + 32 * j + k]
                w[k] = qw[s0 + 32 * j + k] * np.sqrt(sigma2 + xi * xi)
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
            if j < 4:
                out[p + j] = np.uint8(ls & 0xFF)
                out[p + j + 4] = np.uint8(lm & 0xFF)
            else:
                out[p + j + 4] = np.uint8(((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF)
                out[p + j - 4] = np.uint8((out[p + j - 4] | ((ls >> 4) << 6)) & 0xFF)
                out[p + j] = np.uint8((out[p + j] | ((lm >> 4) << 6)) & 0xFF)
        d = put_f16(out, b, d_block)
        dmin = put_f16(out, b + 2, m_block)
        for j in range(8):
            sc, m = _scale_min_k4(j, out, p)
            dd = d * np.float32(sc)
            if dd == 0:
                continue
            dm = dmin * np.float32(m)
            for k in range(32):
                q = _nint((x[s0 + 32 * j + k] + dm) / dd)
                L[32 * j + k] = max(0, min(nmax, q))
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
def _q3_k_w(x, out, qw):
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
        for k in range(12):
            out[b + 96 + k] = 0
        d_block = _qx(scales, 0, 16, 32, Ls, 0, sw, True)
        for j in range(16):
            q = Ls[j]
            if j < 8:
                out[b + 96 + j] = np.uint8(q & 0xF)
            else:
                out[b + 96 + j - 8] = np.uint8(out[b + 96 + j - 8] | ((q & 0xF) << 4))
            q >>= 4
            out[b + 96 + 8 + j % 4] = np.uint8((out[b + 96 + 8 + j % 4] | (q << (2 * (j // 4)))) & 0xFF)
        d = put_f16(out, b + 108, d_block)
        for j in range(16):
            if j < 8:
                sc = np.int64(out[b + 96 + j]) & 0xF
            else:
                sc = np.int64(out[b + 96 + j - 8]) >> 4
            sc = (sc | (((np.int64(out[b + 96 + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
            dd = d * np.float32(sc)
            if dd == 0:
                continue
            for k in range(16):
                q = _nint(x[s0 + 16 * j + k] / dd)
                L[16 * j + k] = max(-4, min(3, q)) + 4
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
def _q2_k_w(x, out, qw):
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
        s0 = i * 256
        b = i * 84
        sigma2 = _sigma2(x, s0, 1.0)
        for j in range(16):
            sw[j] = np.float32(0.0)
            for k in range(16):
                xi = x[s0 + 16 * j + k]
                w[k] = qw[s0 + 16 * j + k] * np.sqrt(sigma2 + xi * xi)
            for k in range(16):
                sw[j] += w[k]
            sc, m = _qkx2(x, s0 + 16 * j, 16, 3, w, L, 16 * j, aux, np.float32(-0.9), np.float32(0.05), 36, False)
            scales[j] = sc
            mins[j] = m
        dm = _qp(scales, 16, 15, Ls, sw)
        mm = _qp(mins, 16, 15, Lm, sw)
        dm = put_f16(out, b + 80, dm)
        mm = put_f16(out, b + 82, mm)
        for j in range(16):
            out[b + j] = np.uint8((Ls[j] | (Lm[j] << 4)) & 0xFF)
        for j in range(16):
            sc = np.int64(out[b + j])
            dd = dm * np.float32(sc & 0xF)
            if dd == 0:
                continue
            mmj = mm * np.float32(sc >> 4)
            for k in range(16):
                q = _nint((x[s0 + 16 * j + k] + mmj) / dd)
                L[16 * j + k] = max(0, min(3, q))
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


def quantize_k_weighted(flat: np.ndarray, out: np.ndarray, qtype: str, cols: int, imatrix: np.ndarray) -> None:
    """``flat`` (rows of ``cols`` end to end) as k-quant ``qtype`` with per-column importance ``imatrix``."""
    im = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    if im.size != cols:
        raise ValueError(f"importance matrix has {im.size} entries for rows of {cols}")
    qw = np.tile(im, flat.size // cols)
    if qtype == "Q2_K":
        _q2_k_w(flat, out, qw)
    elif qtype == "Q3_K":
        _q3_k_w(flat, out, qw)
    elif qtype == "Q4_K":
        _q45_k_w(flat, out, 15, 144, qw)
    elif qtype == "Q5_K":
        _q45_k_w(flat, out, 31, 176, qw)
    elif qtype == "Q6_K":
        _q6_k(flat, out, qw, True)
    elif qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        _classic_w(flat, out, ("Q4_0", "Q4_1", "Q5_0", "Q5_1").index(qtype), cols, qw)
    else:
        raise ValueError(f"not a k-quant type: {qtype}")
