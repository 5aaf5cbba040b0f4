"""della_linear: DELLA's MagPrune (see della.py), then the task-arithmetic sum with no sign election
(https://arxiv.org/abs/2406.11617). normalize defaults to false, rescale to true."""

from __future__ import annotations

from mergequant.merge.methods._task import family_params
from mergequant.merge.methods.della import EPSILON, Della


class DellaLinear(Della):
    name = "della_linear"
    pretty_name = "Linear DELLA"
    consensus = False
    params = family_params(False, True, EPSILON, rescale_doc="divide each kept entry by its keep probability")


METHOD = DellaLinear()
