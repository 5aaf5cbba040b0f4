"""On-disk quantized formats (GPTQ v1/v2, AWQ GEMM): packing, unpacking, dequantization, configs.

Small pure functions, tensor in -> tensor out, so each bit layout can be checked against hand-made
words. The layouts are the ones loaders (transformers + gptqmodel, vLLM, AutoAWQ kernels) read; see
``shared/notes/quant-formats.md``.

Conventions used throughout (the "checkpoint orientation"):

* ``K`` = input features (Linear ``in_features``), ``N`` = output features, ``G`` = number of groups.
* Integer weights ``q`` are ``[K, N]`` (input-major), because that is the orientation GPTQ's
  ``qweight`` and AWQ's ``qweight`` are stored in; ``zeros``/``scales`` are ``[G, N]``.
* Dequantized weights are returned as ``[N, K]``, the ``nn.Linear.weight`` layout, since that is
  what a caller compares against or writes back.
* Packed words are int32. Bit arithmetic is done in int64 on the unsigned 32-bit value and only
  converted (two's complement) at the end, so words with the top bit set (e.g. 0x87654321)
  round-trip exactly instead of depending on sign-extending shifts.
"""

from __future__ import annotations

from math import gcd

import torch

__all__ = [
    "SUPPORTED_BITS",
    "pack_rows",
    "unpack_rows",
    "pack_cols",
    "unpack_cols",
    "gptq_pack",
    "gptq_unpack",
    "gptq_dequantize",
    "g_idx_for",
    "AWQ_ORDER",
    "awq_pack",
    "awq_unpack",
    "awq_pack_zeros",
    "awq_unpack_zeros",
    "awq_dequantize",
    "gptq_quantize_config",
    "awq_quantize_config",
]

SUPPORTED_BITS = (2, 3, 4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")

# AWQ GEMM: nibble i (i = 0 lowest) of a word holds output column AWQ_ORDER[i] of its block of 8.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)  # argsort(AWQ_ORDER): column c sits in nibble _AWQ_REVERSE[c]

_U32 = 1 << 32


# --------------------------------------------------------------------------- helpers

def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits={bits}; supported: {SUPPORTED_BITS}")


PACK_BLOCK_BYTES = 4 * 2**20  # bound on pack_rows' int64 temporaries


def _chunk(bits: int) -> tuple[int, int]:
    """(values, words) per packing chunk: 32/bits values -> 1 word for 2/4/8 bits, 32 values -> 3 words
    for 3 bits (a 96-bit little-endian stream), i.e. the smallest run that fills whole 32-bit words."""
    d = gcd(32, bits)
    return 32 // d, bits // d


def _to_int32(words_u: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> int32 with the same bit pattern (two's complement).
    Done explicitly because an overflowing int64->int32 cast is not something to rely on."""
    return torch.where(words_u >= (1 << 31), words_u - _U32, words_u).to(torch.int32)


def _to_u32(words: torch.Tensor) -> torch.Tensor:
    """int32 words -> int64 holding the unsigned 32-bit value (so shifts never see a sign bit)."""
    return words.to(torch.int64) & 0xFFFFFFFF


def _check_int_range(name: str, t: torch.Tensor, bits: int) -> None:
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= (1 << bits)):
        raise ValueError(
            f"{name} values must be in [0, {1 << bits}) for bits={bits}, "
            f"got range [{int(t.min())}, {int(t.max())}]"
        )


# --------------------------------------------------------------------------- GPTQ bit packing

def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``q`` [K, N] (ints in [0, 2**bits)) along dim 0 into int32 [K*bits/32, N] (GPTQ ``qweight``).

    Why this layout: GPTQ kernels read consecutive *input* rows from one word, value j of a chunk at
    bit offset ``bits*j`` (j = 0 in the lowest bits), e.g. 4-bit rows 0..7 holding 1..8 -> 0x87654321.
    For 3 bits 32 rows form one little-endian 96-bit stream split into 3 words, so a value may
    straddle two words. K must be a multiple of the chunk (32/bits rows, or 32 rows for 3 bits).
    """
    _check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D [K, N] tensor, got shape {tuple(q.shape)}")
    _check_int_range("q", q, bits)
    vals, words = _chunk(bits)
    K, N = q.shape
    if K % vals:
        raise ValueError(f"K={K} must be a multiple of {vals} to pack {bits}-bit values")
    out = torch.empty(K // vals * words, N, dtype=torch.int32, device=q.device)
    if words == 1:
        return _pack_whole_words(q, bits, vals, out)
    bit_pos = torch.arange(bits, dtype=torch.int64, device=q.device).view(1, 1, bits, 1)
    shifts = torch.arange(32, dtype=torch.int64, device=q.device).view(1, 1, 32, 1)
    # Chunks are packed a block at a time: the bit stream is int64 [C, vals, bits, N] (64x the size of
    # 4-bit codes), which for a whole 5632 x 2048 matrix would be ~0.4 GB of temporaries.
    step = max(1, PACK_BLOCK_BYTES // (vals * bits * N * 8))
    for c0 in range(0, K // vals, step):
        c1 = min(c0 + step, K // vals)
        q64 = q[c0 * vals:c1 * vals].to(torch.int64).reshape(c1 - c0, vals, 1, N)
        stream = ((q64 >> bit_pos) & 1).reshape(c1 - c0, words, 32, N)     # value j's bit b at 32*w + i
        words_u = (stream << shifts).sum(dim=2)                                # [c, words, N], < 2**32
        out[c0 * words:c1 * words] = _to_int32(words_u.reshape(-1, N))
    return out


def _pack_whole_words(q: torch.Tensor, bits: int, vals: int, out: torch.Tensor) -> torch.Tensor:
    """``pack_rows`` for widths that divide 32 (2, 4, 8 bits): no value straddles a word, so word w is
    ``sum_j q[w * vals + j] << (bits * j)``, OR-ed value by value (the bit stream of the general path
    costs 64 bytes per value and was half of a tiny Mixtral's round-to-nearest run)."""
    K, N = q.shape
    step = max(1, PACK_BLOCK_BYTES // (vals * N * 8))
    for w0 in range(0, K // vals, step):
        w1 = min(w0 + step, K // vals)
        q64 = q[w0 * vals:w1 * vals].to(torch.int64).view(w1 - w0, vals, N)
        words_u = q64[:, 0].clone()
        for j in range(1, vals):
            words_u |= q64[:, j] << (bits * j)
        out[w0:w1] = _to_int32(words_u)
    return out


def unpack_rows(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 [K*bits/32, N] -> int32 [K, N] values in [0, 2**bits).

    ``K`` is explicit so a shape mismatch between qweight and the layer is caught, not silently guessed.
    """
    _check_bits(bits)
    if packed.dim() != 2:
        raise ValueError(f"unpack_rows expects a 2-D tensor, got shape {tuple(packed.shape)}")
    vals, words = _chunk(bits)
    if K % vals or packed.shape[0] != K // vals * words:
        raise ValueError(f"packed rows {packed.shape[0]} do not match K={K} at bits={bits}")
    N = packed.shape[1]
    u = _to_u32(packed).reshape(K // vals, words, 1, N)
    dev = packed.device
    shifts = torch.arange(32, dtype=torch.int64, device=dev).view(1, 1, 32, 1)
    stream = ((u >> shifts) & 1).reshape(K // vals, vals, bits, N)
    weights = (torch.ones(bits, dtype=torch.int64, device=dev)
               << torch.arange(bits, dtype=torch.int64, device=dev)).view(1, 1, bits, 1)
    return (stream * weights).sum(dim=2).reshape(K, N).to(torch.int32)


def pack_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``q`` [G, N] along dim 1 into int32 [G, N*bits/32] (GPTQ ``qzeros``).

    Same bit order as :func:`pack_rows` (consecutive output columns, lowest bits first; 3-bit as a
    96-bit stream per 32 columns), only the packed dimension differs, which is what loaders expect.
    """
    if q.dim() != 2:
        raise ValueError(f"pack_cols expects a 2-D [G, N] tensor, got shape {tuple(q.shape)}")
    return pack_rows(q.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, N: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`: int32 [G, N*bits/32] -> int32 [G, N]."""
    if packed.dim() != 2:
        raise ValueError(f"unpack_cols expects a 2-D tensor, got shape {tuple(packed.shape)}")
    return unpack_rows(packed.t(), bits, N).t().contiguous()


# --------------------------------------------------------------------------- GPTQ tensors

def g_idx_for(K: int, group_size: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Group index of each input channel, int32 [K].

    Without act order channel k is in group ``k // group_size``. With desc_act GPTQ quantizes the
    columns in the order ``perm`` (perm[i] = original channel processed i-th) and groups are formed
    along that order, so channel ``perm[i]`` gets group ``i // group_size``, i.e.
    ``g_idx = (arange(K) // gs)[invperm(perm)]``. ``group_size == -1`` means one group for all of K.
    """
    if group_size == -1:
        group_size = K
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    groups = torch.arange(K, dtype=torch.int64) // group_size
    if perm is not None:
        perm = torch.as_tensor(perm, dtype=torch.int64)
        if perm.shape != (K,) or not torch.equal(torch.sort(perm).values, torch.arange(K)):
            raise ValueError(f"perm must be a permutation of range({K})")
        invperm = torch.argsort(perm)
        groups = groups[invperm]
    return groups.to(torch.int32)


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {GPTQ_FORMATS}, got {checkpoint_format!r}")


def gptq_pack(
    q: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
) -> dict[str, torch.Tensor]:
    """Build the GPTQ tensors of one Linear from integer weights.

    Args (checkpoint orientation): ``q`` int [K, N] in [0, 2**bits); ``zeros`` int [G, N] true zero
    points in [0, 2**bits); ``scales`` float [G, N]; ``g_idx`` int [K] values in [0, G).

    Returns ``{"qweight": int32 [K*bits/32, N], "qzeros": int32 [G, N*bits/32],
    "scales": float16 [G, N], "g_idx": int32 [K]}``.

    checkpoint_format "gptq" (v1, what most loaders expect) stores ``zeros - 1`` (a historical quirk:
    symmetric 4-bit zeros of 8 become 0x77777777); a zero of 0 would underflow to -1, which the
    packed field cannot hold, so that raises ValueError (write "gptq_v2", which stores zeros as is).
    """
    _check_bits(bits)
    _check_format(checkpoint_format)
    if q.dim() != 2 or zeros.dim() != 2 or scales.dim() != 2:
        raise ValueError("q, zeros and scales must be 2-D ([K, N], [G, N], [G, N])")
    K, N = q.shape
    G = zeros.shape[0]
    if zeros.shape != scales.shape or zeros.shape[1] != N:
        raise ValueError(f"zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must both be [G, {N}]")
    g_idx = torch.as_tensor(g_idx)
    if g_idx.shape != (K,):
        raise ValueError(f"g_idx must have shape [{K}], got {tuple(g_idx.shape)}")
    if K and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
        raise ValueError(f"g_idx values must be in [0, {G})")
    _check_int_range("zeros", zeros, bits)
    stored = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        if bool((stored == 0).any()):
            raise ValueError(
                "checkpoint_format 'gptq' (v1) stores zeros - 1, and a zero point of 0 would underflow; "
                "use checkpoint_format='gptq_v2' (typical for sym=False)"
            )
        stored = stored - 1
    return {
        "qweight": pack_rows(q, bits),
        "qzeros": pack_cols(stored, bits),
        "scales": scales.to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }


def gptq_unpack(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of the integer part of :func:`gptq_pack`: returns ``(q [K, N], zeros [G, N])`` as int32,
    zeros being the true zero points (``+1`` undone for v1). K and N come from the tensor shapes."""
    _check_bits(bits)
    _check_format(checkpoint_format)
    vals, words = _chunk(bits)
    if qweight.shape[0] % words or qzeros.shape[1] % words:
        raise ValueError(f"packed shapes {tuple(qweight.shape)}, {tuple(qzeros.shape)} invalid for bits={bits}")
    K = qweight.shape[0] // words * vals
    N = qweight.shape[1]
    if qzeros.shape[1] // words * vals != N:
        raise ValueError(f"qzeros {tuple(qzeros.shape)} does not match N={N} at bits={bits}")
    q = unpack_rows(qweight, bits, K)
    z = unpack_cols(qzeros, bits, N)
    if checkpoint_format == "gptq":
        z = z + 1
    return q, z


def gptq_dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize GPTQ tensors to the Linear weight layout [N, K]:
    ``W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])``, computed in float32 (or ``dtype``
    if wider) so the check against a reference is not blurred by half-precision arithmetic."""
    q, z = gptq_unpack(qweight, qzeros, bits, checkpoint_format)
    gi = torch.as_tensor(g_idx).to(torch.int64)
    if gi.shape != (q.shape[0],):
        raise ValueError(f"g_idx must have shape [{q.shape[0]}], got {tuple(gi.shape)}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    s = scales.to(work)
    w = s[gi] * (q.to(work) - z.to(work)[gi])  # [K, N]
    return w.t().contiguous().to(dtype)


# --------------------------------------------------------------------------- AWQ GEMM (4-bit)

def _awq_pack_last(q: torch.Tensor, name: str) -> torch.Tensor:
    if q.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(q.shape)}")
    _check_int_range(name, q, 4)
    R, N = q.shape
    if N % 8:
        raise ValueError(f"{name}: N={N} must be a multiple of 8 for AWQ packing")
    blocks = q.to(torch.int64).reshape(R, N // 8, 8)[..., list(AWQ_ORDER)]  # nibble i <- column AWQ_ORDER[i]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    return _to_int32((blocks << shifts).sum(dim=-1))


def _awq_unpack_last(packed: torch.Tensor) -> torch.Tensor:
    if packed.dim() != 2:
        raise ValueError(f"AWQ packed tensor must be 2-D, got shape {tuple(packed.shape)}")
    R, W = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (_to_u32(packed).unsqueeze(-1) >> shifts) & 0xF  # [R, W, 8], nibble order
    return nibbles[..., list(_AWQ_REVERSE)].reshape(R, W * 8).to(torch.int32)


def awq_pack(q: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM ``qweight``: 4-bit ``q`` [K, N] -> int32 [K, N/8], packed along the *output* dim.

    Within each block of 8 output columns, nibble i (lowest first) holds column ``AWQ_ORDER[i]`` =
    [0,2,4,6,1,3,5,7]; the interleave matches the AWQ GEMM kernel's dequant shuffle. Values 1..8 in
    columns 0..7 give 0x86427531.
    """
    return _awq_pack_last(q, "q")


def awq_unpack(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`awq_pack`: int32 [K, N/8] -> int32 [K, N]."""
    return _awq_unpack_last(qweight)


def awq_pack_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """AWQ ``qzeros``: raw (no -1 offset) 4-bit zeros [K/gs, N] -> int32 [K/gs, N/8], same interleave."""
    return _awq_pack_last(zeros, "zeros")


def awq_unpack_zeros(qzeros: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`awq_pack_zeros`."""
    return _awq_unpack_last(qzeros)


def awq_dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize AWQ GEMM tensors to [N, K]: ``W[n, k] = scales[k // gs, n] * (q[k, n] - z[k // gs, n])``.
    AWQ has no g_idx (no act order), groups are contiguous input rows; ``group_size == -1`` = one group."""
    q = awq_unpack(qweight)
    z = awq_unpack_zeros(qzeros)
    K, N = q.shape
    gs = K if group_size == -1 else group_size
    if gs <= 0 or K % gs:
        raise ValueError(f"K={K} must be a multiple of group_size={group_size}")
    if z.shape != (K // gs, N) or tuple(scales.shape) != (K // gs, N):
        raise ValueError(
            f"qzeros/scales unpack to {tuple(z.shape)}/{tuple(scales.shape)}, expected {(K // gs, N)}"
        )
    gi = torch.arange(K) // gs
    work = torch.float64 if dtype == torch.float64 else torch.float32
    w = scales.to(work)[gi] * (q.to(work) - z.to(work)[gi])
    return w.t().contiguous().to(dtype)


# --------------------------------------------------------------------------- configs

def _quantizer_tag(version: str | None) -> str:
    if version is None:
        from mergequant import __version__ as version
    return f"mergequant:{version}"


def gptq_quantize_config(
    bits: int = 4,
    group_size: int = 128,
    desc_act: bool = False,
    sym: bool = True,
    damp_percent: float = 0.01,
    static_groups: bool = False,
    checkpoint_format: str = "gptq",
    version: str | None = None,
    true_sequential: bool = True,
    lm_head: bool = False,
) -> dict:
    """``quantization_config`` (config.json) / quantize_config.json for a GPTQ checkpoint.

    ``version`` is the mergequant version recorded in ``meta.quantizer`` (default: the installed one),
    so a checkpoint says which tool wrote it. v1 with sym=False is refused: asymmetric zeros of 0
    cannot be stored as zeros - 1 (see :func:`gptq_pack`).
    """
    _check_bits(bits)
    _check_format(checkpoint_format)
    if not (group_size == -1 or group_size > 0):
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    if checkpoint_format == "gptq" and not sym:
        raise ValueError("sym=False needs checkpoint_format='gptq_v2' (v1 stores zeros - 1, which underflows at 0)")
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        # ``desc_act`` tells loaders whether g_idx is out of order. With static groups it never is (groups are
        # fixed in channel order before the act-order solve), so the checkpoint is stored as plain grouped GPTQ:
        # vLLM, which refuses desc_act with groups, then loads act-order quality (``static_groups`` records it)
        "desc_act": bool(desc_act) and not (static_groups and group_size != -1),
        "sym": bool(sym),
        "true_sequential": bool(true_sequential),
        "damp_percent": float(damp_percent),
        "static_groups": bool(static_groups),
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "lm_head": bool(lm_head),
        "meta": {"quantizer": [_quantizer_tag(version)]},
    }


def awq_quantize_config(
    bits: int = 4,
    group_size: int = 128,
    zero_point: bool = True,
    version: str = "gemm",
    modules_to_not_convert: list[str] | None = None,
) -> dict:
    """``quantization_config`` for an AWQ GEMM checkpoint. Only 4-bit GEMM is written, because that is
    the only layout :func:`awq_pack` produces (``version`` here is AWQ's kernel layout, not ours)."""
    if bits != 4:
        raise ValueError(f"AWQ GEMM supports bits=4 only, got {bits}")
    if version != "gemm":
        raise ValueError(f"only AWQ version 'gemm' is supported, got {version!r}")
    if not (group_size == -1 or group_size > 0):
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    return {
        "quant_method": "awq",
        "bits": bits,
        "group_size": group_size,
        "zero_point": bool(zero_point),
        "version": version,
        "modules_to_not_convert": None if modules_to_not_convert is None else list(modules_to_not_convert),
    }
