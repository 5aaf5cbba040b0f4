"""linear: the weighted average of the inputs (model soups, https://arxiv.org/abs/2203.05482).

    out = sum_i w_i X_i / sum_i w_i        (normalize: true, the default; false gives the weighted sum)

The base model, when the recipe names one, is an input like any other and needs its own weight.
Accumulated in float32 (float64 for float64 inputs) even under --mergekit-dtype, as mergekit does.
"""

from __future__ import annotations

import torch

from mergequant.merge import kernels as K
from mergequant.merge.methods.base import GLOBAL, PER_MODEL, REQUIRED, MergeMethod, Param


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """Weighted average (or sum when ``normalize`` is false), accumulated in the tensors' dtype."""
    out = torch.zeros_like(tensors[0])
    for x, w in zip(tensors, weights):
        out.add_(x, alpha=w)
    if normalize:
        out.div_(float(torch.tensor(weights, dtype=out.dtype).sum()))  # the weight sum in the compute dtype
    return out


class Linear(MergeMethod):
    name = "linear"
    pretty_name = "Linear (model soups)"
    paper = "https://arxiv.org/abs/2203.05482"
    base = "ignored"
    weighted_sum = True
    params = (
        Param("weight", float, REQUIRED, PER_MODEL, doc="w_i (the base too)"),
        Param("normalize", bool, True, GLOBAL, doc="divide by sum_i w_i"),
    )

    def merge(self, job) -> None:
        tp, flat = job.tp, job.flat
        weights = [p["weight"] for p in tp.per_model]
        if job.fused:
            for _, a, b in job.ranges():
                out, t = K.raw_out(tp.out_dtype, b - a)
                bad = K.linear_chunk(tuple(K.raw(x[a:b]) for x in flat), weights, bool(tp.shared["normalize"]), out)
                job.emit(t, a, checked_finite=bad == 0)
        else:
            for _, a, b in job.ranges():
                job.emit(linear([job.load(i, a, b, job.acc) for i in range(len(flat))], weights, tp.shared["normalize"]), a)


METHOD = Linear()
