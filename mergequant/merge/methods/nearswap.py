"""nearswap: take the other model's value where it is close to the base
(https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001).

Exactly the base B and one other model X; elementwise

    w = clamp(t / max(|B - X|, 1e-6), 0, 1)          out = w X + (1 - w) B

so entries within ``t`` of the base become X's, and farther ones move towards X by t / |B - X|. No
statistics pass. ``t`` is a distance here (>= 0), not an interpolation factor.
"""

from __future__ import annotations

import torch

from mergequant.merge.methods.base import GLOBAL, REQUIRED, MergeMethod, Param


def nearswap(base: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    w = (t / (base - x).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * x + (1 - w) * base


class Nearswap(MergeMethod):
    name = "nearswap"
    pretty_name = "NearSwap"
    paper = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    base = "required"
    min_models = max_models = 2
    params = (Param("t", float, REQUIRED, GLOBAL, low=0, doc="distance below which X's value is taken"),)

    def combine(self, job, stats, c, a, b):
        return nearswap(job.load(job.base_index, a, b), job.load(job.others[0], a, b), float(job.shared["t"]))


METHOD = Nearswap()
