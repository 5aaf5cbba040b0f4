"""multislerp: barycentric interpolation of several models on the hypersphere
(https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).

Inputs v_i = X_i (or X_i - B with a base, added back at the end), flattened, weights w_i (divided by
their sum with ``normalize_weights``, default true), n_i = |v_i|, u_i = v_i / (n_i + eps):

    m = sum_i w_i u_i / |sum_i w_i u_i|                      (the weighted mean direction)
    tau = sum_i w_i (u_i - <u_i, m> m)                       (tangent-space mean at m)
    out = (sum_i w_i n_i) (m cos|tau|' + tau sin|tau|' / |tau|'),   |tau|' = |tau| + eps

Every quantity is a combination of the v_i, so the statistics are their Gram matrix (float64, chunk by
chunk) and the output is sum_i c_i v_i with coefficients computed from it. Note: tau is 0 up to rounding
(sum_i w_i <u_i, m> = |sum_i w_i u_i|), so the result is the normalized weighted mean direction scaled
by the weighted mean norm; mergekit 0.1.5 computes the same formula in float32. One model: returned as is.
|sum_i w_i u_i| < eps: two models fall back to sum_i w_i v_i, more are refused (antipodal inputs).
"""

from __future__ import annotations

import math

import torch

from mergequant.errors import MergeQuantError
from mergequant.merge.methods._geometry import gram
from mergequant.merge.methods.base import GLOBAL, PER_MODEL, REQUIRED, MergeMethod, Param


def multislerp_coefficients(g: torch.Tensor, weights: list[float], normalize: bool, eps: float) -> torch.Tensor | None:
    """c with out = sum_i c_i v_i, from the Gram matrix of the v_i; None when the weighted mean of the
    unit vectors is (nearly) zero."""
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = torch.diagonal(g).clamp(min=0).sqrt()
    inv = 1 / (norms + eps)  # u_i = inv_i v_i
    alpha = w * inv  # sum_i w_i u_i = sum_i alpha_i v_i
    mean_norm = math.sqrt(max(float(alpha @ g @ alpha), 0.0))
    if mean_norm < eps:
        return None
    m = alpha / mean_norm  # m = sum_i m_i v_i
    dots = inv * (g @ m)  # <u_i, m>
    tau = w * inv - (w * dots).sum() * m  # sum_i w_i (u_i - <u_i, m> m)
    tn = math.sqrt(max(float(tau @ g @ tau), 0.0)) + eps
    avg_norm = float((norms * w).sum())
    return avg_norm * (m * math.cos(tn) + tau * (math.sin(tn) / tn))


class Multislerp(MergeMethod):
    name = "multislerp"
    pretty_name = "Multi-SLERP"
    paper = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    base = "optional"
    buffers_per_input = 4  # float64 or stacked copies of the chunks
    min_others = 1
    params = (
        Param("weight", float, REQUIRED, PER_MODEL, doc="w_i"),
        Param("normalize_weights", bool, True, GLOBAL, doc="divide the weights by their sum"),
        Param("eps", float, 1e-8, GLOBAL, low=0, low_open=True, doc="guards the divisions"),
    )

    def check_tensor(self, shared, per_model, others, models):
        ws = [per_model[i]["weight"] for i in others]
        if len(ws) > 1 and shared.get("normalize_weights", True) and abs(sum(ws)) < 1e-12:
            return f"weights {ws} sum to 0 with normalize_weights: true"
        return None

    def _vectors(self, job, a, b) -> list[torch.Tensor]:
        xs = [job.load(i, a, b) for i in job.others]
        if job.base_index is not None:
            base = job.load(job.base_index, a, b)
            xs = [x - base for x in xs]
        return xs

    def merge(self, job) -> None:
        if len(job.others) == 1:
            for _, a, b in job.ranges():
                job.emit(job.load(job.others[0], a, b), a)
            return
        weights = job.weights()
        eps = float(job.shared.get("eps", 1e-8))
        normalize = bool(job.shared.get("normalize_weights", True))
        g = torch.zeros(len(weights), len(weights), dtype=torch.float64)
        for _, a, b in job.ranges():
            g += gram(self._vectors(job, a, b))
        coef = multislerp_coefficients(g, weights, normalize, eps)
        if coef is None:
            if len(weights) != 2:
                raise MergeQuantError(f"tensor {job.name}: multislerp: the weighted sum of the inputs' directions "
                                      "is zero (antipodal inputs with balancing weights); change the weights")
            w = torch.tensor(weights, dtype=torch.float64)
            coef = w / w.sum() if normalize else w
        coef = [float(c) for c in coef]
        for _, a, b in job.ranges():
            vs = self._vectors(job, a, b)
            out = vs[0] * coef[0]
            for v, c in zip(vs[1:], coef[1:]):
                out = out + v * c
            if job.base_index is not None:
                out = out + job.load(job.base_index, a, b)
            job.emit(out, a)


METHOD = Multislerp()
