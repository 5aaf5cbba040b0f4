"""Facts about a decoder layer's normalization modules that scale-folding methods (AWQ, SmoothQuant) need."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def norm_offset(norm: nn.Module) -> float:
    """1.0 if the norm multiplies by ``1 + weight`` (Gemma), 0.0 if by ``weight``: probed numerically
    (weight and bias set to zero: a plain norm then outputs zeros), so no class list is needed."""
    w = norm.weight
    b = getattr(norm, "bias", None)
    saved_w, saved_b = w.data.clone(), None if b is None else b.data.clone()
    try:
        w.data.zero_()
        if b is not None:
            b.data.zero_()
        x = torch.randn(2, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
        y = norm(x)
    finally:
        w.data.copy_(saved_w)
        if b is not None:
            b.data.copy_(saved_b)
    return 1.0 if bool(y.abs().max() > 0) else 0.0
