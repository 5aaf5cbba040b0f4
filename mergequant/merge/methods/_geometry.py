"""Inner products of the inputs, accumulated chunk by chunk in float64: the statistics of the methods
whose output is a combination of the inputs with coefficients that depend on their norms and angles
(slerp-like and mean-like methods: model_stock, nuslerp, multislerp, karcher)."""

from __future__ import annotations

import torch


def gram(vectors: list[torch.Tensor]) -> torch.Tensor:
    """[k, k] float64 matrix of <v_i, v_j> of k flat chunks, on the CPU (add over chunks for the whole tensor)."""
    m = torch.stack([v.reshape(-1).double() for v in vectors])
    return (m @ m.T).cpu()


def row_gram(vectors: list[torch.Tensor], cols: int) -> torch.Tensor:
    """[rows, k, k] float64 inner products per row of ``cols`` elements."""
    m = torch.stack([v.reshape(-1, cols).double() for v in vectors], dim=1)  # rows, k, cols
    return m @ m.transpose(1, 2)


def column_gram(vectors: list[torch.Tensor], cols: int) -> torch.Tensor:
    """[cols, k, k] float64 inner products per column (summed over the rows of this chunk)."""
    m = torch.stack([v.reshape(-1, cols).double() for v in vectors], dim=0)  # k, rows, cols
    return torch.einsum("irc,jrc->cij", m, m).cpu()


def whole_gram(job, indices: list[int], vector) -> torch.Tensor:
    """Gram matrix of ``vector(job, i, a, b)`` for i in ``indices`` over the whole tensor."""
    g = torch.zeros(len(indices), len(indices), dtype=torch.float64)
    for _, a, b in job.ranges():
        g += gram([vector(job, i, a, b) for i in indices])
    return g
