"""The arithmetic of applying one LoRA module to one base tensor: pure functions, no I/O.

Everything is computed in float32 (float64 when the base is float64) and returned in that dtype; the
caller rounds once to the base's dtype. Orientation: a Linear weight is stored ``[out, in]``; GPT-2's
Conv1D (``fan_in_fan_out``) stores ``[in, out]``, so its delta is transposed into the stored layout; an
embedding table is ``[vocab, dim]`` while its factors are ``A [r, vocab]``, ``B [dim, r]``.

Formulas (peft 0.21's ``merge``):

- Linear: ``W' = W + s * B @ A`` (transposed with ``fan_in_fan_out``);
- embedding: ``E' = E + s * (B @ A)^T``;
- DoRA, Linear: ``V = W + s B A`` in ``[out, in]``, ``W' = (m / ||V||_row) * V`` (norm of each output row);
- DoRA, embedding: ``V = E + s (B A)^T``, each column (embedding dimension) scaled by ``m / ||V||_col``;
- ``lora_bias``: ``b' = b + s * b_B``.
"""

from __future__ import annotations

import torch


def compute_dtype(base: torch.Tensor) -> torch.dtype:
    """float64 for float64 bases, else float32: the base is never computed in its own 16-bit dtype."""
    return torch.float64 if base.dtype == torch.float64 else torch.float32


def linear_delta(A: torch.Tensor, B: torch.Tensor, scale: float, *, fan_in_fan_out: bool = False,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``s * B @ A`` in the stored layout (``[out, in]``, or ``[in, out]`` with ``fan_in_fan_out``)."""
    d = (B.to(dtype) @ A.to(dtype)) * scale
    return d.T if fan_in_fan_out else d


def embedding_delta(A: torch.Tensor, B: torch.Tensor, scale: float, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``s * (B @ A)^T``: ``[vocab, dim]`` from ``A [r, vocab]`` and ``B [dim, r]``."""
    return ((B.to(dtype) @ A.to(dtype)) * scale).T


def dora_rows(V: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``V`` ``[out, in]`` with each row rescaled to norm ``magnitude[row]`` (DoRA, Linear); in place."""
    norm = torch.linalg.norm(V, dim=1)
    return V.mul_((magnitude.to(V.dtype) / norm).unsqueeze(1))


def dora_columns(V: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``V`` ``[vocab, dim]`` with each column rescaled to norm ``magnitude[col]`` (DoRA, embedding); in place."""
    norm = torch.linalg.norm(V, dim=0)
    return V.mul_((magnitude.to(V.dtype) / norm).unsqueeze(0))


# Row blocks of this many bytes (in the compute dtype) when the result is rounded as it is made: the block's sum
# stays in cache between the base's conversion, the GEMM and the rounding, instead of a whole float32 copy of
# the tensor going through memory three times (1.8x faster for a 2048 x 5632 rank-64 Linear on one core).
BLOCK_BYTES = 2 << 20


def adapted_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, *, embedding: bool = False,
                   fan_in_fan_out: bool = False, magnitude: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The adapted weight (see the module docstring); ``W`` is not modified.

    ``out_dtype=None``: returned in the compute dtype (the caller rounds). With ``out_dtype``, it is computed in the
    compute dtype one block of rows at a time and each block rounded once to ``out_dtype`` (the same formula; BLAS
    may sum the r products of a small block in another order, i.e. within one rounding of the compute dtype).
    DoRA on a transposed layout (embedding, ``fan_in_fan_out``), whose norms run across rows, is computed whole."""
    dtype = compute_dtype(W)
    A, B = A.to(dtype), B.to(dtype)
    transposed = embedding or fan_in_fan_out
    # V += scale * L @ R in the stored layout: [out, in] = B A, or transposed (B A)^T = A^T B^T
    L, R = (A.T, B.T) if transposed else (B, A)
    if out_dtype is not None and W.dim() == 2 and (magnitude is None or not transposed):
        rows, cols = W.shape
        step = max(1, BLOCK_BYTES // max(1, cols * torch.empty((), dtype=dtype).element_size()))
        out = torch.empty(W.shape, dtype=out_dtype)
        buf = torch.empty((min(step, rows), cols), dtype=dtype)
        for i in range(0, rows, step):
            j = min(rows, i + step)
            V = buf[: j - i]
            V.copy_(W[i:j])
            V.addmm_(L[i:j], R, alpha=scale)
            if magnitude is not None:  # DoRA, [out, in]: each row's norm is within the block
                dora_rows(V, magnitude[i:j])
            out[i:j].copy_(V)
        return out
    # one working copy of the tensor, updated in place: an adapted 128k x 4096 embedding then costs one float32
    # copy (2 GiB), not three (copy, delta, sum)
    V = W.to(dtype, copy=True)
    V.addmm_(L, R, alpha=scale)
    if magnitude is not None:
        if embedding:
            V = dora_columns(V, magnitude)
        elif fan_in_fan_out:
            V = dora_rows(V.T, magnitude).T
        else:
            V = dora_rows(V, magnitude)
    return V if out_dtype is None else V.to(out_dtype)


def adapted_bias(b: torch.Tensor, bias_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``b + s * b_B`` in the compute dtype (``lora_bias``)."""
    dtype = compute_dtype(b)
    return b.to(dtype) + bias_B.to(dtype) * scale


def expected_shapes(W_shape: tuple[int, ...], A_shape, B_shape, *, embedding: bool, fan_in_fan_out: bool) -> bool:
    """Whether factors ``A``, ``B`` fit a base weight of ``W_shape`` (the check behind 'wrong base')."""
    if len(W_shape) != 2:
        return False
    rows, cols = W_shape
    if embedding:  # E [vocab, dim], A [r, vocab], B [dim, r]
        return A_shape[1] == rows and B_shape[0] == cols
    out, inp = (cols, rows) if fan_in_fan_out else (rows, cols)
    return B_shape[0] == out and A_shape[1] == inp


def expert_delta(A: torch.Tensor, B: torch.Tensor, scale: float, num_experts: int, expert: int,
                 rows: tuple[int, int] | None = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``s * B_e @ A_e`` (rows ``rows`` of it) for expert ``e`` of a LoRA on a fused 3-D expert parameter
    (peft's ``target_parameters``): ``A [r*E, in]`` holds expert e's ``A_e`` in rows ``e*r:(e+1)*r``;
    ``B [out, r*E]`` holds ``B_e`` in columns ``e, e+E, e+2E, ...`` (peft reshapes it to ``[out, r, E]``).
    The result is in transformers' memory layout ``[out, in]`` of that expert (``gate_up_proj``: ``out = 2I``)."""
    r = A.shape[0] // num_experts
    A_e = A.reshape(num_experts, r, A.shape[-1])[expert].to(dtype)
    B_e = B.reshape(B.shape[0], r, num_experts)[:, :, expert].to(dtype)
    if rows is not None:
        B_e = B_e[rows[0]:rows[1]]
    return (B_e @ A_e) * scale


def experts_delta(A: torch.Tensor, B: torch.Tensor, scale: float, num_experts: int, *,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`expert_delta` for every expert, stacked: ``[E, out, in]`` (the fused parameter's shape)."""
    return torch.stack([expert_delta(A, B, scale, num_experts, e, dtype=dtype) for e in range(num_experts)])
