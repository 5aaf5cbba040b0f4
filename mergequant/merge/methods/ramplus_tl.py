"""ramplus_tl: RAM+ with tensor-local statistics (https://arxiv.org/abs/2601.13572).

As ram.py, but each model's unique changes are amplified by how much it overlaps with the others in
this tensor: with shared_i / unique_i the numbers of model i's active entries that other models also
change / that only it changes,

    lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha)
    out = B + sum_i d_i [active_i] ([count = 1] lambda_i + [count > 1] / count)

Statistics: the two counts per model, chunk by chunk.
"""

from __future__ import annotations

import torch

from mergequant.merge.methods.base import GLOBAL, Param
from mergequant.merge.methods.ram import EPSILON, Ram, ram_parts


def ramplus_lambdas(shared: list[int], unique: list[int], r: float, alpha: float, epsilon: float) -> torch.Tensor:
    """lambda_i in float32, computed like mergekit (counts divided in float32)."""
    s = torch.tensor(shared, dtype=torch.int64)
    u = torch.tensor(unique, dtype=torch.int64)
    rho = s / u.clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)


class RamplusTl(Ram):
    name = "ramplus_tl"
    pretty_name = "Reinforced Agent Merging Plus (Tensor-Local)"
    params = (
        Param("r", float, 0.1, GLOBAL, low=0, doc="strength of the amplification"),
        Param("alpha", float, 0.2, GLOBAL, low=0, doc="cap on the overlap ratio"),
        EPSILON,
    )

    def statistics(self, job):
        if not job.others:
            return None
        eps = float(job.shared.get("epsilon", 1e-5))
        shared = torch.zeros(len(job.others), dtype=torch.int64)
        unique = torch.zeros(len(job.others), dtype=torch.int64)
        for _, a, b in job.ranges():
            _, ds = self._chunk(job, a, b)
            _, active, uniq, overlap, _ = ram_parts(ds, eps)
            shared += (active & overlap).sum(1).cpu()
            unique += (active & uniq).sum(1).cpu()
        lam = ramplus_lambdas(shared.tolist(), unique.tolist(), float(job.shared.get("r", 0.1)),
                              float(job.shared.get("alpha", 0.2)), eps)
        return lam.to(device=job.device, dtype=job.dtype)


METHOD = RamplusTl()
