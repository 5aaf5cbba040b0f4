"""GGUF block formats, the classic ones: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Each quantizer takes float32 values (a flat array whose length is a multiple of the block size,
rows laid end to end) and returns the packed bytes of the blocks, as llama.cpp stores them
(``ggml-common.h`` layouts, little-endian). The rounding is the one of llama.cpp's reference
quantizers (``quantize_row_*_ref`` in ggml-quants.c), reproduced operation by operation in float32
(numba, no fast-math, no fused multiply-add), so the bytes are identical to llama.cpp's own output:
``tests/test_gguf.py`` checks that against gguf-py's numpy ports and, with llama.cpp installed,
against ``llama_model_quantize``.

Layouts (bytes per block of 32 weights): Q8_0 = d f16 + 32 int8 (34); Q4_0 = d + 16 nibbles (18);
Q4_1 = d, m + 16 (20); Q5_0 = d + qh u32 + 16 (22); Q5_1 = d, m + qh + 16 (24). The low nibble of
byte j holds weight j, the high nibble weight j + 16; bit j of qh the fifth bit of weight j.
"""

from __future__ import annotations

import numba
import numpy as np

F32 = np.float32

# block size (weights), bytes per block
BLOCK = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20),
         "Q5_0": (32, 22), "Q5_1": (32, 24), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
         "Q5_K": (256, 176), "Q6_K": (256, 210)}


def row_bytes(qtype: str, n: int) -> int:
    """Bytes of one row of ``n`` weights in ``qtype`` (``n`` a multiple of the block size)."""
    bs, nb = BLOCK[qtype]
    return n // bs * nb


# ---- half precision, as ggml converts (round to nearest even; NaN -> 0x7E00) ---------------------------

@numba.njit(cache=True)
def f32_to_f16(f):
    u = np.float32(f).view(np.uint32)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):
        return np.uint16(sign | np.uint32(0x7E00))
    if a >= np.uint32(0x477FF000):  # >= 65520 rounds to infinity
        return np.uint16(sign | np.uint32(0x7C00))
    if a < np.uint32(0x38800000):  # below the smallest normal half: a multiple of 2^-24
        fa = np.uint32(a).view(np.float32)
        return np.uint16(sign | np.uint32(np.rint(fa * np.float32(16777216.0))))
    h = ((a >> np.uint32(23)) - np.uint32(112)) << np.uint32(10) | ((a >> np.uint32(13)) & np.uint32(0x3FF))
    rem = a & np.uint32(0x1FFF)
    if rem > np.uint32(0x1000) or (rem == np.uint32(0x1000) and (h & np.uint32(1))):
        h += np.uint32(1)
    return np.uint16(sign | h)


@numba.njit(cache=True)
def f16_to_f32(h):
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == 0:
        v = np.float32(m) * np.float32(5.9604644775390625e-08)  # exact: m * 2^-24
        return v if sign == 0 else -v
    if e == 31:
        return np.uint32(sign | np.uint32(0x7F800000) | (m << np.uint32(13))).view(np.float32)
    return np.uint32(sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13))).view(np.float32)


@numba.njit(cache=True)
def put_f16(out, pos, f):
    """Store ``f`` as a little-endian half at ``out[pos]``; returns the half's value as float32."""
    h = f32_to_f16(f)
    out[pos] = np.uint8(h & np.uint16(0xFF))
    out[pos + 1] = np.uint8(h >> np.uint16(8))
    return f16_to_f32(h)


@numba.njit(cache=True)
def get_f16(out, pos):
    """The little-endian half at ``out[pos]`` as float32 (the inverse of ``put_f16``)."""
    return f16_to_f32(np.uint16(out[pos]) | (np.uint16(out[pos + 1]) << np.uint16(8)))


def to_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 (numpy's conversion is round-to-nearest-even, like ggml's)."""
    return np.asarray(x, dtype=np.float32).astype(np.float16)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16): round to nearest even, NaN forced quiet (ggml_compute_fp32_to_bf16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) & 0xFFFF
    r = np.where(nan, ((u >> 16) | 64) & 0xFFFF, r)
    return r.astype(np.uint16)


# ---- rounding helpers ----------------------------------------------------------------------------------

@numba.njit(cache=True)
def _trunc_int(v):
    """C's float -> integer conversion (toward zero)."""
    return np.int64(np.trunc(v))


@numba.njit(cache=True)
def _roundf(v):
    """C's roundf: halves away from zero."""
    t = np.trunc(v)
    if np.abs(v - t) >= np.float32(0.5):
        t += np.float32(1.0) if v > 0 else np.float32(-1.0)
    return t


# ---- the 32-weight block formats ----------------------------------------------------------------------

@numba.njit(cache=True)
def _q8_0(x, out):
    nb = x.size // 32
    for i in range(nb):
        b = i * 34
        amax = np.float32(0.0)
        for j in range(32):
            v = np.abs(x[i * 32 + j])
            if v > amax:
                amax = v
        d = amax / np.float32(127.0)
        idv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        put_f16(out, b, d)
        for j in range(32):
            q = np.int64(_roundf(x[i * 32 + j] * idv))
            out[b + 2 + j] = np.uint8(q & 0xFF)


@numba.njit(cache=True)
def _absmax_signed(x, start, n):
    amax = np.float32(0.0)
    mx = np.float32(0.0)
    for j in range(n):
        v = x[start + j]
        if amax < np.abs(v):
            amax = np.abs(v)
            mx = v
    return mx


@numba.njit(cache=True)
def _minmax(x, start, n):
    mn = np.float32(3.4028234663852886e38)
    mx = np.float32(-3.4028234663852886e38)
    for j in range(n):
        v = x[start + j]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    return mn, mx


@numba.njit(cache=True)
def _q4_0(x, out):
    nb = x.size // 32
    for i in range(nb):
        b = i * 18
        mx = _absmax_signed(x, i * 32, 32)
        d = mx / np.float32(-8.0)
        idv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        put_f16(out, b, d)
        for j in range(16):
            q0 = min(15, _trunc_int(x[i * 32 + j] * idv + np.float32(8.5)))
            q1 = min(15, _trunc_int(x[i * 32 + 16 + j] * idv + np.float32(8.5)))
            out[b + 2 + j] = np.uint8((q0 | (q1 << 4)) & 0xFF)


@numba.njit(cache=True)
def _q4_1(x, out):
    nb = x.size // 32
    for i in range(nb):
        b = i * 20
        mn, mx = _minmax(x, i * 32, 32)
        d = (mx - mn) / np.float32(15.0)
        idv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        put_f16(out, b, d)
        put_f16(out, b + 2, mn)
        for j in range(16):
            q0 = min(15, _trunc_int((x[i * 32 + j] - mn) * idv + np.float32(0.5)))
            q1 = min(15, _trunc_int((x[i * 32 + 16 + j] - mn) * idv + np.float32(0.5)))
            out[b + 4 + j] = np.uint8((q0 | (q1 << 4)) & 0xFF)


@numba.njit(cache=True)
def _put_u32(out, pos, v):
    for k in range(4):
        out[pos + k] = np.uint8((v >> (8 * k)) & 0xFF)


@numba.njit(cache=True)
def _q5_0(x, out):
    nb = x.size // 32
    for i in range(nb):
        b = i * 22
        mx = _absmax_signed(x, i * 32, 32)
        d = mx / np.float32(-16.0)
        idv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        put_f16(out, b, d)
        qh = 0
        for j in range(16):
            q0 = min(31, _trunc_int(x[i * 32 + j] * idv + np.float32(16.5)))
            q1 = min(31, _trunc_int(x[i * 32 + 16 + j] * idv + np.float32(16.5)))
            out[b + 6 + j] = np.uint8(((q0 & 0xF) | ((q1 & 0xF) << 4)) & 0xFF)
            qh |= ((q0 & 0x10) >> 4) << j
            qh |= ((q1 & 0x10) >> 4) << (j + 16)
        _put_u32(out, b + 2, qh)


@numba.njit(cache=True)
def _q5_1(x, out):
    nb = x.size // 32
    for i in range(nb):
        b = i * 24
        mn, mx = _minmax(x, i * 32, 32)
        d = (mx - mn) / np.float32(31.0)
        idv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        put_f16(out, b, d)
        put_f16(out, b + 2, mn)
        qh = 0
        for j in range(16):
            q0 = _trunc_int((x[i * 32 + j] - mn) * idv + np.float32(0.5)) & 0xFF
            q1 = _trunc_int((x[i * 32 + 16 + j] - mn) * idv + np.float32(0.5)) & 0xFF
            out[b + 8 + j] = np.uint8(((q0 & 0xF) | ((q1 & 0xF) << 4)) & 0xFF)
            qh |= ((q0 & 0x10) >> 4) << j
            qh |= ((q1 & 0x10) >> 4) << (j + 16)
        _put_u32(out, b + 4, qh)


_KERNELS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1}


def quantize_blocks(x: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Pack ``x`` (float32 [rows, cols], cols a multiple of the block size) as ``qtype``: uint8
    [rows, row_bytes]. ``imatrix`` (per-column importance, length cols) selects the importance-weighted
    search for the k-quants; the classic types ignore it here."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape if x.ndim == 2 else (1, x.size)
    if qtype == "F32":
        return x.reshape(rows, cols).view(np.uint8)
    if qtype == "F16":
        return to_f16(x).reshape(rows, cols).view(np.uint8)
    if qtype == "BF16":
        return to_bf16(x).reshape(rows, cols).view(np.uint8)
    bs, _ = BLOCK[qtype]
    if cols % bs:
        raise ValueError(f"{qtype}: {cols} columns is not a multiple of its block size {bs}")
    out = np.empty(rows * row_bytes(qtype, cols), dtype=np.uint8)
    flat = x.reshape(-1)
    if qtype in _KERNELS and (imatrix is None or qtype == "Q8_0"):
        _KERNELS[qtype](flat, out)
    else:
        from mergequant.gguf.kquants import quantize_k

        quantize_k(flat, out, qtype, cols, imatrix)
    return out.reshape(rows, -1)
