"""ties: TIES-merging (https://arxiv.org/abs/2306.01708).

Trim: keep the k = int(density * n) largest |d_i| of each delta (an exact selection: a two-level
histogram over the float bits in the fused kernel, ``kthvalue`` on the torch path; equal magnitudes at
the threshold are kept in memory order). Elect: s = sign(sum_i w_i d_i) (0 counts as +). Merge:

    out = B + lambda * sum_i w_i d_i [sign(d_i) = s] / sum_i w_i [sign(d_i) = s]     (normalize, default true)

Statistics: the top-k threshold of each input (and the L1 rescale factor with ``rescale: true``).
"""

from __future__ import annotations

from mergequant.merge.methods._task import TaskArithmeticFamily, family_params


class Ties(TaskArithmeticFamily):
    name = "ties"
    pretty_name = "TIES"
    paper = "https://arxiv.org/abs/2306.01708"
    sparsify = "magnitude"
    consensus = True
    params = family_params(normalize=True, rescale=False)


METHOD = Ties()
