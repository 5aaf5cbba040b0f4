"""Forwards for Linear modules whose float weight is never held in memory during calibration.

A layer-by-layer quantizer keeps one decoder layer materialized while it runs the calibration data
through it. Held in float32, a 1B Llama layer is 176 MiB, the largest item after the Hessian; but a
GPTQ pass never needs most of it in float32:

* a module that is already quantized is exactly ``W_hat = scale * (q - zero)``: its codes (one
  eighth of the float32 size at 4 bits) and per-group scales reproduce ``W_hat`` bit for bit, a
  block of output features at a time, inside the forward (``QuantizedForward``);
* a module that is not quantized yet is not called at all by the true-sequential captures (each
  capture stops before the first module of a later group), and when the solver needs its weight it
  reads it from the memory-mapped checkpoint (file-backed pages, not anonymous memory). Should an
  architecture call it anyway, ``CheckpointForward`` reads the weight from the checkpoint per call.

Both are installed as an instance attribute ``forward`` (``nn.Module.__call__`` dispatches to it,
hooks still fire), and ``remove_forwards`` takes them off again when the layer is freed.

Cost: the dequantization is elementwise work of the weight's size per call, small next to the matrix
product it feeds for calibration chunks of 512+ tokens; on the 1.1B benchmark the whole memory work
(this, row-blocked solves, returning freed pages) cost 11% wall time for 42% less peak memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mergequant.quant.gptq import contiguous_groups, dequantize_t_

__all__ = ["CheckpointForward", "QuantizedForward", "remove_forwards"]

# float32 bytes of one dequantized block of the weight: small enough to come from the heap and be
# reused call after call, large enough for an efficient matrix product
BLOCK_BYTES = 4 * 2**20


class QuantizedForward:
    """``y = x @ W_hat^T + b`` from codes, with ``W_hat[n, k] = scales[g, n] * (codes[k, n] - zeros[g, n])``
    and ``g = g_idx[k]`` (the GPTQ convention), dequantized a block of output features at a time.

    ``codes`` uint8 [K, N] (checkpoint orientation; a column slice of a larger matrix is fine),
    ``scales`` float32 [G, N], ``zeros`` integer [G, N], ``g_idx`` [K]; ``bits`` the code width (2- and
    4-bit codes are stored packed).
    """

    def __init__(self, module: nn.Module, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 g_idx: torch.Tensor, bits: int = 8):
        k, n = codes.shape
        self.bias = getattr(module, "bias", None)
        self.k, self.n = k, n
        # 2- and 4-bit codes are kept 4 or 2 to a byte (packed along K): half or a quarter of the memory
        self.per_byte = 8 // bits if bits in (2, 4) and k % (8 // bits) == 0 else 1
        self.bits = bits if self.per_byte > 1 else 8
        self.codes = _pack_along_k(codes, self.bits, self.per_byte) if self.per_byte > 1 else codes
        self.scales = scales.to(torch.float32)
        self.zeros = zeros.to(torch.float32)
        # contiguous groups broadcast; an act-order g_idx is gathered block by block
        self.groups = None if contiguous_groups(g_idx, scales.shape[0]) else g_idx.long().to(scales.device)
        self.block = max(1, min(n, BLOCK_BYTES // (4 * k)))

    def weight_t_block(self, n0: int, n1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """W_hat^T[:, n0:n1] in float32 [K, n1 - n0] (the solver's formula and operation order),
        written into ``out`` (a contiguous float32 buffer of that shape) when given."""
        if out is None:
            out = torch.empty(self.k, n1 - n0, dtype=torch.float32, device=self.codes.device)
        w = out
        if self.per_byte == 1:
            w.copy_(self.codes[:, n0:n1])
        else:
            p = self.codes[:, n0:n1]
            v = w.view(self.k // self.per_byte, self.per_byte, n1 - n0)
            mask = (1 << self.bits) - 1
            for j in range(self.per_byte):
                v[:, j] = (p >> (self.bits * j)) & mask
        return dequantize_t_(w, self.scales[:, n0:n1], self.zeros[:, n0:n1], self.groups)

    def weight(self) -> torch.Tensor:
        """The whole W_hat [N, K] in float32 (for tests and debugging; the forward never builds it)."""
        return torch.cat([self.weight_t_block(n0, min(n0 + self.block, self.n)).T
                          for n0 in range(0, self.n, self.block)], dim=0)

    def _block_t(self, n0: int, n1: int, buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """W_hat^T[:, n0:n1] in ``dtype``: dequantized into ``buf``, or, for a small module, kept from its
        first call (per dtype). A mixture-of-experts layer calls each of its many small expert Linears
        once per chunk in every statistics pass; re-dequantizing them each time was a third of a tiny
        Mixtral's GPTQ run (and converting the float32 block for a bfloat16 input each call a tenth)."""
        if self.k * self.n * 4 <= CACHE_BYTES:
            cache = self.__dict__.setdefault("_cache", {})
            if (n0, dtype) not in cache:
                w = cache.get((n0, torch.float32))
                if w is None:
                    w = cache[(n0, torch.float32)] = self.weight_t_block(n0, n1)
                cache[(n0, dtype)] = w.to(dtype)
            return cache[(n0, dtype)]
        w = self.weight_t_block(n0, n1, out=buf[: self.k * (n1 - n0)].view(self.k, n1 - n0))
        return w if w.dtype == dtype else w.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.k)
        out = torch.empty(x2.shape[0], self.n, dtype=x.dtype, device=x.device)
        # one dequantization buffer for every block and every call: no per-block allocation to churn the heap
        buf = _scratch(self.k * self.block, x.device)
        for n0 in range(0, self.n, self.block):
            n1 = min(n0 + self.block, self.n)
            torch.mm(x2, self._block_t(n0, n1, buf, x.dtype), out=out[:, n0:n1])  # straight into the output's columns
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.n)


_SCRATCH: dict[torch.device, torch.Tensor] = {}
# A module whose float32 W_hat is at most this big keeps it after its first call (same blocks, same
# products: bit-identical outputs); larger ones dequantize per call to hold only their codes.
CACHE_BYTES = 2 * 2**20


def _scratch(numel: int, device: torch.device) -> torch.Tensor:
    """A float32 buffer of at least ``numel`` elements on ``device``, reused by every QuantizedForward
    (forwards run one at a time; at most BLOCK_BYTES per device)."""
    buf = _SCRATCH.get(device)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buf[:numel]


def _pack_along_k(codes: torch.Tensor, bits: int, per_byte: int) -> torch.Tensor:
    """uint8 [K, N] codes < 2**bits -> uint8 [K / per_byte, N]; code k sits in byte k // per_byte at
    bit offset bits * (k % per_byte)."""
    k, n = codes.shape
    v = codes.reshape(k // per_byte, per_byte, n)
    out = v[:, 0].clone()
    for j in range(1, per_byte):
        out |= v[:, j] << (bits * j)
    return out


class CheckpointForward:
    """``F.linear`` with the weight read per call from ``read()`` (a memory-mapped checkpoint tensor),
    cast to the input's dtype: for a module whose weight is deliberately not materialized."""

    def __init__(self, module: nn.Module, read: Callable[[], torch.Tensor]):
        self.bias = getattr(module, "bias", None)  # already materialized: only the weight is deferred
        self.read = read

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.read().to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, self.bias)


def remove_forwards(module: nn.Module) -> None:
    """Take every instance-level ``forward`` off ``module`` and its submodules (frees what they hold)."""
    for m in module.modules():
        m.__dict__.pop("forward", None)
