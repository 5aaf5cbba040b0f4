"""karcher: the Karcher (Riemannian) mean of the inputs on the unit sphere, scaled by their mean norm
(https://arxiv.org/abs/2603.04972).

All inputs count equally (weights are not used; a base model is just one more input). With
n_i = |X_i|, u_i = X_i / n_i and the inputs with n_i > tol: start at the normalized mean of the u_i,
then up to ``max_iter`` times move along the mean of the log maps

    tangent = mean_i theta_i / sin(theta_i) (u_i - cos(theta_i) m),  theta_i = acos<m, u_i>  (theta_i >= tol)
    m <- cos|tangent| m + sin|tangent| tangent / |tangent|, renormalized; stop when |tangent| < tol

    out = (mean_i n_i) m

m stays a combination of the u_i, so the iteration runs on k coefficients with the inputs' Gram matrix
(one float64 statistics pass), and the output is one more pass: sum_i c_i X_i. mergekit 0.1.5 iterates
over the whole tensors in float32; the results agree to float32 rounding.
"""

from __future__ import annotations

import math

import torch

from mergequant.merge.methods._geometry import gram
from mergequant.merge.methods.base import GLOBAL, MergeMethod, Param


def karcher_coefficients(g: torch.Tensor, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """c with out = sum_i c_i X_i, from the inputs' Gram matrix (float64)."""
    k = g.shape[0]
    norms = torch.diagonal(g).clamp(min=0).sqrt()
    valid = [i for i in range(k) if float(norms[i]) > tol]
    out = torch.zeros(k, dtype=torch.float64)
    if not valid:
        return out
    nv = norms[valid]
    u = g[valid][:, valid] / (nv[:, None] * nv[None, :])  # Gram matrix of the unit vectors
    alpha = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)

    def norm(c):
        return math.sqrt(max(float(c @ u @ c), 0.0))

    mean = alpha.clone()  # coefficients on the unit vectors
    mn = norm(mean)
    if mn < tol:
        mean = torch.zeros_like(alpha)
        mean[0] = 1.0
    else:
        mean = mean / mn
    for _ in range(max_iter):
        dots = (u @ mean).clamp(-1.0, 1.0)
        tangent = torch.zeros_like(mean)
        for j in range(len(valid)):
            theta = math.acos(float(dots[j]))
            if theta < tol:
                continue
            step = -float(dots[j]) * mean
            step[j] += 1.0
            tangent = tangent + alpha[j] * (theta / math.sin(theta)) * step
        tn = norm(tangent)
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        un = norm(mean)
        if un > tol:
            mean = mean / un
    scale = float(norms.sum()) / k  # mean norm over all inputs (zero ones included)
    out[valid] = scale * mean / nv
    return out


class Karcher(MergeMethod):
    name = "karcher"
    pretty_name = "Karcher Mean"
    paper = "https://arxiv.org/abs/2603.04972"
    base = "ignored"
    buffers_per_input = 4  # float64 or stacked copies of the chunks
    params = (
        Param("max_iter", int, 10, GLOBAL, low=0, doc="iterations at most"),
        Param("tol", float, 1e-5, GLOBAL, low=0, low_open=True, doc="stop when the step is shorter"),
    )

    def merge(self, job) -> None:
        idx = list(range(len(job.flat)))
        if len(idx) == 1:
            for _, a, b in job.ranges():
                job.emit(job.load(0, a, b), a)
            return
        g = torch.zeros(len(idx), len(idx), dtype=torch.float64)
        for _, a, b in job.ranges():
            g += gram([job.load(i, a, b) for i in idx])
        coef = [float(c) for c in karcher_coefficients(g, int(job.shared.get("max_iter", 10)),
                                                       float(job.shared.get("tol", 1e-5)))]
        for _, a, b in job.ranges():
            out = job.load(0, a, b) * coef[0]
            for i in idx[1:]:
                out = out + job.load(i, a, b) * coef[i]
            job.emit(out, a)


METHOD = Karcher()
