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

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["HessianAccumulator", "GPTQResult", "find_params", "quantize_rtn", "gptq_quantize", "gptq_quantize_batch"]

SUPPORTED_BITS = (2, 3, 4, 8)


# ----------------------------------------------------------------------------------------------
# 1. Hessian from calibration activations


class HessianAccumulator:
    """Accumulates H = (2/n) sum_t x_t x_t^T over all tokens seen, in float32.

    Why a running average rather than a running sum: with 128 x 2048 calibration tokens a plain
    float32 sum grows large and loses the small contributions of later batches.  Keeping H as the
    current mean (rescale by n_old/n_new, then add the new batch scaled by 2/n_new) keeps its
    magnitude constant however many batches arrive.

    Why only the upper triangle: H is symmetric, so each batch updates the row strips
    ``H[a:b, a:]`` (the diagonal block and everything right of it), about half the multiply-adds of
    the full ``X^T X``; the lower triangle is mirrored once, when H is read. For a mixture of experts
    with all-token calibration these products are a third of the quantization time.
    """

    # rows per strip: fewer strips waste less of the product on the lower triangle of the diagonal
    # blocks (1/(2 * strips) of it), more strips make smaller, less efficient products
    STRIPS = 8
    MIN_STRIP = 128

    def __init__(self, in_features: int | None = None):
        self.in_features = in_features
        self._h: torch.Tensor | None = None
        self._mirrored = True
        self.nsamples = 0

    def _strips(self, k: int) -> list[tuple[int, int]]:
        step = max(self.MIN_STRIP, -(-k // self.STRIPS))
        return [(a, min(a + step, k)) for a in range(0, k, step)]

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
        # upper strips: H[a:b, a:] <- (n_old/n_new) H[a:b, a:] + (2/n_new) x[:, a:b]^T x[:, a:], one GEMM
        # each into the strip in place (a row strip of a row-major matrix is a valid GEMM output)
        for a, b in self._strips(k):
            self._h[a:b, a:].addmm_(x[:, a:b].T, x[:, a:], beta=self.nsamples / n_new, alpha=2.0 / n_new)
        self._mirrored = False
        self.nsamples = n_new

    def _mirror(self) -> None:
        """Copy the upper triangle onto the lower one, block by block (no K x K temporary)."""
        h = self._h
        if h is None or self._mirrored:
            return
        k = h.shape[0]
        for a, b in self._strips(k):
            blk = h[a:b, a:b]
            blk.copy_(torch.triu(blk) + torch.triu(blk, 1).T)
            if b < k:
                h[b:, a:b] = h[a:b, b:].T
        self._mirrored = True

    def take(self) -> torch.Tensor:
        """The current H, handed over: the accumulator forgets it (so a consumer may overwrite it and
        its memory is freed as soon as the consumer drops it)."""
        h = self.hessian
        self._h = None
        self.nsamples = 0
        return h

    @property
    def hessian(self) -> torch.Tensor:
        """The current H [K, K] (float32). Zeros if nothing was added yet."""
        if self._h is None:
            if self.in_features is None:
                raise ValueError("no activations added yet and in_features unknown")
            return torch.zeros(self.in_features, self.in_features, dtype=torch.float32)
        self._mirror()
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


def contiguous_groups(g_idx: torch.Tensor, n_groups: int) -> bool:
    """Whether group g is exactly the run of input features [g*gs, (g+1)*gs) (no act-order g_idx)."""
    k = g_idx.shape[0]
    return k % n_groups == 0 and torch.equal(g_idx.long(), torch.arange(k, device=g_idx.device) // (k // n_groups))


def dequantize_t_(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, groups: torch.Tensor | None,
                  rows: int = 128) -> torch.Tensor:
    """In place: ``w`` [K, m] (contiguous, codes stored as floats) <- W_hat^T, i.e. row k becomes
    ``(w[k] - zeros[g]) * scales[g]`` with g = k // (K / G) if ``groups`` is None (contiguous groups:
    broadcast, no temporaries), else g = groups[k] (gathered ``rows`` rows at a time). ``scales`` and
    ``zeros`` are [G, m] in w's dtype. The one dequantization the solver, the compact forward and
    ``GPTQResult.W_hat`` all use, so their values agree bit for bit."""
    k, m = w.shape
    if groups is None:
        v = w.view(scales.shape[0], -1, m)
        v.sub_(zeros[:, None, :]).mul_(scales[:, None, :])
        return w
    for r0 in range(0, k, rows):
        g = groups[r0:r0 + rows]
        w[r0:r0 + rows].sub_(zeros.index_select(0, g)).mul_(scales.index_select(0, g))
    return w


def _dequant_from_codes(q, scales, zeros, g_idx) -> torch.Tensor:
    """W_hat[n, k] = scales[g_idx[k], n] * (q[n, k] - zeros[g_idx[k], n]) in float32 [N, K] (a
    transposed view of the [K, N] buffer ``dequantize_t_`` fills)."""
    n, k = q.shape
    wt = torch.empty(k, n, dtype=torch.float32, device=q.device)
    wt.copy_(q.T)
    groups = None if contiguous_groups(g_idx, scales.shape[0]) else g_idx.long()
    dequantize_t_(wt, scales.to(torch.float32), zeros.to(torch.float32), groups)
    return wt.T


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

    codes: uint8 [K, N] integer codes in the original column order, in checkpoint orientation (what
    ``formats.gptq_pack`` takes; ``codes.T`` is the [N, K] weight layout).
    scales: float32 [G, N]; zeros: int32 [G, N] integer zero points.
    g_idx: int32 [K], group of each original input column.
    perm: int64 [K] or None; with act order, perm[j] is the original column quantized j-th.
    damp_used: the damping fraction that made the Cholesky succeed (the last one tried on fallback).
    fallback_rtn: True when every Cholesky attempt failed and plain RTN was returned instead.
    error: proxy loss tr((W - W_hat) H (W - W_hat)^T) with the undamped H, = (2/n)||X W^T - X W_hat^T||^2.

    ``W_hat`` (float32 [N, K]) is computed from the codes when asked for: exactly the solver's values
    (the checkpoint dequant formula with float32 scales), but the solver itself never holds it whole.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    perm: torch.Tensor | None
    damp_used: float
    fallback_rtn: bool
    error: float

    @property
    def W_hat(self) -> torch.Tensor:
        return _dequant_from_codes(self.codes.T.contiguous(), self.scales, self.zeros, self.g_idx)


# ---- in-place linear algebra on one K x K workspace ----------------------------------------------
# The inverse-Hessian factor is the solver's largest object (K = 5632 for a 1B model's down_proj:
# 121 MiB in float32, 0.5 GiB for a 70B's 28672). torch.linalg.cholesky / solve_triangular need a
# second and third matrix of that size (a result, an identity, LAPACK's column-major copy), so these
# helpers work in place, block by block, on the lower triangle only. The strict upper triangle keeps
# the original symmetric matrix, which is what lets a failed factorization be retried with more
# damping without keeping a backup copy.

FACTOR_BLOCK = 512
# float32 bytes of the solver's working copy of W: rows are solved a block at a time (GPTQ treats rows
# independently given H). 24 MiB keeps a 1B down_proj (44 MiB) in two blocks and every tiny or
# attention-sized weight in one; each extra block repeats the column loop's per-column overhead.
ROW_BLOCK_BYTES = 24 * 2**20


def _rotate180_(M: torch.Tensor, rows: int = FACTOR_BLOCK // 4) -> None:
    """M <- J M J in place (J the reversal permutation): element (i, j) moves to (k-1-i, k-1-j).
    Memory-bound: small row blocks (two temporaries of ``rows`` rows) cost no speed."""
    k = M.shape[0]
    half = k // 2
    for a in range(0, half, rows):
        b = min(a + rows, half)
        top = M[a:b].flip(0, 1)  # a copy of `rows` rows
        M[a:b] = M[k - b:k - a].flip(0, 1)
        M[k - b:k - a] = top
        del top
    if k % 2:
        M[half] = M[half].flip(0)


def _cholesky_lower_(A: torch.Tensor, block: int = FACTOR_BLOCK) -> bool:
    """Lower triangle of A <- L with L L^T = A, in place (left-looking, blocked).

    Reads only the lower triangle (and diagonal) of A and never writes the strict upper triangle.
    Returns False, leaving A partly overwritten, if A is not (numerically) positive definite."""
    k = A.shape[0]
    for j0 in range(0, k, block):
        j1 = min(j0 + block, k)
        D = A[j0:j1, j0:j1].tril()
        if j0:
            P = A[j0:j1, :j0]
            D.sub_(P @ P.T)
        L, info = torch.linalg.cholesky_ex(D)
        if int(info) != 0 or not bool(torch.isfinite(L).all()):
            return False
        diag = A[j0:j1, j0:j1]
        diag.copy_(torch.where(torch.ones_like(L, dtype=torch.bool).tril(), L, diag))
        # the panel below, by row blocks (rows are independent): temporaries of block x block only
        for r0 in range(j1, k, block):
            r1 = min(r0 + block, k)
            panel = A[r0:r1, j0:j1]
            if j0:
                panel.sub_(A[r0:r1, :j0] @ A[j0:j1, :j0].T)
            # panel <- panel L^-T
            panel.copy_(torch.linalg.solve_triangular(L.T, panel, upper=True, left=False))
    return True


def _restore_lower_(A: torch.Tensor, diag: torch.Tensor, block: int = FACTOR_BLOCK) -> None:
    """Undo a (possibly partial) ``_cholesky_lower_``: lower triangle <- transpose of the untouched
    strict upper triangle, diagonal <- ``diag``."""
    k = A.shape[0]
    for j0 in range(0, k, block):
        j1 = min(j0 + block, k)
        A[j1:, j0:j1] = A[j0:j1, j1:].T
        blk = A[j0:j1, j0:j1]
        blk.copy_(blk.triu() + blk.triu(1).T)
    A.diagonal().copy_(diag)


def _invert_lower_(A: torch.Tensor, block: int = FACTOR_BLOCK) -> None:
    """A (lower triangular, zeros above the diagonal) <- A^-1, in place. Block columns right to left:
    with the trailing block already inverted, V[j1:, j] = -V[j1:, j1:] L[j1:, j] V_jj (one GEMM
    each; the zeros above the diagonal make the triangular product an ordinary one)."""
    k = A.shape[0]
    for j0 in reversed(range(0, k, block)):
        j1 = min(j0 + block, k)
        eye = torch.eye(j1 - j0, dtype=A.dtype, device=A.device)
        Vjj = torch.linalg.solve_triangular(A[j0:j1, j0:j1], eye, upper=False)
        if j1 < k:
            T = A[j1:, j1:] @ A[j1:, j0:j1]  # reads the whole old block column: one temporary
            Vjj.neg_()
            for r0 in range(0, k - j1, block):  # then written back by row blocks
                A[j1 + r0:j1 + r0 + block, j0:j1] = T[r0:r0 + block] @ Vjj
            del T
            Vjj.neg_()
        A[j0:j1, j0:j1] = Vjj


def _zero_upper_(A: torch.Tensor, block: int = FACTOR_BLOCK) -> None:
    """Strict upper triangle of A <- 0, in place."""
    k = A.shape[0]
    for j0 in range(0, k, block):
        j1 = min(j0 + block, k)
        A[j0:j1, j1:] = 0
        A[j0:j1, j0:j1] = A[j0:j1, j0:j1].tril()


def _inverse_cholesky_upper_(H: torch.Tensor, damp: float, max_retries: int) -> tuple[bool, float]:
    """Turn ``H`` in place into V = chol(J (H + damp*mean(diag H)*I) J)^-1 (lower triangular), retrying
    with 10x damp on failure. Returns (ok, damp used). The upper Cholesky factor of the damped
    inverse, which GPTQ's column loop reads row by row, is then U = J V J: ``_u_block`` reads it.

    Why the factor of the *inverse*: GPTQ's column loop needs, for each column j, the row j of the
    inverse Hessian restricted to the not-yet-quantized columns. Those rows are exactly the rows of
    U (the upper Cholesky factor of H^-1), which is cheaper and far more stable than repeatedly
    downdating H^-1. How without forming H^-1: with V = chol(J H J)^-1, J H J = V^-1 V^-T, so
    H^-1 = J V^T V J = (J V J)^T (J V J) and J V J is upper triangular. One Cholesky and one
    triangular inverse (~K^3/1.5 flops), all in H's own memory. Damping keeps H positive definite
    when calibration data is scarce; if that is not enough we damp harder (a damp of 0 becomes
    0.01). On final failure H is left holding J H J (undamped, full) so the caller can still use it.
    """
    mean_diag = float(torch.diag(H).mean())
    _rotate180_(H)
    diag = H.diagonal().clone()
    for _attempt in range(max_retries + 1):
        H.diagonal().add_(damp * mean_diag)
        try:
            ok = _cholesky_lower_(H)
        except (RuntimeError, ValueError):  # torch.linalg.LinAlgError is a RuntimeError
            ok = False
        if ok:  # the backup in the upper triangle is no longer needed
            _zero_upper_(H)
            _invert_lower_(H)
            if bool(torch.isfinite(H.diagonal()).all()):
                return True, damp
        _restore_lower_(H, diag)
        damp = damp * 10 if damp > 0 else 0.01
    return False, damp


def _u_block(V: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    """U[r0:r1, c0:c1] for U = J V J, read from V (a copy: V's rows and columns reversed); V may be a
    batch [B, K, K] (then a block of each)."""
    k = V.shape[-1]
    return V[..., k - r1:k - r0, k - c1:k - c0].flip(-2, -1)


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


def _rows(W: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [W] if isinstance(W, torch.Tensor) else list(W)


def _diff_blocks(parts: list[torch.Tensor], W_hat: torch.Tensor, rows: int, row_range: tuple[int, int] | None = None):
    """(W - W_hat) in float32 blocks of at most ``rows`` rows, W given as stacked row blocks (no
    whole-matrix temporary). With ``row_range`` (r0, r1), ``W_hat`` holds only rows [r0, r1) of W."""
    r0, r1 = row_range or (0, sum(p.shape[0] for p in parts))
    start = 0
    for part in parts:
        a, b = max(r0, start), min(r1, start + part.shape[0])
        for c in range(a, b, rows):
            d = min(c + rows, b)
            yield part[c - start:d - start].to(torch.float32) - W_hat[c - r0:d - r0]
        start += part.shape[0]


def _sq_diff(parts: list[torch.Tensor], W_hat: torch.Tensor, mask: torch.Tensor | None, rows: int = 64,
             row_range: tuple[int, int] | None = None) -> float:
    """sum over (live) columns of (W - W_hat)^2 (float32 per block); see ``_diff_blocks``."""
    total = 0.0
    for d in _diff_blocks(parts, W_hat, rows, row_range):
        if mask is not None:
            d[:, mask] = 0
        total += float((d * d).sum())
    return total


# A solve whose work K^2 (N + K) is at most this runs on one thread (see ``_intra_op_threads``): measured on
# 2 cores, one thread was 15-30% faster below 1e9 (tiny Mixtral: all the solves) and even at 2.7e9 (K 1024,
# 1536 rows); two threads were 20% faster at 1.5e10 (K 2048, 1536 rows)
SMALL_SOLVE_WORK = 2e9


@contextlib.contextmanager
def _intra_op_threads(n: int | None):
    """Run the block with ``n`` intra-op CPU threads (None: unchanged).

    Why: a GPTQ solve is a long sequence of small operations (the column loop: a few on one column of
    every row per step; a small solve's factorization too), each too small to share between threads. A
    thread that must be woken for it costs more than the operation, and waking is what mergequant's CLI
    asks of idle OpenMP threads (they sleep rather than spin, ``cli.idle_threads_sleep``): on a 2-core
    VM each wake-up cost ~0.4 ms, more than the operation itself. Large products (the column loop's
    per-block update, a large solve's factorization) still use every thread."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _small_solves_on_one_thread(work_of: Callable[..., float]):
    """Decorate a solver so that a call whose ``work_of(*args, **kwargs)`` is at most ``SMALL_SOLVE_WORK``
    runs on one intra-op thread (see ``_intra_op_threads``)."""
    def decorate(solve):
        @functools.wraps(solve)
        def run(*args, **kwargs):
            with _intra_op_threads(1 if work_of(*args, **kwargs) <= SMALL_SOLVE_WORK else None):
                return solve(*args, **kwargs)
        return run
    return decorate


def _solve_work(W, H, *_, **__) -> float:
    """K^2 (N + K) of ``gptq_quantize(W, H, ...)`` (the factorization and the column loop)."""
    parts = _rows(W)
    k, n = H.shape[-1], sum(p.shape[0] for p in parts)
    return float(k) * k * (n + k)


def _batch_work(Ws, Hs, *_, **__) -> float:
    """The summed ``_solve_work`` of ``gptq_quantize_batch(Ws, Hs, ...)``."""
    return sum(_solve_work(w, h) for w, h in zip(Ws, Hs) if h is not None)


@_small_solves_on_one_thread(_solve_work)
def gptq_quantize(
    W: torch.Tensor | Sequence[torch.Tensor],
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
    overwrite_h: bool = False,
    row_block_bytes: int = ROW_BLOCK_BYTES,
) -> GPTQResult:
    """Quantize W [N, K] given H [K, K] with GPTQ; see the module docstring for conventions.

    ``W`` may be a list of [N_i, K] row blocks sharing this H (q/k/v, gate/up): they are solved as
    one stacked matrix (GPTQ treats rows independently given H) without concatenating a copy.
    ``overwrite_h`` lets the solver use the caller's H as its workspace (it is destroyed), which
    saves one K x K matrix; otherwise it works on a copy. ``dtype`` is the working precision
    (float32 by default; float64 is for tests).

    Memory: one K x K matrix, a working copy of ``row_block_bytes`` of W's rows (solved one row
    block at a time, all sharing the factorization), uint8 codes [K, N] and small blocks; nothing
    else of the inputs' size.
    Steps: dead input channels -> act-order permutation -> damping + Cholesky of H^-1 -> per row
    block: blocked column loop with error feedback, undo the permutation.
    """
    parts = _rows(W)
    if not parts or any(p.dim() != 2 for p in parts):
        raise ValueError(f"W must be 2-D [N, K] (or a list of such row blocks), got shapes {[tuple(p.shape) for p in parts]}")
    k = parts[0].shape[1]
    if any(p.shape[1] != k for p in parts):
        raise ValueError(f"row blocks of W must share in_features, got {[tuple(p.shape) for p in parts]}")
    n = sum(p.shape[0] for p in parts)
    if tuple(H.shape) != (k, k):
        raise ValueError(f"H must be [K, K] = [{k}, {k}] for W of shape {(n, k)}, got {tuple(H.shape)}")
    _check_args(k, bits, group_size)
    device = parts[0].device
    H = H if overwrite_h and H.dtype == dtype and H.is_contiguous() else H.to(dtype).clone()

    # Dead inputs (never active in calibration) carry no information: any value of W there is
    # unobservable, so it is set to 0 (in each row block below) and H made invertible with a unit
    # diagonal entry.
    dead = torch.diag(H) == 0
    any_dead = bool(dead.any())
    if any_dead:
        H.diagonal()[dead] = 1

    # Act order: quantize the columns with the largest activations first, while there are still
    # many free columns left to absorb their error. (The permuted H is one extra K x K copy.)
    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        H = H[perm][:, perm]
    order = perm if perm is not None else torch.arange(k, device=device)

    mean_diag = float(torch.diag(H).mean())
    ok, damp_used = _inverse_cholesky_upper_(H, damp, max_retries)
    if not ok:  # every attempt failed: RTN, reported by the caller
        W0 = _row_block_t(parts, 0, n, k, torch.float32, device).T  # a fresh copy
        if any_dead:
            W0[:, dead] = 0
        q, scales, zeros = quantize_rtn(W0, bits, group_size, sym)
        g_idx = _group_index(k, group_size, device)
        W_hat = _dequant_from_codes(q, scales, zeros, g_idx)
        # H now holds J H' J (H' = dead-fixed, permuted H): rotate back, undo the dead fix, measure
        _rotate180_(H)
        if any_dead:
            H.diagonal()[dead[order]] = 0
        error = _proxy_error(parts, W_hat, H, order if perm is not None else None)
        return GPTQResult(q.T.to(torch.uint8).contiguous(), scales, zeros.to(torch.int32), g_idx, None,
                          damp_used, True, error)
    V = H  # now the lower-triangular inverse factor; U = J V J
    del H

    # GPTQ treats rows independently given V, so W is solved a block of rows at a time: the float32
    # working copy is ``row_block_bytes``, not the whole [K, N] (the 1B down_proj's is 44 MiB)
    n_groups = 1 if group_size == -1 else k // group_size
    scales = torch.zeros(n_groups, n, dtype=torch.float32, device=device)
    zeros = torch.zeros(n_groups, n, dtype=torch.int32, device=device)
    codes = torch.empty(k, n, dtype=torch.uint8, device=device)  # original column order, [K, N]
    rows = max(1, min(n, row_block_bytes // (k * torch.empty((), dtype=dtype).element_size())))
    obs_loss, sq_diff = 0.0, 0.0
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        Wt = _row_block_t(parts, r0, r1, k, dtype, device)  # [K, r1 - r0], a fresh copy
        if any_dead:
            Wt[dead] = 0
        blk = _solve_rows(Wt, V, perm, bits=bits, group_size=group_size, static_groups=static_groups, sym=sym,
                          block_size=block_size)
        codes[:, r0:r1] = blk.codes
        scales[:, r0:r1] = blk.scales
        zeros[:, r0:r1] = blk.zeros
        obs_loss += float(blk.obs_loss)
        # Wt now holds W_hat^T of these rows in the original column order
        sq_diff += _sq_diff(parts, Wt.T, dead if any_dead else None, row_range=(r0, r1))
        del Wt, blk
    del V

    if perm is None or static_groups or group_size == -1:
        g_idx = _group_index(k, group_size, device)
    else:  # g_idx[perm[j]] = j // group_size
        g_idx = _group_index(k, group_size, device)[torch.argsort(perm)]

    # The OBS identity: quantizing column j and optimally updating the free columns raises the
    # quadratic objective by exactly err_j^2 (err = (w - q) / U_jj), so obs_loss = tr(dW A dW^T) with
    # A = H (dead diagonal set to 1) + damp*mean(diag)*I. Dead columns have dW = 0, so the undamped
    # proxy loss is obs_loss - damp*mean(diag)*||dW||^2, with no K x K product (and no copy of H).
    error = obs_loss - damp_used * mean_diag * sq_diff
    return GPTQResult(
        codes=codes,
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        perm=perm,
        damp_used=float(damp_used),
        fallback_rtn=False,
        error=error,
    )


@_small_solves_on_one_thread(_batch_work)
def gptq_quantize_batch(
    Ws: Sequence[torch.Tensor | Sequence[torch.Tensor]],
    Hs: list[torch.Tensor],
    *,
    bits: int,
    group_size: int = -1,
    sym: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    max_retries: int = 4,
    row_block_bytes: int = ROW_BLOCK_BYTES,
) -> list[GPTQResult]:
    """``gptq_quantize`` of several independent weights of one shape [N, K], each with its own H
    (a mixture of experts' down projections; with routed calibration also each expert's gate and up,
    given as a list of row blocks sharing that expert's H), natural column order, float32: the same
    results as separate calls, with the column loops run as one batch (see ``_solve_rows``).

    ``Hs`` are consumed: each is copied into one [B, K, K] factor stack and released (the caller's
    list is emptied), so the peak is the stack plus one H, not two of everything. Memory: that stack,
    a working copy of ``row_block_bytes`` per weight, and the codes. A weight whose factorization
    fails at every damping is solved on its own (round-to-nearest, as ``gptq_quantize`` does).
    """
    if len(Ws) != len(Hs) or not Ws:
        raise ValueError(f"need one H per weight, got {len(Ws)} weights and {len(Hs)} Hessians")
    parts = [_rows(w) for w in Ws]
    shapes = [(sum(p.shape[0] for p in ps), ps[0].shape[1]) for ps in parts]
    n, k = shapes[0]
    if (any(p.dim() != 2 or p.shape[1] != k for ps in parts for p in ps) or any(sh != (n, k) for sh in shapes)
            or any(tuple(h.shape) != (k, k) for h in Hs)):
        raise ValueError(f"batched weights must share one shape [N, K] and Hessians [K, K]; got "
                         f"{sorted(set(shapes))} and {sorted({tuple(h.shape) for h in Hs})}")
    _check_args(k, bits, group_size)
    device = parts[0][0].device
    B = len(Ws)
    V = torch.empty(B, k, k, dtype=torch.float32, device=device)
    dead, damp_used, mean_diag, failed = [], [], [], {}
    for b in range(B):
        V[b].copy_(Hs[b])
        Hs[b] = None  # the caller's reference goes with the list entry
        d = torch.diag(V[b]) == 0
        if bool(d.any()):
            V[b].diagonal()[d] = 1
        dead.append(d if bool(d.any()) else None)
        mean_diag.append(float(torch.diag(V[b]).mean()))
        ok, used = _inverse_cholesky_upper_(V[b], damp, max_retries)
        damp_used.append(used)
        if not ok:  # V[b] holds J H' J: rebuild that weight's H for a solve of its own
            h = V[b].clone()
            _rotate180_(h)
            if dead[b] is not None:
                h.diagonal()[dead[b]] = 0
            failed[b] = h
            V[b] = torch.eye(k, dtype=torch.float32, device=device)  # a harmless stand-in in the batch
    Hs.clear()

    n_groups = 1 if group_size == -1 else k // group_size
    scales = torch.zeros(B, n_groups, n, dtype=torch.float32, device=device)
    zeros = torch.zeros(B, n_groups, n, dtype=torch.int32, device=device)
    codes = torch.empty(B, k, n, dtype=torch.uint8, device=device)
    rows = max(1, min(n, row_block_bytes // (k * 4)))
    obs_loss = torch.zeros(B, dtype=torch.float64)
    sq_diff = [0.0] * B
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        Wt = torch.empty(B, k, r1 - r0, dtype=torch.float32, device=device)
        for b in range(B):
            Wt[b].copy_(_row_block_t(parts[b], r0, r1, k, torch.float32, device))
            if dead[b] is not None:
                Wt[b][dead[b]] = 0
        blk = _solve_rows(Wt, V, None, bits=bits, group_size=group_size, static_groups=False, sym=sym,
                          block_size=block_size)
        codes[:, :, r0:r1] = blk.codes
        scales[:, :, r0:r1] = blk.scales
        zeros[:, :, r0:r1] = blk.zeros
        obs_loss += blk.obs_loss
        for b in range(B):
            sq_diff[b] += _sq_diff(parts[b], Wt[b].T, dead[b], row_range=(r0, r1))
        del Wt, blk
    del V

    g_idx = _group_index(k, group_size, device)
    out = []
    for b in range(B):
        if b in failed:
            out.append(gptq_quantize(Ws[b], failed.pop(b), bits=bits, group_size=group_size, sym=sym, damp=damp,
                                     block_size=block_size, max_retries=max_retries, overwrite_h=True,
                                     row_block_bytes=row_block_bytes))
            continue
        error = float(obs_loss[b]) - damp_used[b] * mean_diag[b] * sq_diff[b]  # see gptq_quantize
        out.append(GPTQResult(codes=codes[b], scales=scales[b], zeros=zeros[b], g_idx=g_idx, perm=None,
                              damp_used=float(damp_used[b]), fallback_rtn=False, error=error))
    return out


def _row_block_t(parts: list[torch.Tensor], r0: int, r1: int, k: int, dtype, device) -> torch.Tensor:
    """Rows [r0, r1) of the stacked ``parts``, transposed into a fresh [K, r1 - r0] tensor of ``dtype``."""
    out = torch.empty(k, r1 - r0, dtype=dtype, device=device)
    start = 0
    for p in parts:
        a, b = max(r0, start), min(r1, start + p.shape[0])
        if a < b:
            out[:, a - r0:b - r0].copy_(p[a - start:b - start].T)
        start += p.shape[0]
    return out


@dataclass
class _RowBlock:
    codes: torch.Tensor  # uint8 [K, m] ([B, K, m] for a batch), original column order
    scales: torch.Tensor  # float32 [G, m] ([B, G, m])
    zeros: torch.Tensor  # int32 [G, m] ([B, G, m])
    obs_loss: torch.Tensor  # float64 [] ([B]): sum of err^2 per problem


def _find_params_t(wt: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``find_params`` for columns given transposed: ``wt`` [..., g, m] -> (scale, zero) [..., m], each
    of the m rows of W over its g columns."""
    lead, g, m = wt.shape[:-2], wt.shape[-2], wt.shape[-1]
    scale, zero = find_params(wt.transpose(-1, -2).reshape(-1, g), bits, sym)
    return scale.view(*lead, m), zero.view(*lead, m)


def _sub_product_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out -= a @ b, per batch entry for 3-D operands (one GEMM call either way)."""
    if out.dim() == 2:
        out.addmm_(a, b, alpha=-1)
    else:
        out.baddbmm_(a, b, alpha=-1)


def _solve_rows(Wt: torch.Tensor, V: torch.Tensor, perm: torch.Tensor | None, *, bits: int, group_size: int,
                static_groups: bool, sym: bool, block_size: int) -> _RowBlock:
    """GPTQ's column loop for some rows of W, given as Wt [K, m] (dead columns already zeroed), with V
    the inverse factor of the (permuted, damped) H. Leaves W_hat^T in Wt, in the original column order.

    Also solves a batch of independent problems at once: Wt [B, K, m] with V [B, K, K] (no act order):
    the mixture-of-experts down projections, each with its own Hessian. The column loop is a long
    sequence of small operations; batching B problems makes each operation B times larger instead of
    running B times as many, which on a CPU is most of the loop's cost. Every entry gets exactly the
    arithmetic of a solve of its own (2-D operands take the plain, unbatched path)."""
    k, m = Wt.shape[-2:]
    lead = Wt.shape[:-2]
    if lead and perm is not None:
        raise ValueError("a batch of row blocks is solved in natural column order only (no act order)")
    dtype = Wt.dtype
    maxq = 2**bits - 1
    n_groups = 1 if group_size == -1 else k // group_size
    scales = torch.zeros(*lead, n_groups, m, dtype=dtype, device=Wt.device)
    zeros = torch.zeros(*lead, n_groups, m, dtype=dtype, device=Wt.device)
    static = static_groups and group_size != -1
    if static:  # parameters from the original column order, before any error update
        for g, g0 in enumerate(range(0, k, group_size)):
            scales[..., g, :], zeros[..., g, :] = _find_params_t(Wt[..., g0:g0 + group_size, :], bits, sym)
    order = perm if perm is not None else torch.arange(k, device=Wt.device)
    if perm is not None:
        Wt[:] = Wt[perm]  # processing order (a block-sized temporary)
    if group_size == -1:  # one group: parameters from the whole (dead-zeroed) rows up front
        scales[..., 0, :], zeros[..., 0, :] = _find_params_t(Wt, bits, sym)
    Qt = torch.zeros(*lead, k, m, dtype=torch.uint8, device=Wt.device)  # codes (<= 255), processing order
    # sum of err^2: the exact increase of tr(dW A dW^T) (A = damped H), see the caller
    obs_loss = torch.zeros(lead, dtype=torch.float64)

    bs = _effective_block_size(block_size, group_size, dynamic_groups=not static)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        W1 = Wt[..., i1:i2, :].clone()  # this block's columns, updated eagerly one by one
        U1 = _u_block(V, i1, i2, i1, i2).triu()
        Err1 = torch.zeros_like(W1)
        with _intra_op_threads(1):  # (see _intra_op_threads)
            for i in range(i2 - i1):
                j = i1 + i
                if group_size == -1:
                    g = 0
                elif static:
                    g = int(order[j]) // group_size
                else:
                    g = j // group_size
                    if j % group_size == 0:  # new group: min/max of the error-updated weights
                        grp = torch.cat([W1[..., i:, :], Wt[..., i2:j + group_size, :]], dim=-2)[..., :group_size, :]
                        scales[..., g, :], zeros[..., g, :] = _find_params_t(grp, bits, sym)
                w = W1[..., i, :]
                s, z = scales[..., g, :], zeros[..., g, :]
                q = _quantize(w, s, z, maxq)
                Qt[..., j, :] = q
                # OBS update: err / U_jj times row j of U moves the remaining columns to compensate.
                err = (w - _dequantize(q, s, z)) / U1[..., i, i, None]
                # rank-1 update as a GEMM: fastest on CPU
                _sub_product_(W1[..., i:, :], U1[..., i, i:, None], err[..., None, :])
                Err1[..., i, :] = err
        obs_loss += (Err1 * Err1).sum(dim=(-2, -1)).double().cpu()
        # Lazy batch update: apply the whole block's errors to all later columns in one matmul.
        if i2 < k:
            _sub_product_(Wt[..., i2:, :], _u_block(V, i1, i2, i2, k).transpose(-1, -2), Err1)

    # Dequantize into Wt's memory (its columns are no longer needed), then back to the original order.
    # With static groups and act order, groups are not runs of the processing order.
    scales32 = scales.to(torch.float32)
    zeros_i = zeros.round().to(torch.int32)
    Wt.copy_(Qt)
    groups = order // group_size if static and perm is not None else None
    for wt, sc, zr in zip(Wt, scales32, zeros_i) if lead else [(Wt, scales32, zeros_i)]:
        dequantize_t_(wt, sc.to(dtype), zr.to(dtype), groups)
    if perm is not None:
        inv = torch.argsort(perm)
        Qt = Qt[inv]
        Wt[:] = Wt[inv]
    return _RowBlock(Qt, scales32, zeros_i, obs_loss)


def _proxy_error(parts: list[torch.Tensor], W_hat: torch.Tensor, H: torch.Tensor, col_order: torch.Tensor | None,
                 rows: int = 1024) -> float:
    """tr(dW H dW^T) over blocks of rows (W as stacked row blocks); ``col_order`` maps H's column order
    to W's (act order). Only used on the RTN fallback path, where H is still available."""
    H = H.to(torch.float32)
    total = 0.0
    for d in _diff_blocks(parts, W_hat, rows):
        if col_order is not None:
            d = d[:, col_order]
        total += float(((d @ H) * d).sum(dtype=torch.float64))
    return total
