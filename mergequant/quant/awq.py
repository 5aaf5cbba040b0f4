"""AWQ (activation-aware weight quantization) building blocks: small functions, tensors in, tensors out.

The idea (Lin et al., 2023, "AWQ"): a few input channels of each Linear carry much larger
activations than the rest, and the rounding error on their weights dominates the output error.
Multiplying those weight columns by ``s > 1`` before quantizing (and dividing the activations by
``s``, folded into the operation that produces them, so the float function is unchanged) gives them
relatively more of the 4-bit grid. ``s`` is searched per *scaling group* (the Linears that read the
same activations) on calibration data, by the block output error it causes.

Conventions: weights are ``nn.Linear`` layout ``[N, K]`` (out, in); groups are consecutive runs of
``group_size`` input columns (``-1`` = one group spanning all of K); ``scales``/``zeros`` are
returned ``[G, N]`` (checkpoint orientation, what :func:`mergequant.quant.formats.awq_pack_zeros`
and the ``scales`` tensor of an AWQ GEMM checkpoint use). Everything is computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "QuantizedWeight",
    "ScaleSearch",
    "activation_mean",
    "apply_clip",
    "candidate_scales",
    "fake_quantize",
    "fold_into_linear_rows",
    "fold_into_norm",
    "gram_blocks",
    "linear_output_mse",
    "pseudo_quantize",
    "scale_linear_cols",
    "search_clip",
    "search_scale",
    "weight_mean",
]

MAX_SHRINK = 0.5  # clip search: the group range may shrink to half of its max |w|
CLIP_GRID = 20  # clip search: shrink steps of 1/20


@dataclass
class QuantizedWeight:
    """Result of :func:`pseudo_quantize`: the dequantized weight and the integers that encode it."""

    w_hat: torch.Tensor  # float32 [N, K] == scales * (q - zeros), exactly what a loader reconstructs
    q: torch.Tensor  # int32 [N, K], values in [0, 2**bits)
    scales: torch.Tensor  # float32 [G, N] (already rounded to float16 when fp16_scales)
    zeros: torch.Tensor  # int32 [G, N], values in [0, 2**bits)


def _groups(K: int, group_size: int) -> int:
    gs = K if group_size == -1 else group_size
    if gs <= 0 or K % gs:
        raise ValueError(f"group_size {group_size} does not divide K={K}")
    return gs


def pseudo_quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128, zero_point: bool = True,
                    fp16_scales: bool = True) -> QuantizedWeight:
    """Per-group round-to-nearest of ``w`` [N, K], the quantizer AWQ's search and its checkpoint share.

    Asymmetric (``zero_point``): the group's [min, max] is mapped onto [0, 2**bits - 1], the zero
    point is ``round(-min / scale)`` clamped to the grid (AWQ does not force the range to contain 0,
    unlike GPTQ's quantizer). Symmetric: ``scale = max|w| / (2**(bits-1) - 1)``, signed codes in
    [-2**(bits-1), 2**(bits-1) - 1] stored shifted by ``2**(bits-1)``, i.e. a constant zero point of 8
    for 4 bits; that is how AWQ GEMM checkpoints with ``zero_point: false`` store their ``qzeros``
    (the GEMM kernels always compute ``(q - z) * s``).

    ``fp16_scales`` rounds the scales to float16 *before* computing codes, because the checkpoint
    stores them in float16: the returned ``w_hat`` is then bit-for-bit what a loader dequantizes.
    """
    if w.dim() != 2:
        raise ValueError(f"w must be [N, K], got shape {tuple(w.shape)}")
    N, K = w.shape
    gs = _groups(K, group_size)
    G = K // gs
    wg = w.float().reshape(N, G, gs)
    maxq = 2**bits - 1
    if zero_point:
        wmax = wg.amax(dim=2)
        wmin = wg.amin(dim=2)
        scales = (wmax - wmin).clamp(min=1e-5) / maxq
        if fp16_scales:
            scales = scales.half().float()
        zeros = torch.clamp(torch.round(-wmin / scales), 0, maxq)
    else:
        half = 2 ** (bits - 1)
        scales = wg.abs().amax(dim=2).clamp(min=1e-5) / (half - 1)
        if fp16_scales:
            scales = scales.half().float()
        zeros = torch.full_like(scales, float(half))
    q = torch.clamp(torch.round(wg / scales[..., None]) + zeros[..., None], 0, maxq)
    w_hat = (scales[..., None] * (q - zeros[..., None])).reshape(N, K)
    return QuantizedWeight(w_hat, q.reshape(N, K).to(torch.int32), scales.T.contiguous(),
                           zeros.T.contiguous().to(torch.int32))


def fake_quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128, zero_point: bool = True) -> torch.Tensor:
    """Just the dequantized weight of :func:`pseudo_quantize` (what the searches compare)."""
    return pseudo_quantize(w, bits, group_size, zero_point).w_hat


# --------------------------------------------------------------------------- scale search

def activation_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean |x| per input channel over all tokens of ``x`` [..., K] -> [K] (the activation salience)."""
    return x.reshape(-1, x.shape[-1]).abs().float().mean(dim=0)


def weight_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean normalised |w| per input channel of the group's Linears (concatenated rows) -> [K].

    Each weight is divided by its quantization group's max |w| first, so the value says how large a
    channel is *relative to the range it shares*, which is what rounding error scales with.
    """
    w = torch.cat([t.float() for t in weights], dim=0)
    N, K = w.shape
    gs = _groups(K, group_size)
    wg = w.abs().reshape(N, K // gs, gs)
    wg = wg / wg.amax(dim=2, keepdim=True).clamp(min=1e-8)
    return wg.reshape(N, K).mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float) -> torch.Tensor:
    """``s = x_mean**a / w_mean**(1-a)`` (duo scaling; ``w_mean`` None: ``x_mean**a``), normalised by
    ``sqrt(max(s) * min(s))`` so the scales are centred around 1 in log space (scaling all channels
    by the same factor changes nothing after per-group quantization; this keeps values moderate)."""
    s = x_mean.float().clamp(min=1e-4).pow(ratio)
    if w_mean is not None:
        s = s / w_mean.float().clamp(min=1e-4).pow(1 - ratio)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@dataclass
class ScaleSearch:
    scales: torch.Tensor  # [K] chosen s (all ones when no ratio beat plain round-to-nearest)
    ratio: float | None  # the chosen exponent a, None for s = 1
    loss: float  # block output MSE with the chosen s
    loss_rtn: float  # block output MSE with s = 1 (plain round-to-nearest), for reporting
    losses: list[float]  # per ratio of the grid, in order


def search_scale(x_mean: torch.Tensor, weights: Sequence[torch.Tensor], block_loss: Callable[[list[torch.Tensor]], float],
                 *, bits: int = 4, group_size: int = 128, zero_point: bool = True, n_grid: int = 20,
                 duo_scaling: bool = True) -> ScaleSearch:
    """Grid search of the AWQ scale for one scaling group.

    ``weights`` are the group's float weights [N_i, K] (they all read the same input); ``x_mean`` the
    mean |input| per channel [K]. ``block_loss(candidate_weights)`` must return the MSE between the
    block output computed with those weights (on the group's float inputs) and the float output.
    For each ratio ``a = i / n_grid`` (i < n_grid) the candidate is ``Q(W * s) / s``: quantize the
    scaled weight, then undo the scale, which is exactly the function the model computes once
    ``1/s`` is folded into the previous operation. ``s = 1`` (plain round-to-nearest) is evaluated
    too and kept if no ratio beats it, so the search never makes the block worse than RTN on the
    calibration data.
    """
    if n_grid < 1:
        raise ValueError(f"n_grid must be >= 1, got {n_grid}")
    w_mean = weight_mean(weights, group_size) if duo_scaling else None

    def loss_for(s: torch.Tensor | None) -> float:
        if s is None:
            cand = [fake_quantize(w.float(), bits, group_size, zero_point) for w in weights]
        else:
            cand = [fake_quantize(w.float() * s, bits, group_size, zero_point) / s for w in weights]
        return float(block_loss(cand))

    loss_rtn = loss_for(None)
    best_loss, best_ratio, best_s = loss_rtn, None, torch.ones_like(x_mean, dtype=torch.float32)
    losses = []
    for i in range(n_grid):
        ratio = i / n_grid
        s = candidate_scales(x_mean, w_mean, ratio)
        loss = loss_for(s)
        losses.append(loss)
        if loss < best_loss:
            best_loss, best_ratio, best_s = loss, ratio, s
    return ScaleSearch(best_s, best_ratio, best_loss, loss_rtn, losses)


# --------------------------------------------------------------------------- Gram-matrix errors

def linear_output_mse(delta: torch.Tensor, gram: torch.Tensor, count: int) -> float:
    """Mean squared output error of a Linear whose weight is off by ``delta`` [N, K], over the ``count``
    tokens whose ``X^T X`` is ``gram`` [K, K]: ``sum_t sum_n (x_t . delta_n)^2 / (count * N)``.

    Exact, and it uses every calibration token at the cost of N*K^2 per call instead of tokens*N*K,
    which is why the scale search of a Linear-only block (o_proj, down_proj) and the clip search use it.
    """
    delta = delta.float()
    return float(((delta @ gram) * delta).sum() / (count * delta.shape[0]))


def gram_blocks(gram: torch.Tensor, group_size: int) -> torch.Tensor:
    """The diagonal blocks [G, gs, gs] of ``gram`` [K, K], one per quantization group."""
    K = gram.shape[0]
    gs = _groups(K, group_size)
    G = K // gs
    return gram.reshape(G, gs, G, gs).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------- clip search

@torch.no_grad()
def search_clip(w: torch.Tensor, blocks: torch.Tensor, *, bits: int = 4, group_size: int = 128,
                zero_point: bool = True, max_shrink: float = MAX_SHRINK, n_grid: int = CLIP_GRID,
                row_block: int = 1024) -> torch.Tensor:
    """Per (output row, group) clipping threshold [N, G] that minimises that group's share of the
    output error, ``d^T (X_g^T X_g) d`` with ``d = Q(clip(w_g)) - w_g`` (``blocks`` from
    :func:`gram_blocks`, so every calibration token counts and no activations are kept).

    Shrinking a group's range below max|w| trades clipping a few outliers for finer steps for all
    the other weights; thresholds ``max|w| * (1 - i/n_grid)`` for ``i < max_shrink * n_grid`` are
    tried and the best kept per (row, group) (i = 0, no clipping, is always a candidate).
    """
    w = w.float()
    N, K = w.shape
    gs = _groups(K, group_size)
    G = K // gs
    if blocks.shape != (G, gs, gs):
        raise ValueError(f"blocks must be [{G}, {gs}, {gs}], got {tuple(blocks.shape)}")
    blocks = blocks.float()
    best_all = []
    steps = max(1, int(max_shrink * n_grid))
    for r0 in range(0, N, row_block):
        wbg = w[r0:r0 + row_block].reshape(-1, G, gs)  # [n, G, gs]
        n = wbg.shape[0]
        org_max = wbg.abs().amax(dim=2)  # [n, G]
        best_err = torch.full((n, G), float("inf"), device=w.device)
        best_max = org_max.clone()
        for i in range(steps):
            cur = org_max * (1 - i / n_grid)
            clipped = torch.maximum(torch.minimum(wbg, cur[..., None]), -cur[..., None])
            d = fake_quantize(clipped.reshape(n, K), bits, group_size, zero_point).reshape(n, G, gs) - wbg
            err = torch.einsum("ngi,gij,ngj->ng", d, blocks, d)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, cur, best_max)
        best_all.append(best_max)
    return torch.cat(best_all, dim=0)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w`` [N, K] clamped to ``[-max_val, max_val]`` per (row, group) (``max_val`` [N, G])."""
    N, K = w.shape
    gs = _groups(K, group_size)
    wg = w.reshape(N, K // gs, gs)
    m = max_val.to(w.dtype)[..., None]
    return torch.maximum(torch.minimum(wg, m), -m).reshape(N, K)


# --------------------------------------------------------------------------- folding

@torch.no_grad()
def fold_into_norm(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor, offset: float = 0.0) -> None:
    """Divide a norm's effective gain (and its bias) by ``s`` in place, so its output becomes ``y / s``.

    ``offset`` is 1 for norms that multiply by ``1 + weight`` (Gemma family): then the stored weight
    becomes ``(1 + w) / s - 1``. Together with :func:`scale_linear_cols` on every Linear that reads
    the norm's output, the float function is unchanged.
    """
    s = s.to(weight.dtype)
    if offset:
        weight.copy_((weight + offset) / s - offset)
    else:
        weight.div_(s)
    if bias is not None:
        bias.div_(s.to(bias.dtype))


@torch.no_grad()
def fold_into_linear_rows(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor) -> None:
    """Divide a producing Linear's output rows (and bias) by ``s`` in place (``v_proj`` before
    ``o_proj``, ``up_proj`` before ``down_proj``): its output becomes ``y / s``. Valid only when the
    path from this Linear to the next is linear per channel (attention mixes tokens, not channels;
    SiLU(gate) * up scales with up)."""
    weight.div_(s.to(weight.dtype)[:, None])
    if bias is not None:
        bias.div_(s.to(bias.dtype))


@torch.no_grad()
def scale_linear_cols(weight: torch.Tensor, s: torch.Tensor) -> None:
    """Multiply a consuming Linear's input columns by ``s`` in place (its input is now ``x / s``)."""
    weight.mul_(s.to(weight.dtype)[None, :])
