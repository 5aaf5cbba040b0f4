"""GPTQ weight quantization in plain torch, readable top to bottom.

GPTQ (Frantar et al., 2022) quantizes a linear layer's weight W [N, K] one input column at a time
and, after rounding a column, spreads that column's rounding error over the not-yet-quantized
columns so that the layer *output* X W^T changes as little as possible.  "As little as possible"
is measured by the proxy loss  tr(dW H dW^T)  with  H = (2/n) X^T X  the Hessian of the squared
output error w.r.t. one row of W.  Everything below serves that one idea:

1. ``HessianAccumulator`` builds H from calibration activations.
2. ``find_params`` / ``quantize_rtn`` are the plain per-group min/max quantizer (round to nearest).
3. ``gptq_quantize`` runs the error-compensating column loop on the upper Cholesky factor of H^-1.

Conventions (the GPTQ checkpoint ones, so results drop straight into the usual formats):

* ``maxq = 2**bits - 1``; codes ``q`` are integers in ``[0, maxq]``.
* asymmetric: ``scale = (xmax - xmin) / maxq`` with ``xmin = min(w.min(), 0)``,
  ``xmax = max(w.max(), 0)`` (the range always contains 0, so 0 is exactly representable) and
  ``zero = round(-xmin / scale)``.
* symmetric: the range is made symmetric around 0, ``xmax = max(|xmin|, xmax)``, ``xmin = -xmax``,
  so ``scale = 2 * xmax / maxq`` and ``zero = (maxq + 1) / 2 = 2**(bits-1)``.
* an all-zero group gets ``xmin, xmax = -1, +1`` so the scale is never 0 (no division by zero; its
  codes all equal ``zero`` and dequantize to exactly 0).
* ``q = clamp(round(w / scale) + zero, 0, maxq)`` and ``w_hat = scale * (q - zero)``.
* Per-group tensors are laid out ``[G, N]`` (group-major, like GPTQ checkpoints) and
  ``g_idx[k]`` names the group of input column ``k``, so for every n, k
  ``W_hat[n, k] == scales[g_idx[k], n] * (q[n, k] - zeros[g_idx[k], n])`` exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["HessianAccumulator", "GPTQResult", "find_params", "quantize_rtn", "gptq_quantize"]

SUPPORTED_BITS = (2, 3, 4, 8)


# ----------------------------------------------------------------------------------------------
# 1. Hessian from calibration activations


class HessianAccumulator:
    """Accumulates H = (2/n) sum_t x_t x_t^T over all tokens seen, in float32.

    Why a running average rather than a running sum: with 128 x 2048 calibration tokens a plain
    float32 sum grows large and loses the small contributions of later batches.  Keeping H as the
    current mean (rescale by n_old/n_new, then add the new batch scaled by 2/n_new) keeps its
    magnitude constant however many batches arrive.
    """

    def __init__(self, in_features: int | None = None):
        self.in_features = in_features
        self._h: torch.Tensor | None = None
        self.nsamples = 0

    def add(self, x: torch.Tensor) -> None:
        """Add activations ``x`` of shape [..., K]; every leading index is one token."""
        k = x.shape[-1]
        if self.in_features is None:
            self.in_features = k
        if k != self.in_features:
            raise ValueError(f"activation width {k} != in_features {self.in_features}")
        x = x.reshape(-1, k).to(torch.float32)
        t = x.shape[0]
        if t == 0:
            return
        if self._h is None:
            self._h = torch.zeros(k, k, dtype=torch.float32, device=x.device)
        n_new = self.nsamples + t
        self._h.mul_(self.nsamples / n_new)
        x = x * math.sqrt(2.0 / n_new)
        self._h.addmm_(x.T, x)
        self.nsamples = n_new

    @property
    def hessian(self) -> torch.Tensor:
        """The current H [K, K] (float32). Zeros if nothing was added yet."""
        if self._h is None:
            if self.in_features is None:
                raise ValueError("no activations added yet and in_features unknown")
            return torch.zeros(self.in_features, self.in_features, dtype=torch.float32)
        return self._h


# ----------------------------------------------------------------------------------------------
# 2. The min/max quantizer (round to nearest)


def _check_args(k: int, bits: int, group_size: int) -> None:
    """Fail early and clearly on settings the packers cannot represent."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size != -1 and (group_size <= 0 or k % group_size != 0):
        raise ValueError(
            f"group_size must be -1 or a positive divisor of in_features K={k}; "
            f"got group_size={group_size} (K={k} is not divisible by {group_size})"
        )


def find_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale [N], zero [N]) for the columns ``w`` [N, m] of one group.

    ``zero`` is returned as a float tensor holding integer values, ready for arithmetic.
    See the module docstring for the conventions.
    """
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)  # range always includes 0
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    dead = (xmin == 0) & (xmax == 0)  # all-zero rows: any nonzero scale works, use [-1, 1]
    xmin = torch.where(dead, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(dead, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def _quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as floats) for ``w``; shapes broadcast."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The one dequant formula used everywhere, so W_hat matches the checkpoint formula bit for bit."""
    return scale * (q - zero)


def _group_index(k: int, group_size: int, device=None) -> torch.Tensor:
    """g_idx for columns in their natural order: column k is in group k // group_size."""
    if group_size == -1:
        return torch.zeros(k, dtype=torch.int32, device=device)
    return (torch.arange(k, device=device) // group_size).to(torch.int32)


def _dequant_from_codes(q, scales, zeros, g_idx, rows: int = 1024) -> torch.Tensor:
    """W_hat[n, k] = scales[g_idx[k], n] * (q[n, k] - zeros[g_idx[k], n]) in float32.

    Built in place (contiguous groups) or over blocks of ``rows`` rows (act-order g_idx), so the
    temporaries stay small next to the [N, K] result."""
    n, k = q.shape
    out = torch.empty(n, k, dtype=torch.float32, device=q.device)
    G = scales.shape[0]
    natural = k % G == 0 and torch.equal(g_idx.long(), torch.arange(k, device=g_idx.device) // (k // G))
    if natural:
        v = out.view(n, G, k // G)
        v.copy_(q.view(n, G, k // G))
        v.sub_(zeros.T.to(torch.float32)[:, :, None]).mul_(scales.T.to(torch.float32)[:, :, None])
        return out
    g = g_idx.long()
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        out[r0:r1] = _dequantize(q[r0:r1].to(torch.float32), scales[g][:, r0:r1].T,
                                 zeros[g][:, r0:r1].T.to(torch.float32))
    return out


def quantize_rtn(
    W: torch.Tensor, bits: int, group_size: int = -1, sym: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest baseline: (q int32 [N, K], scales float32 [G, N], zeros int32 [G, N]).

    Groups are consecutive runs of ``group_size`` input columns (one group if -1).
    """
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [N, K], got shape {tuple(W.shape)}")
    n, k = W.shape
    _check_args(k, bits, group_size)
    maxq = 2**bits - 1
    gs = k if group_size == -1 else group_size
    W = W.to(torch.float32)
    q = torch.empty(n, k, dtype=torch.int32, device=W.device)
    scales, zeros = [], []
    for g0 in range(0, k, gs):
        scale, zero = find_params(W[:, g0 : g0 + gs], bits, sym)
        q[:, g0 : g0 + gs] = _quantize(W[:, g0 : g0 + gs], scale[:, None], zero[:, None], maxq).to(torch.int32)
        scales.append(scale)
        zeros.append(zero)
    return q, torch.stack(scales), torch.stack(zeros).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# 3. GPTQ


@dataclass
class GPTQResult:
    """Everything a packer needs, plus diagnostics.

    qweight: int32 [N, K] unpacked codes in the original column order.
    scales: float32 [G, N]; zeros: int32 [G, N] integer zero points.
    g_idx: int32 [K], group of each original input column.
    perm: int64 [K] or None; with act order, perm[j] is the original column quantized j-th.
    W_hat: float32 [N, K] dequantized weight (exactly the checkpoint dequant formula).
    damp_used: the damping fraction that made the Cholesky succeed (the last one tried on fallback).
    fallback_rtn: True when every Cholesky attempt failed and plain RTN was returned instead.
    error: proxy loss tr((W - W_hat) H (W - W_hat)^T) with the undamped H, = (2/n)||X W^T - X W_hat^T||^2.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    perm: torch.Tensor | None
    W_hat: torch.Tensor
    damp_used: float
    fallback_rtn: bool
    error: float


def _proxy_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, rows: int = 1024) -> float:
    """tr(dW H dW^T): what GPTQ minimizes, reported so callers can compare layers.

    Computed over blocks of ``rows`` rows in float32 (a float64 [N, K] x [K, K] product costs more
    than the whole GPTQ solve at 1B scale, and whole-matrix temporaries would be the solver's peak
    memory); only the sum is accumulated in float64."""
    H = H.to(torch.float32)
    total = 0.0
    for r0 in range(0, W.shape[0], rows):
        d = W[r0:r0 + rows].to(torch.float32) - W_hat[r0:r0 + rows].to(torch.float32)
        total += float(((d @ H) * d).sum(dtype=torch.float64))
    return total


def _inverse_cholesky_upper(H: torch.Tensor, damp: float, max_retries: int) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1, retrying with 10x damp on failure.

    Why the factor of the *inverse*: GPTQ's column loop needs, for each column j, the row j of
    the inverse Hessian restricted to the not-yet-quantized columns.  Those rows are exactly the
    rows of U (Cholesky of H^-1), which is both cheaper and far more stable than repeatedly
    downdating H^-1.  Damping keeps H positive definite when calibration data is scarce; if that
    is not enough we damp harder (a damp of 0 becomes 0.01).  Returns (None, last damp) if
    every attempt fails, i.e. an exception or a non-finite factor.

    How, without forming H^-1: with J the reversal permutation, H = V V^T for V = U^-1 (upper),
    so J H J = (J V J)(J V J)^T is the ordinary Cholesky factorization of J H J, and
    U = J chol(J H J)^-1 J: one Cholesky and one triangular inverse (~K^3/1.5 flops) instead of
    Cholesky, inverse, product and a second Cholesky (~3 K^3; torch.cholesky_inverse alone took
    ~15 s for K = 2048 on 2 CPU cores). Both run in place, so at most three K x K matrices are
    alive here besides ``H``.
    """
    k = H.shape[0]
    mean_diag = float(torch.diag(H).mean())
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for _attempt in range(max_retries + 1):
        try:
            L = H.flip(0, 1)  # J H J (a copy)
            L.diagonal().add_(damp * mean_diag)
            torch.linalg.cholesky_ex(L, out=(L, info))
            if int(info) == 0:
                V = torch.eye(k, dtype=H.dtype, device=H.device)
                torch.linalg.solve_triangular(L, V, upper=False, out=V)
                del L
                U = V.flip(0, 1)
                del V
                if bool(torch.isfinite(U).all()):
                    return U, damp
        except (RuntimeError, ValueError):  # torch.linalg.LinAlgError is a RuntimeError
            pass
        damp = damp * 10 if damp > 0 else 0.01
    return None, damp


def _effective_block_size(block_size: int, group_size: int, dynamic_groups: bool) -> int:
    """Block size aligned with groups so that group parameters see fully error-updated weights.

    Lazy batching defers updates to columns beyond the current block.  When a group starts we
    compute its min/max from the weights *after* all errors so far have been propagated, so a
    group must either lie inside one block (gs <= block: use a multiple of gs) or start where a
    block starts (gs > block: use a divisor of gs), where nothing is pending yet.
    """
    if not dynamic_groups or group_size == -1:
        return block_size
    if group_size <= block_size:
        return (block_size // group_size) * group_size
    return max(d for d in range(1, block_size + 1) if group_size % d == 0)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    group_size: int = -1,
    desc_act: bool = False,
    static_groups: bool = False,
    sym: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    max_retries: int = 4,
    dtype: torch.dtype = torch.float32,
) -> GPTQResult:
    """Quantize W [N, K] given H [K, K] with GPTQ; see the module docstring for conventions.

    ``dtype`` is the working precision (float32 by default; float64 is for tests).
    Steps: dead input channels -> act-order permutation -> damping + Cholesky of H^-1 ->
    blocked column loop with error feedback -> undo the permutation.
    """
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [N, K], got shape {tuple(W.shape)}")
    n, k = W.shape
    if tuple(H.shape) != (k, k):
        raise ValueError(f"H must be [K, K] = [{k}, {k}] for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    _check_args(k, bits, group_size)
    maxq = 2**bits - 1
    device = W.device
    H_orig, W_in = H, W
    # The column loop works on the transpose Wt [K, N]: column j of W is the contiguous row Wt[j],
    # so every per-column operation reads and writes contiguous memory (on a row-major W [N, K]
    # each column access strides through N cache lines, which made the loop ~10x slower).
    Wt = torch.empty(k, n, dtype=dtype, device=device)
    Wt.copy_(W.T)  # always a fresh copy: the caller's W is never modified
    H = H.to(dtype).clone()

    # Dead inputs (never active in calibration) carry no information: any value of W there is
    # unobservable, so set it to 0 and make H invertible with a unit diagonal entry.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Wt[dead] = 0

    # Static groups: parameters from the original column order, computed before any error update
    # (so that group membership stays contiguous in the checkpoint even with act order).
    static = static_groups and group_size != -1
    static_params = []
    if static:
        for g0 in range(0, k, group_size):
            static_params.append(find_params(Wt[g0 : g0 + group_size].T, bits, sym))

    # Act order: quantize the columns with the largest activations first, while there are still
    # many free columns left to absorb their error.
    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        Wt = Wt[perm]
        H = H[perm][:, perm]
    order = perm if perm is not None else torch.arange(k, device=device)

    U, damp_used = _inverse_cholesky_upper(H, damp, max_retries)
    del H
    if U is None:  # every attempt failed: the caller reports the RTN fallback
        W0 = Wt[torch.argsort(order)].T if perm is not None else Wt.T
        q, scales, zeros = quantize_rtn(W0.to(torch.float32), bits, group_size, sym)
        g_idx = _group_index(k, group_size, device)
        W_hat = _dequant_from_codes(q, scales, zeros, g_idx)
        return GPTQResult(q, scales, zeros, g_idx, None, W_hat, damp_used, True, _proxy_error(W_in, W_hat, H_orig))

    n_groups = 1 if group_size == -1 else k // group_size
    scales = torch.zeros(n_groups, n, dtype=dtype, device=device)
    zeros = torch.zeros(n_groups, n, dtype=dtype, device=device)
    if group_size == -1:  # one group: parameters from the whole (dead-zeroed) matrix up front
        scales[0], zeros[0] = find_params(Wt.T, bits, sym)
    elif static:
        for g, (s, z) in enumerate(static_params):
            scales[g], zeros[g] = s, z
    Qt = torch.zeros(k, n, dtype=torch.uint8, device=device)  # codes (<= 255), permuted order, transposed

    bs = _effective_block_size(block_size, group_size, dynamic_groups=not static)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        W1 = Wt[i1:i2].clone()  # this block's columns, updated eagerly one by one
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if group_size == -1:
                g = 0
            elif static:
                g = int(order[j]) // group_size
            else:
                g = j // group_size
                if j % group_size == 0:  # new group: min/max of the error-updated weights
                    grp = torch.cat([W1[i:], Wt[i2 : j + group_size]], dim=0)[:group_size]
                    scales[g], zeros[g] = find_params(grp.T, bits, sym)
            w = W1[i]
            q = _quantize(w, scales[g], zeros[g], maxq)
            Qt[j] = q
            # OBS update: err / U_jj times row j of U moves the remaining columns to compensate.
            err = (w - _dequantize(q, scales[g], zeros[g])) / U1[i, i]
            W1[i:].addmm_(U1[i, i:, None], err[None, :], alpha=-1)  # rank-1 update as a GEMM: fastest on CPU
            Err1[i] = err
        # Lazy batch update: apply the whole block's errors to all later columns in one matmul.
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)
    Q = Qt.T

    # Back to the original column order.
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        if static or group_size == -1:
            g_idx = _group_index(k, group_size, device)
        else:  # g_idx[perm[j]] = j // group_size
            g_idx = _group_index(k, group_size, device)[inv]
    else:
        g_idx = _group_index(k, group_size, device)

    qweight = Q.to(torch.int32)
    scales = scales.to(torch.float32)
    zeros = zeros.round().to(torch.int32)
    W_hat = _dequant_from_codes(qweight, scales, zeros, g_idx)
    return GPTQResult(
        qweight=qweight,
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        perm=perm,
        W_hat=W_hat,
        damp_used=float(damp_used),
        fallback_rtn=False,
        error=_proxy_error(W_in, W_hat, H_orig),
    )
