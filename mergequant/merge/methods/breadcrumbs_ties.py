"""breadcrumbs_ties: Model Breadcrumbs pruning (see breadcrumbs.py), then the TIES sign election and
disjoint mean (https://arxiv.org/abs/2312.06795). normalize and rescale default to false, as in mergekit."""

from __future__ import annotations

from mergequant.merge.methods._task import family_params
from mergequant.merge.methods.breadcrumbs import GAMMA, Breadcrumbs


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    pretty_name = "Model Breadcrumbs with TIES"
    consensus = True
    params = family_params(False, False, GAMMA)


METHOD = BreadcrumbsTies()
