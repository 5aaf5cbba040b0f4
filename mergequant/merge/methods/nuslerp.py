"""nuslerp: spherical interpolation of two models by weight, optionally of their task vectors
(mergekit's "NuSLERP", https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md).

Exactly two models besides an optional base; t = w_2 / (w_1 + w_2) (0.5 when |w_1 + w_2| < 1e-6).
Without a base v_i = X_i; with one, v_i = X_i - B and the base is added back. With u_i = v_i / max(|v_i|, 1e-7),
cos theta = <u_0, u_1> clipped to [-1, 1]:

    out = (sin((1 - t) theta) v_0 + sin(t theta) v_1) / sin theta        (linear when 1 - cos^2 <= 1e-16)

over the flattened tensor (``nuslerp_flatten``, default true), else per row (the last dimension) or,
with ``nuslerp_row_wise: true``, per column (vectors along the first dimension; mergekit's naming).
A 1-D tensor is one vector in every mode. Unlike ``slerp`` there is no 0.9995 near-parallel cut-off.
Statistics: norms and dot products in float64 (per tensor, per column over all rows, or per row in
chunks of whole rows).
"""

from __future__ import annotations

import torch

from mergequant.merge.methods._geometry import column_gram, gram, row_gram
from mergequant.merge.methods.base import GLOBAL, PER_MODEL, REQUIRED, MergeMethod, Param


def nuslerp_coefficients(t: float, g: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1) with out = c0 v0 + c1 v1, from Gram matrices [..., 2, 2] (float64)."""
    n0 = g[..., 0, 0].clamp(min=0).sqrt().clamp(min=1e-7)
    n1 = g[..., 1, 1].clamp(min=0).sqrt().clamp(min=1e-7)
    cos = (g[..., 0, 1] / (n0 * n1)).clamp(-1, 1)
    colinear = (1 - cos * cos) <= eps * eps
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / s)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / s)
    return c0, c1


class Nuslerp(MergeMethod):
    name = "nuslerp"
    pretty_name = "NuSLERP"
    paper = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"
    base = "optional"
    buffers_per_input = 4  # float64 or stacked copies of the chunks
    min_others = max_others = 2
    params = (
        Param("weight", float, REQUIRED, PER_MODEL, doc="t = w_2 / (w_1 + w_2)"),
        Param("nuslerp_flatten", bool, True, GLOBAL, doc="one angle for the whole tensor"),
        Param("nuslerp_row_wise", bool, False, GLOBAL, doc="(not flattened) vectors along the first dimension"),
    )

    def _vectors(self, job, a, b) -> list[torch.Tensor]:
        xs = [job.load(i, a, b) for i in job.others]
        if job.base_index is not None:
            base = job.load(job.base_index, a, b)
            xs = [x - base for x in xs]
        return xs

    def merge(self, job) -> None:
        w1, w2 = job.weights()
        total = w1 + w2
        t = 0.5 if abs(total) < 1e-6 else w2 / total
        flatten = bool(job.shared.get("nuslerp_flatten", True))
        mode = "flat" if flatten or len(job.tp.shape) < 2 else ("columns" if job.shared.get("nuslerp_row_wise") else "rows")
        cols = job.n // job.tp.shape[0] if mode == "columns" else job.cols
        if mode == "flat":
            g = torch.zeros(2, 2, dtype=torch.float64)
            for _, a, b in job.ranges():
                g += gram(self._vectors(job, a, b))
            coef = nuslerp_coefficients(t, g)
        elif mode == "columns":
            g = torch.zeros(cols, 2, 2, dtype=torch.float64)
            for _, a, b in job.ranges(rows=True, cols=cols):
                g += column_gram(self._vectors(job, a, b), cols)
            coef = nuslerp_coefficients(t, g)
        for _, a, b in job.ranges(rows=mode != "flat", cols=cols):
            v0, v1 = self._vectors(job, a, b)
            if mode == "rows":
                c0, c1 = (c.unsqueeze(1) for c in nuslerp_coefficients(t, row_gram([v0, v1], cols)))
            else:
                c0, c1 = coef
            if mode != "flat":
                v0, v1 = v0.reshape(-1, cols), v1.reshape(-1, cols)
            c0, c1 = (c.to(device=v0.device, dtype=job.dtype) for c in (c0, c1))
            out = (c0 * v0 + c1 * v1).reshape(-1)
            if job.base_index is not None:
                out = job.load(job.base_index, a, b) + out
            job.emit(out, a)


METHOD = Nuslerp()
