"""model_stock: Model Stock (https://arxiv.org/abs/2403.19522).

With N >= 2 fine-tunes X_i of the base B and offsets d_i = X_i - B, c the mean pairwise cosine of the
offsets (each cosine <d_i, d_j> / max(|d_i| |d_j|, 1e-6), clipped to [-1, 1]):

    t = N c / (1 + (N - 1) c)          out = t * mean_i(X_i) + (1 - t) * B

(t = 0, i.e. the base, where |1 + (N - 1) c| < 1e-6, as mergekit 0.1.5). Statistics: the offsets' Gram
matrix in float64, chunk by chunk. ``filter_wise: true`` computes t per row (the last dimension; a 1-D
tensor is one row); chunks then hold whole rows and each chunk carries its own rows' statistics.
Weights are not used.
"""

from __future__ import annotations

import itertools

import torch

from mergequant.merge.methods._geometry import row_gram, whole_gram
from mergequant.merge.methods.base import GLOBAL, MergeMethod, Param


def stock_t(g: torch.Tensor) -> torch.Tensor:
    """t from the offsets' Gram matrices [..., N, N] (float64)."""
    n = g.shape[-1]
    norms = torch.diagonal(g, dim1=-2, dim2=-1).clamp(min=0).sqrt()
    cos = []
    for i, j in itertools.combinations(range(n), 2):
        cos.append((g[..., i, j] / (norms[..., i] * norms[..., j]).clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))


def _offset(job, i, a, b):
    return job.load(i, a, b, torch.float64) - job.load(job.base_index, a, b, torch.float64)


class ModelStock(MergeMethod):
    name = "model_stock"
    pretty_name = "Model Stock"
    paper = "https://arxiv.org/abs/2403.19522"
    base = "required"
    buffers_per_input = 4  # float64 or stacked copies of the chunks
    min_models = 3
    min_others = 2
    params = (Param("filter_wise", bool, False, GLOBAL, doc="one t per row instead of per tensor"),)

    def merge(self, job) -> None:
        if job.shared.get("filter_wise"):
            for c, a, b in job.ranges(rows=True):
                g = row_gram([_offset(job, i, a, b) for i in job.others], job.cols)
                job.emit(self._mix(job, stock_t(g).to(job.dtype).unsqueeze(1), a, b, rows=True), a)
        else:
            t = float(stock_t(whole_gram(job, job.others, _offset)))
            for c, a, b in job.ranges():
                job.emit(self._mix(job, t, a, b), a)

    def _mix(self, job, t, a, b, rows=False) -> torch.Tensor:
        """t * mean(X_i) + (1 - t) * B in the compute dtype, in mergekit's operation order."""
        xs = [job.load(i, a, b) for i in job.others]
        base = job.load(job.base_index, a, b)
        if rows:
            xs = [x.reshape(-1, job.cols) for x in xs]
            base = base.reshape(-1, job.cols)
        total = xs[0]
        for x in xs[1:]:
            total = total + x
        avg = total / len(xs)
        return (t * avg + (1 - t) * base).reshape(-1)


METHOD = ModelStock()
