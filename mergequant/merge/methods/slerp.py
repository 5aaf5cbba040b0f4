"""slerp: spherical interpolation between the base and exactly one other model at ``t``
(https://en.wikipedia.org/wiki/Slerp).

The two tensors are flattened; with theta the angle between them,

    out = sin((1 - t) theta) / sin theta * B + sin(t theta) / sin theta * X

and plain linear interpolation when |cos theta| > 0.9995. Statistics: the two norms and the dot
product, accumulated in float64 over chunks; combine: c0 * B + c1 * X per chunk.
"""

from __future__ import annotations

import math

import torch

from mergequant.merge.methods.base import GLOBAL, REQUIRED, MergeMethod, Param

DOT_THRESHOLD = 0.9995


def slerp_coefficients(t: float, norm0: float, norm1: float, raw_dot: float, eps: float = 1e-8) -> tuple[float, float]:
    """Coefficients (c0, c1) so that out = c0 * v0 + c1 * v1, from the norms and the raw dot <v0, v1>.

    Directions are compared after normalizing to unit length; nearly parallel (|cos| > 0.9995)
    pairs fall back to linear interpolation.
    """
    n0 = norm0 if norm0 > eps else 1.0
    n1 = norm1 if norm1 > eps else 1.0
    dot = max(-1.0, min(1.0, raw_dot / (n0 * n1)))
    if abs(dot) > DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (treated as flat vectors)."""
    a = v0.reshape(-1).double()
    b = v1.reshape(-1).double()
    c0, c1 = slerp_coefficients(t, float(a.norm()), float(b.norm()), float(a @ b))
    return (c0 * v0 + c1 * v1).to(v0.dtype)


class Slerp(MergeMethod):
    name = "slerp"
    pretty_name = "SLERP"
    paper = "https://en.wikipedia.org/wiki/Slerp"
    base = "required"
    min_models = max_models = 2
    params = (Param("t", float, REQUIRED, GLOBAL, low=0, high=1, doc="0 gives the base, 1 the other model"),)

    def statistics(self, job) -> tuple[float, float]:
        bi = job.base_index
        oi = 1 - bi
        n0 = n1 = dot = 0.0
        for _, a, b in job.ranges():
            x, y = job.load(bi, a, b, torch.float64), job.load(oi, a, b, torch.float64)
            n0 += float(x @ x)
            n1 += float(y @ y)
            dot += float(x @ y)
        return slerp_coefficients(float(job.shared["t"]), math.sqrt(n0), math.sqrt(n1), dot)

    def combine(self, job, stats, c, a, b) -> torch.Tensor:
        c0, c1 = stats
        bi = job.base_index
        return c0 * job.load(bi, a, b, job.acc) + c1 * job.load(1 - bi, a, b, job.acc)


METHOD = Slerp()
