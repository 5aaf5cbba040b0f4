"""della: DELLA-Merging's MagPrune, then the TIES sign election (https://arxiv.org/abs/2406.11617).

Per row of each delta d_i (the last dimension; a 1-D tensor is one row of n), rank the entries by |d|
(rank 0 the smallest, ties in position order) and keep each one with probability

    p = (density - epsilon) + 2 epsilon * rank / (n - 1)          (mean p = density)

so larger changes survive more often. With ``rescale`` (default true) every kept entry is divided by its
own p, as the paper does, so E[d'] = d element by element. **mergekit 0.1.5 differs here**: it
rescales the whole tensor by the L1 ratio sum|d| / sum|kept d| (its DARE rescale), which over-weights
the large entries (kept more often) and shrinks the small ones; we follow the paper. Masks come from a
generator seeded by (--seed, tensor, input, chunk of rows): reproducible whatever --workers. Then the
TIES combine (normalize default true). Requires 0 < density - epsilon and density + epsilon < 1.

Rows are independent, so there is no whole-tensor statistics pass: each chunk holds whole rows.
"""

from __future__ import annotations

import torch

from mergequant.merge.methods._task import TaskArithmeticFamily, chunk_generator, family_params
from mergequant.merge.methods.base import PER_MODEL, Param

EPSILON = Param("epsilon", float, 0.15, PER_MODEL, low=0, high=0.5, doc="spread of the keep probabilities")


def magprune_probabilities(mags: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities of a [rows, cols] block of |d|: linear in each entry's rank within its row."""
    rows, cols = mags.shape
    order = torch.argsort(mags, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=mags.device).expand(rows, cols))
    rank_norm = ranks.to(torch.float32) / (cols - 1) if cols > 1 else torch.full((rows, cols), 0.5, device=mags.device)
    return (density - epsilon) + rank_norm * (2 * epsilon)


def magprune(d: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
             rescale: bool = True) -> torch.Tensor:
    """MagPrune of a [rows, cols] block of deltas: Bernoulli keep by rank probability, kept / p."""
    p = magprune_probabilities(d.abs(), density, epsilon)
    keep = torch.rand(d.shape, generator=generator).to(d.device) < p
    kept = torch.where(keep, d, 0)
    return kept / p.to(d.dtype) if rescale else kept


class Della(TaskArithmeticFamily):
    name = "della"
    pretty_name = "DELLA"
    paper = "https://arxiv.org/abs/2406.11617"
    sparsify = "della"
    consensus = True
    row_aligned = True
    buffers_per_input = 3  # probabilities and ranks of the chunk's rows
    params = family_params(True, True, EPSILON, rescale_doc="divide each kept entry by its keep probability")

    def check_tensor(self, shared, per_model, others, models):
        for i in others:
            density, eps = per_model[i].get("density", 1.0), per_model[i].get("epsilon", 0.15)
            if density < 1 and not (density - eps > 0 and density + eps < 1):
                return (f"{self.name} needs 0 < density - epsilon and density + epsilon < 1 "
                        f"(model '{models[i]}': density {density:g}, epsilon {eps:g})")
        return None

    def prune_statistics(self, job, r, i, stats):
        if len(job.tp.shape) > 2:
            from mergequant.errors import MergeQuantError
            raise MergeQuantError(f"tensor {job.name}: {self.name} ranks entries within rows and supports tensors "
                                  f"of at most 2 dimensions, got shape {list(job.tp.shape)}")
        return None

    def prune_chunk(self, job, state, r, i, c, a, b, d):
        density = float(job.per_model(i, "density"))
        if density >= 1:
            return d
        block = d.reshape(-1, job.cols)
        out = magprune(block, density, float(job.per_model(i, "epsilon")), chunk_generator(job.seed, job.name, i, c),
                       rescale=bool(job.shared.get("rescale")))
        return out.reshape(-1)


METHOD = Della()
