"""Modules with parameters on the meta device, built without running their initializers.

The layer-by-layer runner builds a model's skeleton with every parameter on meta and loads the real
weights one decoder layer at a time. ``nn.Linear(..., device="meta")`` would still run its random
initializer on meta, which goes through torch's reference kernels: their first use imports
``torch._dynamo``, 1.4 s of a 2-core machine's start-up, for values that are never used.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["meta_embedding", "meta_linear"]


def meta_linear(n_in: int, n_out: int, bias: bool = False) -> nn.Linear:
    """An ``nn.Linear`` with meta parameters, built without running its initializer: a random init on
    meta still goes through torch's reference kernels, whose first use imports torch._dynamo (1.4 s)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = n_in, n_out
    lin.weight = nn.Parameter(torch.empty(n_out, n_in, device="meta"))
    lin.bias = nn.Parameter(torch.empty(n_out, device="meta")) if bias else None
    return lin


def meta_embedding(n: int, dim: int) -> nn.Embedding:
    """An ``nn.Embedding`` with a meta table, built without its initializer (see ``meta_linear``)."""
    emb = nn.Embedding.__new__(nn.Embedding)
    nn.Module.__init__(emb)
    emb.num_embeddings, emb.embedding_dim, emb.padding_idx = n, dim, None
    emb.max_norm, emb.norm_type, emb.scale_grad_by_freq, emb.sparse = None, 2.0, False, False
    emb.weight = nn.Parameter(torch.empty(n, dim, device="meta"))
    return emb
