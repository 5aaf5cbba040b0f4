"""Merge methods as pure tensor functions, plus the registry that describes their parameters.

Everything here takes tensors and numbers and returns tensors; no I/O. The streaming engine
(``merge/run.py``) applies the same functions chunk by chunk, using the ``*_stats`` helpers
for the few quantities that need the whole tensor (TIES's top-k threshold, DARE's rescale
factor, SLERP's norms and angle).

Formulas follow the papers and mergekit 0.1.5's conventions so published recipes give the
same model (see docs/merge-methods.md):

- linear           out = sum_i w_i X_i / sum_i w_i            (normalize default true)
- task_arithmetic  out = B + lambda * sum_i w_i d_i [/ sum w]  d_i = X_i - B (normalize default false)
- ties             top-k(|d_i|, density) sparsify, majority sign of sum_i w_i d_i, disjoint mean
- dare_ties/linear random keep mask Bernoulli(density), L1 rescale, then ties / linear combine
- slerp            spherical interpolation between base and one other model at ``t``
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

REQUIRED = object()  # marker: the parameter has no default


@dataclass(frozen=True)
class MethodSpec:
    """Declarative description of a merge method: what it needs and which parameters it reads."""

    name: str
    pretty_name: str
    paper: str
    needs_base: bool
    shared: dict = field(default_factory=dict)  # parameter -> default (or REQUIRED)
    per_model: dict = field(default_factory=dict)  # parameter -> default (or REQUIRED)
    per_model_applies_to_base: bool = False  # linear weighs the base like any other input
    min_models: int = 1
    max_models: int | None = None
    sparsify: str | None = None  # None | "magnitude" | "random"
    consensus: bool = False


_TASK_SHARED = {"int8_mask": False, "lambda": 1.0}

METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        MethodSpec("linear", "Linear (model soups)", "https://arxiv.org/abs/2203.05482", needs_base=False,
                   shared={"normalize": True}, per_model={"weight": REQUIRED}, per_model_applies_to_base=True),
        MethodSpec("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089", needs_base=True,
                   shared={**_TASK_SHARED, "normalize": False, "rescale": False},
                   per_model={"weight": REQUIRED, "density": 1.0}),
        MethodSpec("ties", "TIES", "https://arxiv.org/abs/2306.01708", needs_base=True,
                   shared={**_TASK_SHARED, "normalize": True, "rescale": False},
                   per_model={"weight": REQUIRED, "density": 1.0}, sparsify="magnitude", consensus=True),
        MethodSpec("dare_ties", "DARE TIES", "https://arxiv.org/abs/2311.03099", needs_base=True,
                   shared={**_TASK_SHARED, "normalize": False, "rescale": True},
                   per_model={"weight": REQUIRED, "density": 1.0}, sparsify="random", consensus=True),
        MethodSpec("dare_linear", "Linear DARE", "https://arxiv.org/abs/2311.03099", needs_base=True,
                   shared={**_TASK_SHARED, "normalize": False, "rescale": True},
                   per_model={"weight": REQUIRED, "density": 1.0}, sparsify="random"),
        MethodSpec("slerp", "SLERP", "https://en.wikipedia.org/wiki/Slerp", needs_base=True,
                   shared={"t": REQUIRED}, min_models=2, max_models=2),
    ]
}

# Parameters that mergekit knows for some method: tolerated (with a warning) when the chosen method ignores them.
KNOWN_PARAMETERS = {
    "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "t",
    "filter_wise", "select_topk", "nuslerp_flatten", "nuslerp_row_wise", "eps", "maxiter", "tol",
}


# ---------------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------------
def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """Weighted average (or sum when ``normalize`` is false), accumulated in the tensors' dtype."""
    out = torch.zeros_like(tensors[0])
    for x, w in zip(tensors, weights):
        out.add_(x, alpha=w)
    if normalize:
        out.div_(float(torch.tensor(weights, dtype=out.dtype).sum()))  # the weight sum in the compute dtype
    return out


# ---------------------------------------------------------------------------------------------------
# task arithmetic family: deltas, sparsification, sign consensus
# ---------------------------------------------------------------------------------------------------
def combine_deltas(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], *, consensus: bool,
                   normalize: bool, lam: float, int8_mask: bool = False) -> torch.Tensor:
    """B + lambda * (weighted, optionally sign-elected and normalized) sum of already-sparsified deltas.

    With ``consensus`` (TIES): the elected sign is sign(sum_i w_i d_i) with 0 -> +1; only
    entries whose sign agrees contribute, and the normalizer counts only their weights (pruned
    zeros have sign 0 and never agree). Without it the normalizer is sum_i w_i.
    """
    # Weights are rounded to the compute dtype and the sums over inputs are single reductions over a
    # stacked tensor (torch accumulates bf16/fp16 sums in float32 and rounds once), as mergekit does:
    # in float32 this is the plain sequential sum; with --mergekit-dtype bf16 it makes the result
    # identical to mergekit's (summing in bf16 input by input rounded after every addition).
    w_t = torch.tensor(weights, dtype=base.dtype, device=base.device)
    weighted = torch.stack([d * w for d, w in zip(deltas, w_t)])
    if consensus:
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(base.dtype)
        agree = weighted.sign() == elected
        mixed = torch.where(agree, weighted, 0).sum(0)
        divisor = (w_t.reshape((-1,) + (1,) * base.dim()) * agree.to(base.dtype)).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = float(torch.tensor(weights, dtype=base.dtype).sum())  # summed in the compute dtype, as the kernel does
        if abs(divisor) < 1e-8:
            divisor = 1.0
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


def topk_count(numel: int, density: float) -> int:
    """How many entries TIES keeps: int(density * n), at least one (as mergekit)."""
    return max(1, int(density * numel))


@dataclass(frozen=True)
class TopK:
    """An exact top-k selection over |d| expressed as a threshold: keep every value above
    ``threshold`` and the first ``quota_at_threshold`` values equal to it (flat order)."""

    threshold: float
    quota_at_threshold: int
    keep_all: bool = False


def topk_stats(magnitudes: torch.Tensor, density: float) -> TopK:
    """Exact top-k threshold in O(n) (a selection, not a sort). ``magnitudes`` is flat |d|."""
    n = magnitudes.numel()
    if density >= 1 or n == 0:
        return TopK(0.0, 0, keep_all=True)
    k = topk_count(n, density)
    thr = torch.kthvalue(magnitudes, n - k + 1).values
    above = int((magnitudes > thr).sum())
    return TopK(float(thr), k - above)


def topk_mask_chunk(magnitudes: torch.Tensor, sel: TopK, equal_seen: int) -> tuple[torch.Tensor, int]:
    """The keep-mask of one flat chunk given the whole-tensor selection and the number of
    threshold-equal values already seen in earlier chunks. Returns (mask, new equal_seen)."""
    if sel.keep_all:
        return torch.ones_like(magnitudes, dtype=torch.bool), equal_seen
    thr = torch.tensor(sel.threshold, dtype=magnitudes.dtype)
    keep = magnitudes > thr
    equal = magnitudes == thr
    n_equal = int(equal.sum())
    if n_equal:
        rank = torch.cumsum(equal.to(torch.int64), 0) + equal_seen
        keep |= equal & (rank <= sel.quota_at_threshold)
    return keep, equal_seen + n_equal


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly the k = int(density * n) largest-|d| entries (ties broken by position), zero the rest."""
    flat = delta.reshape(-1)
    mags = flat.abs().float()
    keep, _ = topk_mask_chunk(mags, topk_stats(mags, density), 0)
    return torch.where(keep, flat, 0).reshape(delta.shape)


def chunk_generator(seed: int, tensor_name: str, model_index: int, chunk_index: int) -> torch.Generator:
    """A generator for DARE masks that depends only on (seed, tensor, input, chunk): results are
    reproducible whatever the thread schedule or the order tensors are processed in."""
    digest = hashlib.sha256(f"{seed}|{tensor_name}|{model_index}|{chunk_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def bernoulli_mask(numel: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """A boolean keep-mask with P(keep) = density."""
    if density >= 1:
        return torch.ones(numel, dtype=torch.bool)
    return torch.rand(numel, generator=generator) < density


def l1_rescale_factor(l1_before: float, l1_after: float, eps: float = 1e-7) -> float:
    """DARE's rescale: restore the L1 norm of the delta after masking (1 when either norm is ~0)."""
    if l1_before < eps or l1_after < eps:
        return 1.0
    return l1_before / l1_after


# ---------------------------------------------------------------------------------------------------
# whole-tensor entry points (used directly for small tensors and by tests)
# ---------------------------------------------------------------------------------------------------
def task_arithmetic(base, tensors, weights, *, lam=1.0, normalize=False):
    return combine_deltas(base, [x - base for x in tensors], weights, consensus=False, normalize=normalize, lam=lam)


def ties(base, tensors, weights, densities, *, lam=1.0, normalize=True):
    deltas = [magnitude_prune(x - base, d) for x, d in zip(tensors, densities)]
    return combine_deltas(base, deltas, weights, consensus=True, normalize=normalize, lam=lam)


def dare(base, tensors, weights, densities, *, seed=0, name="", consensus=True, rescale=True, lam=1.0,
         normalize=False):
    """DARE on whole tensors (one chunk): random drop at rate 1 - density, L1 rescale, then combine."""
    deltas = []
    for i, (x, density) in enumerate(zip(tensors, densities)):
        d = (x - base).reshape(-1)
        keep = bernoulli_mask(d.numel(), density, chunk_generator(seed, name, i, 0))
        masked = torch.where(keep, d, 0)
        if rescale and density < 1:
            masked = masked * l1_rescale_factor(float(d.abs().sum()), float(masked.abs().sum()))
        deltas.append(masked.reshape(base.shape))
    return combine_deltas(base, deltas, weights, consensus=consensus, normalize=normalize, lam=lam)


# ---------------------------------------------------------------------------------------------------
# slerp
# ---------------------------------------------------------------------------------------------------
DOT_THRESHOLD = 0.9995


def slerp_coefficients(t: float, norm0: float, norm1: float, raw_dot: float, eps: float = 1e-8) -> tuple[float, float]:
    """Coefficients (c0, c1) so that out = c0 * v0 + c1 * v1, from the norms and the raw dot <v0, v1>.

    Directions are compared after normalizing to unit length; nearly parallel (|cos| > 0.9995)
    pairs fall back to linear interpolation.
    """
    n0 = norm0 if norm0 > eps else 1.0
    n1 = norm1 if norm1 > eps else 1.0
    dot = max(-1.0, min(1.0, raw_dot / (n0 * n1)))
    if abs(dot) > DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (treated as flat vectors)."""
    a = v0.reshape(-1).double()
    b = v1.reshape(-1).double()
    c0, c1 = slerp_coefficients(t, float(a.norm()), float(b.norm()), float(a @ b))
    return (c0 * v0 + c1 * v1).to(v0.dtype)
