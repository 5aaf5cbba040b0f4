"""8-bit integer quantization: pure tensor functions shared by ``--method int8`` and ``--method w8a8``.

* LLM.int8 (bitsandbytes) weights: row-wise absmax, ``SCB[r] = max_c |W[r, c]|`` (float32) and
  ``weight[r, c] = round(W[r, c] * (127 / SCB[r]))`` (int8), exactly the expression bitsandbytes'
  ``int8_vectorwise_quant`` uses when it quantizes a float weight itself (round half to even).
  Dequantized: ``weight * SCB * (1/127)``.
* Per-output-channel symmetric int8 (compressed-tensors ``strategy: channel``):
  ``scale[r] = max_c |W[r, c]| / 127`` stored in the model's float dtype as ``[out, 1]``, and the codes are
  computed against the *stored* (rounded) scale, ``clamp(round(W / scale), -128, 127)``, so that
  ``codes * scale`` is exactly what a loader reconstructs.
* SmoothQuant: per input channel ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (``max|W_j|`` over the rows of
  every Linear fed by the same activation). The activation is divided by ``s`` (folded into the norm that
  produces it) and the weights' columns are multiplied by ``s``: ``(X / s) (W * s)^T = X W^T``.
  Channels whose activation or weight column is all zero get ``s = 1`` (nothing to migrate; avoids 0/0 and
  a division by zero when folding).
* ``fake_quant_per_token``: dynamic per-token symmetric int8 activations (what a W8A8 kernel does to its
  input), used to measure W8A8 error.
"""

from __future__ import annotations

import torch

# bitsandbytes multiplies by this float32 constant (1/127) when it dequantizes int8 rows
_INV127 = 7.874015718698502e-3
S_MIN, S_MAX = 1e-5, 1e5  # smoothing scales are clamped to this range (degenerate statistics)


# ---- LLM.int8 (bitsandbytes) -------------------------------------------------------------------------

def llm_int8_quantize(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 of a weight [out, in]: (codes int8 [out, in], SCB float32 [out]).

    An all-zero row gets SCB 0 and codes 0 (bitsandbytes itself would produce 0/0 there)."""
    W = W.float()
    scb = W.abs().amax(dim=1)
    factor = torch.where(scb > 0, 127.0 / scb, torch.zeros_like(scb))
    codes = torch.round(W * factor.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return codes, scb


def llm_int8_dequantize(codes: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """float32 [out, in] from int8 codes and SCB (as bitsandbytes' ``int8_vectorwise_dequant``)."""
    return codes.float() * scb.float().view(-1, 1) * _INV127


# ---- per-channel symmetric int8 (compressed-tensors) ----------------------------------------------------

def channel_int8_quantize(W: torch.Tensor, scale_dtype: torch.dtype = torch.float16
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (codes int8 [out, in], scale ``scale_dtype`` [out, 1]).

    The scale is rounded to ``scale_dtype`` first and the codes are computed against the rounded scale.
    An all-zero row gets scale 1 (any positive value reconstructs zeros)."""
    W = W.float()
    amax = W.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).to(scale_dtype)
    codes = torch.round(W / scale.float()).clamp(-128, 127).to(torch.int8)
    return codes, scale


def channel_int8_dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [out, in] = codes * scale (scale [out, 1] or [out])."""
    return codes.float() * scale.float().reshape(-1, 1)


def fake_quant_per_token(X: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token symmetric int8 quantize-dequantize of activations [..., in] (float32 result)."""
    X = X.float()
    amax = X.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(X / scale).clamp(-128, 127) * scale


# ---- SmoothQuant ------------------------------------------------------------------------------------------

def weight_column_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """max_r |W[r, j]| over the rows of every weight in ``weights`` (all [out_i, in]): float32 [in]."""
    return torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant scales ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (float32 [in]).

    ``s_j = 1`` where the activation channel or the weight column is all zero (or not finite), and the
    result is clamped to [1e-5, 1e5]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a, w = act_absmax.float(), weight_absmax.float()
    ok = (a > 0) & (w > 0) & torch.isfinite(a) & torch.isfinite(w)
    s = a.clamp_min(1e-30).pow(alpha) / w.clamp_min(1e-30).pow(1.0 - alpha)
    s = torch.where(ok & torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp(S_MIN, S_MAX)


@torch.no_grad()
def fold_into_norm(weight: torch.Tensor, s: torch.Tensor, offset: float = 0.0,
                   bias: torch.Tensor | None = None) -> None:
    """Divide a norm's output by ``s`` in place: its effective gain ``offset + weight`` (offset 1 for
    Gemma's ``(1 + w)`` norms, 0 otherwise) becomes ``(offset + weight) / s``; a bias is divided too."""
    s = s.to(weight.device, torch.float32)
    weight.copy_(((weight.float() + offset) / s - offset).to(weight.dtype))
    if bias is not None:
        bias.copy_((bias.float() / s).to(bias.dtype))


@torch.no_grad()
def fold_into_linear(weight: torch.Tensor, s: torch.Tensor) -> None:
    """Multiply the input columns of a Linear weight [out, in] by ``s`` in place."""
    weight.copy_((weight.float() * s.to(weight.device, torch.float32).unsqueeze(0)).to(weight.dtype))
