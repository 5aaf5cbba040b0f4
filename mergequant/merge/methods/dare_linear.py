"""dare_linear: DARE's random drop and L1 rescale, then the task-arithmetic sum
(https://arxiv.org/abs/2311.03099). See dare_ties.py for the masks; no sign election."""

from __future__ import annotations

from mergequant.merge.methods._task import TaskArithmeticFamily, family_params


class DareLinear(TaskArithmeticFamily):
    name = "dare_linear"
    pretty_name = "Linear DARE"
    paper = "https://arxiv.org/abs/2311.03099"
    sparsify = "random"
    params = family_params(normalize=False, rescale=True)


METHOD = DareLinear()
