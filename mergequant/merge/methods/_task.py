"""The task-arithmetic family's shared machinery: deltas, sparsification, sign consensus, and the two
engine paths (fused numba kernel, torch) that every member uses.

Members (one file each: task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties,
della, della_linear) only declare how they sparsify each delta ``d_i = X_i - B`` and whether the TIES
sign election runs; the combine is always

    out = B + lambda * sum_i w_i d'_i [agreeing sign] / (sum_i w_i [agreeing sign]  if normalize)

Everything in the first half of this file takes tensors and numbers and returns tensors (no I/O), and
keeps the names ``mergequant.merge.methods`` exported before methods became a package.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mergequant.merge import kernels as K
from mergequant.merge.methods.base import GLOBAL, PER_MODEL, REQUIRED, MergeMethod, Param

if TYPE_CHECKING:  # pragma: no cover
    from mergequant.merge.engine import TensorJob


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
# whole-tensor entry points (used by tests as references for the chunked engine)
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
# the family as a method: parameters, statistics pass, combine pass, fused path
# ---------------------------------------------------------------------------------------------------
def family_params(normalize: bool, rescale: bool, *extra: Param,
                  rescale_doc: str = "restore the pruned delta's L1 norm") -> tuple[Param, ...]:
    """The parameters every member has (mergekit's generalized task arithmetic), plus ``extra``."""
    return (
        Param("weight", float, REQUIRED, PER_MODEL, doc="w_i, the input's weight"),
        Param("density", float, 1.0, PER_MODEL, low=0, high=1, low_open=True, doc="fraction of d_i kept"),
        Param("lambda", float, 1.0, GLOBAL, doc="scale of the merged delta"),
        Param("normalize", bool, normalize, GLOBAL, doc="divide by the sum of (agreeing) weights"),
        Param("rescale", bool, rescale, GLOBAL, doc=rescale_doc),
        Param("int8_mask", bool, False, GLOBAL, doc="accepted for mergekit recipes; no numerical effect"),
    ) + extra


@dataclass
class FamilyStats:
    """Per non-base input: the top-k selection (TIES), the rescale factor, how many threshold-equal
    entries earlier chunks saw, and a sparsifier's own state (breadcrumbs, della)."""

    weights: list[float]
    densities: list[float]
    selections: list[Any]
    factors: list[float]
    seen: list[int]
    states: list[Any] = field(default_factory=list)


class TaskArithmeticFamily(MergeMethod):
    """B + lambda * combine(sparsified deltas). Subclasses set ``sparsify``/``consensus`` and parameters;
    a new sparsifier implements :meth:`prune_statistics` and :meth:`prune_chunk`."""

    base = "required"
    min_models = 1

    # ---- a sparsifier's hooks (breadcrumbs, della) ----------------------------------------------------
    def prune_statistics(self, job: "TensorJob", r: int, i: int, stats: FamilyStats) -> Any:
        """Whole-tensor state for pruning input ``i`` (the r-th non-base input); may set stats.factors[r]."""
        return None

    def prune_chunk(self, job: "TensorJob", state: Any, r: int, i: int, c: int, a: int, b: int,
                    d: torch.Tensor) -> torch.Tensor:
        """The pruned (and rescaled, when the rescale is per element) delta of one chunk."""
        return d

    # ---- engine hooks ---------------------------------------------------------------------------------
    def merge(self, job: "TensorJob") -> None:
        if job.fused and self.sparsify in (None, "magnitude", "random"):
            _task_family_fused(self, job)
        else:
            super().merge(job)

    def statistics(self, job: "TensorJob") -> FamilyStats | None:
        others = job.others
        if not others:  # only the base: nothing to add
            return None
        n = job.n
        weights = [float(job.tp.per_model[i]["weight"]) for i in others]
        densities = [float(job.tp.per_model[i].get("density", 1.0)) for i in others]
        rescale = bool(job.shared.get("rescale", False))
        st = FamilyStats(weights, densities, [None] * len(others), [1.0] * len(others), [0] * len(others),
                         [None] * len(others))

        def delta(i, a, b):
            return job.load(i, a, b) - job.load(job.base_index, a, b)

        for k, (i, density) in enumerate(zip(others, densities)):
            if self.sparsify not in (None, "magnitude", "random"):
                st.states[k] = self.prune_statistics(job, k, i, st)
                continue
            if density >= 1:
                continue
            if self.sparsify == "magnitude":
                with job.big_buffer if n > job.chunk else contextlib.nullcontext():
                    mags = torch.empty(n, dtype=torch.float32, device=job.device)
                    for _, a, b in job.ranges():
                        mags[a:b] = delta(i, a, b).abs()
                    sel = st.selections[k] = topk_stats(mags, density)
                    if rescale:
                        seen = [0]

                        def keep_topk(c, a, b, d, sel=sel, seen=seen):
                            m, seen[0] = topk_mask_chunk(d, sel, seen[0])
                            return m

                        st.factors[k] = l1_rescale(job, lambda a, b: mags[a:b], keep_topk)
                    del mags
            elif self.sparsify == "random" and rescale:
                st.factors[k] = l1_rescale(
                    job, lambda a, b, i=i: delta(i, a, b).abs(),
                    lambda c, a, b, d, i=i, density=density: bernoulli_mask(
                        b - a, density, chunk_generator(job.seed, job.name, i, c)).to(d.device))
        return st

    def combine(self, job: "TensorJob", st: FamilyStats | None, c: int, a: int, b: int) -> torch.Tensor:
        bi = job.base_index
        if st is None:
            return job.load(bi, a, b)
        base = job.load(bi, a, b)
        deltas = []
        for k, (i, density) in enumerate(zip(job.others, st.densities)):
            d = job.load(i, a, b) - base
            if self.sparsify not in (None, "magnitude", "random"):
                d = self.prune_chunk(job, st.states[k], k, i, c, a, b, d)
            elif density < 1 and self.sparsify == "magnitude":
                keep, st.seen[k] = topk_mask_chunk(d.abs().float(), st.selections[k], st.seen[k])
                d = torch.where(keep, d, 0)
            elif density < 1 and self.sparsify == "random":
                keep = bernoulli_mask(b - a, density, chunk_generator(job.seed, job.name, i, c)).to(d.device)
                d = torch.where(keep, d, 0)
            if st.factors[k] != 1.0:
                d = d * st.factors[k]
            deltas.append(d)
        return combine_deltas(base, deltas, st.weights, consensus=self.consensus,
                              normalize=bool(job.shared["normalize"]), lam=float(job.shared.get("lambda", 1.0)))


def l1_rescale(job: "TensorJob", abs_delta, keep, rows: bool = False) -> float:
    """DARE-style rescale factor sum|d| / sum|kept d| over a whole tensor, chunk by chunk.
    ``abs_delta(a, b)`` gives |d| of a chunk, ``keep(c, a, b, d)`` its boolean keep-mask."""
    before = after = 0.0
    for c, a, b in job.ranges(rows=rows):
        d = abs_delta(a, b)
        before += float(d.double().sum())
        after += float(d[keep(c, a, b, d)].double().sum())
    return l1_rescale_factor(before, after)


def _task_family_fused(method: TaskArithmeticFamily, job: "TensorJob") -> None:
    """The task-arithmetic family with the fused numba kernel (float32 compute on CPU)."""
    flat, n, seed, tp = job.flat, job.n, job.seed, job.tp
    bi = job.base_index
    others = job.others
    k = len(others)
    weights = [float(tp.per_model[i]["weight"]) for i in others] if others else []
    densities = [float(tp.per_model[i].get("density", 1.0)) for i in others]
    rescale = bool(tp.shared.get("rescale", False))
    mode = [K.MODE_ALL] * k
    thr = [0.0] * k
    cutoff = [-1] * k
    factors = [1.0] * k
    base_flat = flat[bi]

    for r, (i, density) in enumerate(zip(others, densities)):
        if density >= 1:
            continue
        if method.sparsify == "magnitude":
            def chunks(i=i):
                for _, a, b in job.ranges():
                    yield a, K.raw(base_flat[a:b]), K.raw(flat[i][a:b])
            sel = K.topk_threshold(chunks, n, topk_count(n, density))
            if not sel.keep_all:
                mode[r], thr[r], cutoff[r] = K.MODE_THRESHOLD, sel.threshold, sel.cutoff
            if rescale:
                factors[r] = l1_rescale(
                    job, lambda a, b, i=i: (flat[i][a:b].float() - base_flat[a:b].float()).abs(),
                    lambda c, a, b, d, r=r: (d > thr[r]) | ((d == thr[r]) & (torch.arange(a, b) <= cutoff[r]))
                    if mode[r] else torch.ones_like(d, dtype=torch.bool))
        elif method.sparsify == "random":
            mode[r] = K.MODE_MASK
            if rescale:
                factors[r] = l1_rescale(
                    job, lambda a, b, i=i: (flat[i][a:b].float() - base_flat[a:b].float()).abs(),
                    lambda c, a, b, d, i=i, density=density: bernoulli_mask(
                        b - a, density, chunk_generator(seed, tp.name, i, c)))

    lam = float(tp.shared.get("lambda", 1.0))
    need_masks = any(m == K.MODE_MASK for m in mode)
    empty_masks = np.zeros((k, 1), np.uint8)
    for c, a, b in job.ranges():
        masks = empty_masks
        if need_masks:
            masks = np.zeros((k, b - a), np.uint8)
            for r, i in enumerate(others):
                if mode[r] == K.MODE_MASK:
                    masks[r] = bernoulli_mask(b - a, densities[r], chunk_generator(seed, tp.name, i, c)).numpy()
        out, t = K.raw_out(tp.out_dtype, b - a)
        nonfinite = K.combine_chunk(K.raw(base_flat[a:b]), tuple(K.raw(flat[i][a:b]) for i in others), weights, factors,
                                    mode, thr, cutoff, masks, a, out, consensus=method.consensus,
                                    normalize=bool(tp.shared["normalize"]), lam=lam)
        job.emit(t, a, checked_finite=nonfinite == 0)
