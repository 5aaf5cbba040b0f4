"""task_arithmetic: add the weighted task vectors to the base (https://arxiv.org/abs/2212.04089).

    out = B + lambda * sum_i w_i (X_i - B)        (/ sum_i w_i when normalize, default false)

No statistics pass; the fused numba kernel computes it on the CPU (see _task.py).
"""

from __future__ import annotations

from mergequant.merge.methods._task import TaskArithmeticFamily, family_params


class TaskArithmetic(TaskArithmeticFamily):
    name = "task_arithmetic"
    pretty_name = "Task Arithmetic"
    paper = "https://arxiv.org/abs/2212.04089"
    params = family_params(normalize=False, rescale=False)


METHOD = TaskArithmetic()
