"""dare_ties: DARE's random drop, then the TIES sign election (https://arxiv.org/abs/2311.03099).

Each entry of d_i is kept with probability ``density``; with ``rescale`` (default true) the kept
entries are scaled by sum|d_i| / sum|kept d_i| (mergekit's L1 rescale; the paper's 1/density has the
same expectation). Masks come from a generator seeded by (--seed, tensor, input, chunk), so outputs do
not depend on the thread schedule. Then the TIES combine (normalize default false).
"""

from __future__ import annotations

from mergequant.merge.methods._task import TaskArithmeticFamily, family_params


class DareTies(TaskArithmeticFamily):
    name = "dare_ties"
    pretty_name = "DARE TIES"
    paper = "https://arxiv.org/abs/2311.03099"
    sparsify = "random"
    consensus = True
    params = family_params(normalize=False, rescale=True)


METHOD = DareTies()
