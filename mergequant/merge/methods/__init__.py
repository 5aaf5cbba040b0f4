"""Merge methods: one file per method, found here by name.

Each module in this package defines one :class:`~mergequant.merge.methods.base.MergeMethod` as
``METHOD``: its parameters (type, range, default, global or per-model scope), its paper, its input
contract, and its two hooks (a statistics pass over the whole tensor where it needs one, a combine pass
per chunk). ``recipe.py`` checks recipes against these declarations and ``engine.py`` runs the hooks;
nothing else names a method. To add one: a new module with ``METHOD``, listed in ``_MODULES``.

The pure tensor functions of the original methods (``linear``, ``task_arithmetic``, ``ties``, ``dare``,
``slerp``, the top-k and DARE helpers) stay importable from here, as before the package existed.
"""

from __future__ import annotations

import importlib

from mergequant.merge.methods._task import (  # noqa: F401  (public names of the former methods.py)
    TopK,
    bernoulli_mask,
    chunk_generator,
    combine_deltas,
    dare,
    l1_rescale_factor,
    magnitude_prune,
    task_arithmetic,
    ties,
    topk_count,
    topk_mask_chunk,
    topk_stats,
)
from mergequant.merge.methods.base import GLOBAL, PER_MODEL, REQUIRED, MergeMethod, Param  # noqa: F401
from mergequant.merge.methods.linear import linear  # noqa: F401
from mergequant.merge.methods.slerp import DOT_THRESHOLD, slerp, slerp_coefficients  # noqa: F401

MethodSpec = MergeMethod  # the former name of the description of a method

_MODULES = [
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp",
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "nuslerp", "multislerp",
    "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough",
]

METHODS: dict[str, MergeMethod] = {}
for _name in _MODULES:
    _method = importlib.import_module(f"{__name__}.{_name}").METHOD
    assert _method.name == _name, f"{_name}.py defines {_method.name}"
    METHODS[_name] = _method
del _name, _method

# Loading a submodule binds its name on this package, and four method modules share their name with a
# function of the former methods.py (linear, task_arithmetic, ties, slerp). Those names keep meaning the
# functions: reach a method through METHODS (or importlib), not as an attribute of this package.
from mergequant.merge.methods._task import task_arithmetic, ties  # noqa: E402, F401, F811
from mergequant.merge.methods.linear import linear  # noqa: E402, F401, F811
from mergequant.merge.methods.slerp import slerp  # noqa: E402, F401, F811

# Parameters that mergekit knows for some method: tolerated (with a warning) when the chosen method ignores
# them, so a recipe written for mergekit still runs. "maxiter" is an older spelling of karcher's max_iter.
KNOWN_PARAMETERS = {p.name for m in METHODS.values() for p in m.params} | {
    "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "t",
    "filter_wise", "select_topk", "nuslerp_flatten", "nuslerp_row_wise", "eps", "maxiter", "tol",
}
