"""ram: Reinforced Agent Merging (https://arxiv.org/abs/2601.13572).

Task vectors d_i = X_i - B; an entry of d_i is active when |d_i| > epsilon. Where exactly one model is
active its change is taken whole; where several are, their active changes are averaged:

    out = B + sum_i d_i [active_i] ([count = 1] + [count > 1] / count),   count = sum_j [active_j]

Elementwise: no statistics pass.
"""

from __future__ import annotations

import torch

from mergequant.merge.methods.base import GLOBAL, MergeMethod, Param

EPSILON = Param("epsilon", float, 1e-5, GLOBAL, low=0, doc="|d| above which an entry counts as changed")


def ram_parts(deltas: list[torch.Tensor], epsilon: float):
    """(stacked deltas with inactive entries zeroed, active mask, unique mask, overlap mask, counts)."""
    tv = torch.stack(deltas)
    active = tv.abs() > epsilon
    counts = active.sum(0, keepdim=True)
    return tv * active, active, counts == 1, counts > 1, counts


def ram_combine(base: torch.Tensor, deltas: list[torch.Tensor], epsilon: float,
                unique_scale: torch.Tensor | None = None) -> torch.Tensor:
    """B + the RAM mix of the deltas (``unique_scale``: ramplus's per-model factor on unique entries)."""
    tv, _, unique, overlap, counts = ram_parts(deltas, epsilon)
    uniq = tv * unique
    if unique_scale is not None:
        uniq = uniq * unique_scale.reshape(-1, 1)
    return base + (uniq + tv * overlap / counts.clamp(min=1)).sum(0)


class Ram(MergeMethod):
    name = "ram"
    pretty_name = "Reinforced Agent Merging"
    paper = "https://arxiv.org/abs/2601.13572"
    base = "required"
    buffers_per_input = 3  # float64 or stacked copies of the chunks
    params = (EPSILON,)

    def _chunk(self, job, a, b):
        base = job.load(job.base_index, a, b)
        return base, [job.load(i, a, b) - base for i in job.others]

    def combine(self, job, stats, c, a, b):
        base, ds = self._chunk(job, a, b)
        if not ds:
            return base
        return ram_combine(base, ds, float(job.shared.get("epsilon", 1e-5)), stats)


METHOD = Ram()
