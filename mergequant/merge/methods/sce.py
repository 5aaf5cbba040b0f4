"""sce: Select, Calculate, Erase (FuseChat, https://arxiv.org/abs/2408.07990).

Task vectors d_i = X_i - B (no per-model weight).

- Select (``select_topk`` < 1): keep, in every d_i, the positions with the largest variance across the
  d_i (population variance), int(select_topk * #non-zero variances) of them; ties by position.
- Calculate: c_i = mean(d_i^2) / sum_j mean(d_j^2) over the (selected) tensor.
- Erase: the TIES sign election on sum_i d_i; entries whose sign disagrees (and zeros) drop out.

    out = B + sum_i c_i d_i [agree] / max(sum_i c_i [agree], 1e-6)

Statistics: the variance cut-off (exact streamed selection) and the c_i, chunk by chunk.

**mergekit 0.1.5 quirk fixed**: it falls back to equal c_i whenever sum_j mean(d_j^2) < 1e-6, an
absolute threshold that real fine-tunes (|d| ~ 1e-3 or less) are always under, so its "calculate" step
is silently a no-op on real models. We use equal c_i only when that sum is exactly 0 (no change at all),
as the paper's ratio intends; above 1e-6 both agree.
"""

from __future__ import annotations

import torch

from mergequant.merge.methods._select import RankWindow
from mergequant.merge.methods.base import GLOBAL, MergeMethod, Param


def sce_weights(mean_squares: list[float]) -> list[float]:
    """c_i = s_i / sum_j s_j; equal when the sum is 0."""
    total = sum(mean_squares)
    if total <= 0:
        return [1.0 / len(mean_squares)] * len(mean_squares)
    return [s / total for s in mean_squares]


def population_variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Variance across the inputs at each position (divided by k), computed like torch's CPU ``var``
    over the stacked inputs (Welford's recurrence in float64, rounded once: the same bits), without its
    slow strided reduction over a short leading dimension."""
    mean = deltas[0].double()
    m2 = torch.zeros_like(mean)
    for n, x in enumerate(deltas[1:], start=2):
        x = x.double()
        step = x - mean
        mean = mean + step / n
        m2 = m2 + step * (x - mean)
    return (m2 / len(deltas)).to(deltas[0].dtype)


def sce_combine(base: torch.Tensor, deltas: list[torch.Tensor], c: list[float]) -> torch.Tensor:
    """B + sign-consensus weighted mean of the (selected) deltas with coefficients c."""
    tv = torch.stack(deltas)
    elected = torch.where(tv.sum(0) >= 0, 1.0, -1.0).to(tv.dtype)
    agree = (tv.sign() == elected).to(tv.dtype)
    cw = torch.tensor(c, dtype=tv.dtype, device=tv.device).reshape((-1,) + (1,) * base.dim()) * agree
    return base + (tv * cw).sum(0) / cw.sum(0).clamp(min=1e-6)


class Sce(MergeMethod):
    name = "sce"
    pretty_name = "SCE"
    paper = "https://arxiv.org/abs/2408.07990"
    base = "required"
    buffers_per_input = 4  # float64 or stacked copies of the chunks
    params = (
        Param("select_topk", float, 1.0, GLOBAL, low=0, high=1, low_open=True,
              doc="fraction of positions kept, by variance across the models"),
        Param("int8_mask", bool, False, GLOBAL, doc="accepted for mergekit recipes; no numerical effect"),
    )

    def _deltas(self, job, a, b):
        base = job.load(job.base_index, a, b)
        return base, [job.load(i, a, b) - base for i in job.others]

    def _variance(self, job, a, b):
        return population_variance(self._deltas(job, a, b)[1])

    def statistics(self, job):
        if not job.others:
            return None
        window = None
        topk = float(job.shared.get("select_topk", 1.0))
        if topk < 1:
            def variances():
                for _, a, b in job.ranges():
                    yield self._variance(job, a, b)

            window = RankWindow.from_counts(variances, lambda n, zeros: (n - int((n - zeros) * topk), n))
        squares = [0.0] * len(job.others)
        for _, a, b in job.ranges():
            _, ds = self._deltas(job, a, b)
            if window is not None:
                keep = window.mask(population_variance(ds))
                ds = [torch.where(keep, d, 0) for d in ds]
            for r, d in enumerate(ds):
                squares[r] += float(d.double().square().sum())
        if window is not None:
            window.reset()
        return window, sce_weights([s / job.n for s in squares])

    def combine(self, job, stats, c, a, b):
        if stats is None:
            return job.load(job.base_index, a, b)
        window, coef = stats
        base, ds = self._deltas(job, a, b)
        if window is not None:
            keep = window.mask(population_variance(ds))
            ds = [torch.where(keep, d, 0) for d in ds]
        return sce_combine(base, ds, coef)


METHOD = Sce()
