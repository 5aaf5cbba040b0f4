"""breadcrumbs: Model Breadcrumbs (https://arxiv.org/abs/2312.06795), then the task-arithmetic sum.

For each delta d_i (n entries) drop the ``gamma`` fraction with the largest |d_i| (outliers) and the
smallest ones, keeping ``density``:

    keep the |d_i| ranks [n_bot, n_bot + int(density n)),  n_bot = max(0, n - int(density n) - int(gamma n))

(when density + gamma > 1 fewer outliers are dropped, so that ``density`` is kept, as in mergekit 0.1.5;
density 1 keeps everything). Then out = B + lambda * sum_i w_i d'_i (/ sum_i w_i with normalize).
Statistics: the two cut-off values of |d_i| by exact streamed selection (``_select.py``), ties broken by
position; mergekit sorts the whole tensor and breaks ties arbitrarily. ``rescale`` (default false)
restores each pruned delta's L1 norm.

gamma 0 keeps exactly the top ``density``: some older mergekit versions kept nothing then; we follow the paper.
"""

from __future__ import annotations

import torch

from mergequant.merge.methods._select import RankWindow
from mergequant.merge.methods._task import TaskArithmeticFamily, family_params, l1_rescale
from mergequant.merge.methods.base import PER_MODEL, Param

GAMMA = Param("gamma", float, 0.01, PER_MODEL, low=0, high=1, doc="fraction of the largest |d_i| dropped")


def breadcrumbs_window(n: int, density: float, gamma: float) -> tuple[int, int]:
    """The ascending |d| ranks kept: [n_bot, n_bot + target)."""
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return n_bot, n_bot + target


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Whole-tensor keep-mask (for tests and small tensors): ranks by |d|, an earlier entry ranks
    higher among equal magnitudes."""
    flat = delta.reshape(-1).abs().float()
    r0, r1 = breadcrumbs_window(flat.numel(), density, gamma)
    return RankWindow(lambda: [flat], r0, r1, flat.numel()).mask(flat).reshape(delta.shape)


class Breadcrumbs(TaskArithmeticFamily):
    name = "breadcrumbs"
    pretty_name = "Model Breadcrumbs"
    paper = "https://arxiv.org/abs/2312.06795"
    sparsify = "outliers"
    params = family_params(False, False, GAMMA)

    def prune_statistics(self, job, r, i, stats):
        density = float(job.per_model(i, "density"))
        if density >= 1:
            return None
        n = job.n

        def mags():
            for _, a, b in job.ranges():
                yield job.delta(i, a, b).abs()

        window = RankWindow(mags, *breadcrumbs_window(n, density, float(job.per_model(i, "gamma"))), n)
        if bool(job.shared.get("rescale")):
            stats.factors[r] = l1_rescale(job, lambda a, b: job.delta(i, a, b).abs(),
                                          lambda c, a, b, d: window.mask(d))
            window.reset()
        return window

    def prune_chunk(self, job, window, r, i, c, a, b, d):
        if window is None:
            return d
        return torch.where(window.mask(d.abs()), d, 0)


METHOD = Breadcrumbs()
