"""Low-rank factoring of one weight delta: ``delta ~= B @ A`` with the rank chosen by a cap and/or an energy.

Pure functions, no I/O: shared by ``extract-lora`` (delta = fine-tune - base, see ``extract.py``) and by
merges written as an adapter (delta = merged - base, see ``merge/run.py``), so both give the same factors
for the same delta.

Facts used (Eckart-Young): the best rank-k approximation in Frobenius norm keeps the k largest singular
triplets, and its squared error is the sum of the squared singular values left out. So the relative
error of what we keep is ``sqrt(1 - sum_{i<k} s_i^2 / ||D||_F^2)``, known from the singular values alone.

Factors split the singular values evenly, ``A = sqrt(S) V^T`` and ``B = U sqrt(S)`` (as mergekit does):
both factors have the same scale, which keeps bf16/fp16 adapters accurate, and peft's scale is 1 when
``lora_alpha = r``.

Two ways to get the top singular triplets:

- ``exact``: ``torch.linalg.svd`` of the whole delta (float32, float64 for float64 input). Cost
  ~ m n min(m, n); needed when the energy rule may want any rank.
- ``randomized``: a range finder (Halko, Martinsson, Tropp 2011, alg. 4.4): ``Q = orth(D G)`` for a
  Gaussian ``G`` with ``rank + oversample`` columns, refined by power iterations, then the SVD of the small
  ``Q^T D``. Cost ~ m n (rank + oversample) per pass: for a rank-64 adapter of 2048 x 5632 matrices about
  20x less than the exact SVD. What it returns is an orthogonal projection of D, so the error it reports
  is the true error of the factors written (never the optimum's, which it can only approach).

``auto`` takes the randomized path when the requested rank is small next to the matrix (see
:func:`choose_method`) and no uncapped energy target needs the whole spectrum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergequant.errors import MergeQuantError

METHODS = ("auto", "exact", "randomized")
OVERSAMPLE = 16  # extra sketch columns of the randomized range finder
POWER_ITERS = 4  # subspace iterations: within ~0.5% of the optimal error even on flat (noise) spectra
RANDOMIZED_MIN_DIM = 512  # below this the exact SVD is cheap anyway


@dataclass(frozen=True)
class Factors:
    """``delta ~= B @ A``: ``A`` [rank, in], ``B`` [out, rank] (float32/float64), ``error`` the relative
    Frobenius error ``||D - B A|| / ||D||`` (0 for a zero delta), ``energy`` the kept fraction of
    ``||D||^2``, ``method`` the SVD actually used."""

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    error: float
    energy: float
    method: str
    norm_sq: float = 0.0  # ||delta||_F^2 (the card weighs per-type errors by it)


def check_rank_energy(rank: int | None, energy: float | None, where: str = "") -> None:
    """One clear line for a rank or energy that cannot work (rank <= 0, energy outside (0, 1])."""
    pre = f"{where}: " if where else ""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise MergeQuantError(f"{pre}rank must be a positive integer, got {rank!r}")
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not (0 < float(energy) <= 1):
            raise MergeQuantError(f"{pre}energy must be in (0, 1] (the fraction of the delta's squared norm to keep), "
                                  f"got {energy!r}")
    if rank is None and energy is None:
        raise MergeQuantError(f"{pre}give a rank, an energy, or both")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise MergeQuantError(f"svd method must be one of {', '.join(METHODS)}, got {method!r}")


def numerical_rank(s: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Singular values above rounding noise of the compute dtype (numpy's ``matrix_rank`` rule): a delta of
    rank 4 gives 4, not the cap, so exact low-rank deltas get exact small adapters."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = float(s[0]) * max(shape) * torch.finfo(dtype).eps
    return int((s > tol).sum())


def energy_rank(s: torch.Tensor, total_sq: float, energy: float) -> int | None:
    """Smallest k with ``sum_{i<k} s_i^2 >= energy * total_sq``, or None when the given singular values
    do not hold that much (a randomized sketch may be too small)."""
    if total_sq == 0.0:
        return 0
    cum = torch.cumsum(s.to(torch.float64) ** 2, 0)
    # a tiny relative slack, so that energy=1 is met by the full spectrum despite rounding of the sums
    hit = torch.nonzero(cum >= energy * total_sq * (1 - 1e-12)).flatten()
    return int(hit[0]) + 1 if hit.numel() else None


def choose_method(shape: tuple[int, int], rank: int | None, energy: float | None, method: str = "auto") -> str:
    """``exact`` or ``randomized`` for a delta of ``shape``: randomized only pays when the sketch
    (rank + oversample columns) is well under the smaller dimension, and it needs a rank cap."""
    check_method(method)
    if method != "auto":
        return method
    small = min(shape)
    if rank is None or small < RANDOMIZED_MIN_DIM or 4 * (rank + OVERSAMPLE) > small:
        return "exact"
    return "randomized"


def _compute_dtype(delta: torch.Tensor) -> torch.dtype:
    return torch.float64 if delta.dtype == torch.float64 else torch.float32


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:k].sqrt()
    return vh[:k] * root[:, None], u[:, :k] * root[None, :]


def _randomized_top(d: torch.Tensor, width: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``width`` singular triplets of ``d`` by a randomized range finder with power iterations (QR
    after every product keeps the small singular directions from drowning in rounding)."""
    m, n = d.shape
    g = torch.randn(n, width, generator=generator, dtype=d.dtype)
    q = torch.linalg.qr(d @ g).Q
    for _ in range(POWER_ITERS):
        z = torch.linalg.qr(d.T @ q).Q
        q = torch.linalg.qr(d @ z).Q
    small = q.T @ d  # [width, n], n may be a vocabulary: SVD it through its QR (a wide gesdd is slow)
    q2, r = torch.linalg.qr(small.T)  # small = r^T q2^T
    ur, s, vrh = torch.linalg.svd(r.T, full_matrices=False)  # r^T = ur s vrh
    return q @ ur, s, vrh @ q2.T


def factor_delta(delta: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                 method: str = "auto", seed: int = 0) -> Factors:
    """Factor a 2-D ``delta`` [out, in] as ``B @ A`` with the smallest rank that meets the rules:

    - at most ``rank`` (the cap), at most the numerical rank (noise singular values are never kept);
    - with ``energy``, the smallest k holding that fraction of ``||delta||_F^2`` (still capped by ``rank``).

    Returns float32 factors (float64 for float64 input); the caller rounds them once when writing. A
    zero delta gives rank 0 (empty factors): the caller leaves such a module out of the adapter.
    """
    check_rank_energy(rank, energy)
    if delta.dim() != 2:
        raise MergeQuantError(f"can only factor a 2-D delta, got shape {tuple(delta.shape)}")
    dtype = _compute_dtype(delta)
    d = delta.to(dtype)
    m, n = d.shape
    total_sq = float(torch.linalg.vector_norm(d)) ** 2  # torch sums pairwise: float32 is accurate to ~1e-6 here
    how = choose_method((m, n), rank, energy, method)
    if total_sq == 0.0 or not torch.isfinite(torch.tensor(total_sq)):
        if total_sq != 0.0:
            raise MergeQuantError("the delta holds NaN or inf values")
        return Factors(d.new_zeros(0, n), d.new_zeros(m, 0), 0, 0.0, 1.0, how, 0.0)
    if how == "randomized":
        width = min(rank + OVERSAMPLE, min(m, n))
        gen = torch.Generator().manual_seed(seed)
        u, s, vh = _randomized_top(d, width, gen)
    else:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = min(numerical_rank(s, (m, n), dtype), rank if rank is not None else len(s))
    if energy is not None:
        e = energy_rank(s, total_sq, float(energy))
        k = min(k, e) if e is not None else k
    k = max(k, 1)
    a, b = _split(u, s, vh, k)
    if how == "exact":  # Eckart-Young: the squared error is the tail of the spectrum (no cancellation)
        left_sq = float((s[k:].to(torch.float64) ** 2).sum())
    else:  # the sketch does not hold the tail: measure the residual itself, in row blocks
        left_sq = residual_sq(d, a, b)
    error = min(1.0, left_sq / total_sq) ** 0.5
    return Factors(a.contiguous(), b.contiguous(), k, error, max(0.0, 1.0 - error * error), how, total_sq)


def residual_sq(d: torch.Tensor, a: torch.Tensor, b: torch.Tensor, block_bytes: int = 64 << 20) -> float:
    """``||d - b @ a||_F^2`` in float64 sums, a block of rows at a time (a 32000-row embedding's
    residual never exists whole)."""
    rows = max(1, block_bytes // max(1, d.shape[1] * d.element_size()))
    total = 0.0
    for i in range(0, d.shape[0], rows):
        r = d[i:i + rows] - b[i:i + rows] @ a
        total += float(torch.linalg.vector_norm(r)) ** 2
    return total


def relative_error(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """``||delta - B A||_F / ||delta||_F`` computed directly (for checks; the factoring gets it from the
    singular values)."""
    d = delta.to(torch.float64)
    den = float(torch.linalg.vector_norm(d))
    if den == 0.0:
        return 0.0
    return float(torch.linalg.vector_norm(d - b.to(torch.float64) @ a.to(torch.float64))) / den
