"""arcee_fusion: keep only the changes that matter most (Arcee Fusion,
https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration).

Exactly the base B and one other model X. Importance of each entry: |X - B| times the KL divergence of
its row (the last dimension; a 1-D tensor is one row),

    KL_row = sum_j p_j log(p_j / q_j),  p = softmax(X_row) + 1e-8,  q = softmax(B_row) + 1e-8

and with Q1, median, Q3 the importance values at sorted positions floor(q (n - 1)), q = 0.25, 0.5, 0.75:

    out = B + (X - B) [importance >= median + 1.5 (Q3 - Q1)]

Statistics: the three quantiles by exact streamed selection over row-aligned chunks (importance is
computed again in the combine pass). **Difference with mergekit 0.1.5**: for tensors over 1M elements it
estimates the quantiles from 1M entries drawn at random (unseeded, so two runs differ); ours are exact
and reproducible. Below 1M elements both use the same positions.
"""

from __future__ import annotations

import numpy as np
import torch

from mergequant.merge.methods._select import order_statistics
from mergequant.merge.methods.base import MergeMethod

QUANTILES = (0.25, 0.5, 0.75)


def quantile_ranks(n: int) -> list[int]:
    """Sorted positions of the quartiles, computed like mergekit (float32 product, truncated)."""
    return [int(np.float32(q) * np.float32(n - 1)) for q in QUANTILES]


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|X - B| * KL(softmax X || softmax B) per row, for [rows, cols] blocks."""
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (x - base).abs() * kl


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    pretty_name = "Arcee Fusion"
    paper = "https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration"
    base = "required"
    buffers_per_input = 4  # float64 or stacked copies of the chunks
    min_models = max_models = 2
    row_aligned = True

    def _importance(self, job, a, b):
        x = job.load(job.others[0], a, b).reshape(-1, job.cols)
        base = job.load(job.base_index, a, b).reshape(-1, job.cols)
        return x, base, importance(x, base)

    def statistics(self, job):
        def scores():
            for _, a, b in job.ranges(rows=True):
                yield self._importance(job, a, b)[2].reshape(-1)

        q1, median, q3 = (np.float32(s.value) for s in order_statistics(scores, quantile_ranks(job.n)))
        return float(median + np.float32(1.5) * (q3 - q1))

    def combine(self, job, threshold, c, a, b):
        x, base, imp = self._importance(job, a, b)
        return (base + (x - base) * (imp >= threshold).to(x.dtype)).reshape(-1)


METHOD = ArceeFusion()
