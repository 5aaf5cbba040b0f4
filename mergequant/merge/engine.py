"""Compute one output tensor from lazy inputs, chunk by chunk, writing each chunk straight to disk.

Inputs are memory-mapped views, so a chunk reads only its slice of each input file. Two paths
compute the same formulas: fused numba kernels (CPU, float32 compute; see ``kernels.py``) and
plain torch operations (CUDA, float64 inputs, ``--mergekit-dtype``, or no numba).

Inputs of one tensor may come in any mix of floating dtypes (a bf16 base with an fp16 or fp32
fine-tune is common). Each path casts every input chunk once to its compute dtype (float32, float64
when an input is float64, or the ``--mergekit-dtype`` dtype) and rounds once to the output dtype, so
a mixed merge gives the same bytes as the same merge over float32 copies of its inputs. Peak memory per
tensor is a few chunks per input; only the torch path's TIES threshold needs one float32 copy of
|delta| for a whole tensor. Nothing here depends on how many layers the model has.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable

import numpy as np
import torch

from mergequant.merge import kernels as K
from mergequant.merge import methods as M
from mergequant.merge.plan import MergePlan, TensorPlan

CHUNK = 1 << 20  # elements per chunk (4 MiB in float32, cache-friendly); fixed, because DARE's random masks are drawn per chunk

# Only one whole-tensor |delta| buffer (TIES) at a time, so two workers on the two largest tensors
# (embeddings and lm_head) cannot double the peak.
_BIG_BUFFER = threading.Lock()


def _ranges(n: int):
    for c, a in enumerate(range(0, n, CHUNK)):
        yield c, a, min(n, a + CHUNK)


def merge_tensor(plan: MergePlan, tp: TensorPlan, write: Callable[[torch.Tensor, int], None], *, seed: int = 0,
                 device: torch.device = torch.device("cpu")) -> bool:
    """Merge ``tp`` and hand each output chunk to ``write(chunk, element_offset)``.

    Returns False when the merged tensor contains NaN or inf (the caller warns), else True.
    """
    flat = [plan.checkpoints[ref].get(name).reshape(-1) for ref, name in tp.inputs]
    if tp.copy_index is not None:
        src = flat[tp.copy_index]
        for _, a, b in _ranges(src.numel()):
            write(src[a:b].to(tp.out_dtype), a)
        return True

    any64 = any(x.dtype == torch.float64 for x in flat)
    acc = torch.float64 if any64 else torch.float32  # accumulation dtype of linear/slerp (and of our task methods)
    rounding = tp.compute_dtype  # --mergekit-dtype: inputs rounded to mergekit's compute dtype first (see plan.py)
    task_dtype = rounding if rounding is not None else acc

    def load(i: int, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        x = flat[i][a:b]
        if rounding is not None:
            x = x.to(rounding)
        return x.to(device=device, dtype=dtype)

    n = tp.numel
    ref_index = tp.base_index if tp.base_index is not None else 0
    if tp.merge_rows is not None:  # vocabulary mismatch: merge the shared rows, copy the rest from the reference
        n = tp.merge_rows * (tp.numel // tp.shape[0])
        tail = flat[ref_index]
        for _, a, b in _ranges(tp.numel - n):
            write(tail[n + a:n + b].to(tp.out_dtype), n + a)

    finite = True

    def emit(out: torch.Tensor, a: int, checked_finite: bool | None = None) -> None:
        nonlocal finite
        if checked_finite is False or (checked_finite is None and finite and not bool(torch.isfinite(out).all())):
            finite = False
        write(out.to(device="cpu", dtype=tp.out_dtype), a)

    spec = plan.spec
    fused = K.AVAILABLE and device.type == "cpu" and rounding is None and acc == torch.float32
    if spec.name == "linear" and fused:
        weights = [p["weight"] for p in tp.per_model]
        for _, a, b in _ranges(n):
            out, t = K.raw_out(tp.out_dtype, b - a)
            bad = K.linear_chunk(tuple(K.raw(x[a:b]) for x in flat), weights, bool(tp.shared["normalize"]), out)
            emit(t, a, checked_finite=bad == 0)
    elif spec.name == "linear":
        weights = [p["weight"] for p in tp.per_model]
        for _, a, b in _ranges(n):
            emit(M.linear([load(i, a, b, acc) for i in range(len(flat))], weights, tp.shared["normalize"]), a)
    elif spec.name == "slerp":
        _slerp(tp, flat, load, acc, n, emit)
    elif fused:
        _task_family_fused(plan, tp, flat, n, emit, seed)
    else:
        _task_family(plan, tp, flat, load, task_dtype, n, emit, seed, device)
    return finite


def _l1_rescale(abs_delta: Callable, keep: Callable, n: int) -> float:
    """DARE-style rescale factor sum|d| / sum|kept d| over a whole tensor, chunk by chunk.
    ``abs_delta(a, b)`` gives |d| of a chunk, ``keep(c, a, b, d)`` its boolean keep-mask."""
    before = after = 0.0
    for c, a, b in _ranges(n):
        d = abs_delta(a, b)
        before += float(d.double().sum())
        after += float(d[keep(c, a, b, d)].double().sum())
    return M.l1_rescale_factor(before, after)


def _slerp(tp, flat, load, acc, n, emit):
    bi = tp.base_index
    oi = 1 - bi
    n0 = n1 = dot = 0.0
    for _, a, b in _ranges(n):
        x, y = load(bi, a, b, torch.float64), load(oi, a, b, torch.float64)
        n0 += float(x @ x)
        n1 += float(y @ y)
        dot += float(x @ y)
    c0, c1 = M.slerp_coefficients(float(tp.shared["t"]), math.sqrt(n0), math.sqrt(n1), dot)
    for _, a, b in _ranges(n):
        emit(c0 * load(bi, a, b, acc) + c1 * load(oi, a, b, acc), a)


def _task_family(plan, tp, flat, load, dtype, n, emit, seed, device):
    spec = plan.spec
    bi = tp.base_index
    others = [i for i in range(len(flat)) if i != bi]
    if not others:  # only the base: nothing to add
        for _, a, b in _ranges(n):
            emit(load(bi, a, b, dtype), a)
        return
    weights = [float(tp.per_model[i]["weight"]) for i in others]
    densities = [float(tp.per_model[i].get("density", 1.0)) for i in others]
    rescale = bool(tp.shared.get("rescale", False))

    def delta(i, a, b):
        return load(i, a, b, dtype) - load(bi, a, b, dtype)

    # ---- pass 1: whole-tensor statistics --------------------------------------------------------
    selections: list[M.TopK | None] = [None] * len(others)
    factors = [1.0] * len(others)
    for k, (i, density) in enumerate(zip(others, densities)):
        if density >= 1:
            continue
        if spec.sparsify == "magnitude":
            with _BIG_BUFFER if n > CHUNK else contextlib.nullcontext():
                mags = torch.empty(n, dtype=torch.float32, device=device)
                for _, a, b in _ranges(n):
                    mags[a:b] = delta(i, a, b).abs()
                sel = selections[k] = M.topk_stats(mags, density)
                if rescale:
                    seen = [0]

                    def keep_topk(c, a, b, d, sel=sel, seen=seen):
                        m, seen[0] = M.topk_mask_chunk(d, sel, seen[0])
                        return m

                    factors[k] = _l1_rescale(lambda a, b: mags[a:b], keep_topk, n)
                del mags
        elif spec.sparsify == "random" and rescale:
            factors[k] = _l1_rescale(
                lambda a, b, i=i: delta(i, a, b).abs(),
                lambda c, a, b, d, i=i, density=density: M.bernoulli_mask(
                    b - a, density, M.chunk_generator(seed, tp.name, i, c)).to(d.device), n)

    # ---- pass 2: combine chunk by chunk -----------------------------------------------------------
    seen = [0] * len(others)
    lam = float(tp.shared.get("lambda", 1.0))
    for c, a, b in _ranges(n):
        base = load(bi, a, b, dtype)
        deltas = []
        for k, (i, density) in enumerate(zip(others, densities)):
            d = load(i, a, b, dtype) - base
            if density < 1 and spec.sparsify == "magnitude":
                keep, seen[k] = M.topk_mask_chunk(d.abs().float(), selections[k], seen[k])
                d = torch.where(keep, d, 0)
            elif density < 1 and spec.sparsify == "random":
                keep = M.bernoulli_mask(b - a, density, M.chunk_generator(seed, tp.name, i, c)).to(d.device)
                d = torch.where(keep, d, 0)
            if factors[k] != 1.0:
                d = d * factors[k]
            deltas.append(d)
        emit(M.combine_deltas(base, deltas, weights, consensus=spec.consensus, normalize=bool(tp.shared["normalize"]),
                              lam=lam), a)


def _task_family_fused(plan, tp, flat, n, emit, seed):
    """The task-arithmetic family with the fused numba kernel (float32 compute on CPU)."""
    spec = plan.spec
    bi = tp.base_index
    others = [i for i in range(len(flat)) if i != bi]
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
        if spec.sparsify == "magnitude":
            def chunks(i=i):
                for _, a, b in _ranges(n):
                    yield a, K.raw(base_flat[a:b]), K.raw(flat[i][a:b])
            sel = K.topk_threshold(chunks, n, M.topk_count(n, density))
            if not sel.keep_all:
                mode[r], thr[r], cutoff[r] = K.MODE_THRESHOLD, sel.threshold, sel.cutoff
            if rescale:
                factors[r] = _l1_rescale(
                    lambda a, b, i=i: (flat[i][a:b].float() - base_flat[a:b].float()).abs(),
                    lambda c, a, b, d, r=r: (d > thr[r]) | ((d == thr[r]) & (torch.arange(a, b) <= cutoff[r]))
                    if mode[r] else torch.ones_like(d, dtype=torch.bool), n)
        elif spec.sparsify == "random":
            mode[r] = K.MODE_MASK
            if rescale:
                factors[r] = _l1_rescale(
                    lambda a, b, i=i: (flat[i][a:b].float() - base_flat[a:b].float()).abs(),
                    lambda c, a, b, d, i=i, density=density: M.bernoulli_mask(
                        b - a, density, M.chunk_generator(seed, tp.name, i, c)), n)

    lam = float(tp.shared.get("lambda", 1.0))
    need_masks = any(m == K.MODE_MASK for m in mode)
    empty_masks = np.zeros((k, 1), np.uint8)
    for c, a, b in _ranges(n):
        masks = empty_masks
        if need_masks:
            masks = np.zeros((k, b - a), np.uint8)
            for r, i in enumerate(others):
                if mode[r] == K.MODE_MASK:
                    masks[r] = M.bernoulli_mask(b - a, densities[r], M.chunk_generator(seed, tp.name, i, c)).numpy()
        out, t = K.raw_out(tp.out_dtype, b - a)
        nonfinite = K.combine_chunk(K.raw(base_flat[a:b]), tuple(K.raw(flat[i][a:b]) for i in others), weights, factors,
                                    mode, thr, cutoff, masks, a, out, consensus=spec.consensus,
                                    normalize=bool(tp.shared["normalize"]), lam=lam)
        emit(t, a, checked_finite=nonfinite == 0)
