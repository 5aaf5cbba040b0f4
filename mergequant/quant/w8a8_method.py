"""``--method w8a8``: SmoothQuant + per-channel int8 weights, in the compressed-tensors ``int-quantized``
format (vLLM runs it with int8 GEMMs, activations quantized per token at run time). The files are
``mergequant.checkpoint_formats.compressed_tensors``, held as ``W8A8Method.format``; this module is the math.

Per decoder layer (materialized in float32 by the layer runner):

1. **Smoothing groups come from the family's description**: the norm-fed groups of
   ``Architecture.scaling`` (``input_layernorm -> q,k,v`` and ``post_attention_layernorm -> gate,up``
   for Llama/Mistral/Qwen; ``pre_feedforward_layernorm -> gate,up`` for Gemma 2/3, whose
   ``post_attention_layernorm`` acts on the attention output; Phi-3's fused ``qkv_proj`` and
   ``gate_up_proj`` as one Linear each). One forward over the calibration inputs with hooks on those
   norms records the per-input-channel absmax of each norm's output over all calibration tokens.
   ``find_smoothing_groups`` finds the same groups structurally (a Linear whose input *is* a norm's
   output); the tests check it agrees with every description, and ``smooth_layer`` uses it for a
   module without one.
   ``o_proj`` and ``down_proj`` are not smoothed: their inputs come from attention / the gated
   activation, where a scale would have to be folded into ``v_proj`` (valid only without GQA
   mismatches) and ``up_proj``; SmoothQuant's reference recipe and llm-compressor's default Llama
   mappings smooth only the two norm-fed groups, and that is where the outlier channels are.
2. ``s = smooth_scales(act_absmax, max_rows |W|, alpha)`` per group; the norm is divided by ``s`` (Gemma's
   ``(1 + w)`` norms are detected by probing the norm with a zero weight and handled:
   ``w' = (1 + w) / s - 1``) and the Linears' columns are multiplied by ``s``.
3. The fold is checked: the layer's output on the first calibration chunk must match the unfolded
   output (relative max error 1e-3); otherwise the fold is undone, a warning is logged and the layer is
   quantized unsmoothed (the run stays correct for architectures that reuse a norm output elsewhere).
4. Each quantized Linear gets per-output-channel symmetric int8 weights (``weight`` int8 [out, in],
   ``weight_scale`` [out, 1] in the float dtype), and its dequantized weight is put back into the
   layer so the following layers are calibrated on the quantized model. The folded norms are written
   by the driver from the module.

``--bits``: 8-bit only (the default for it). ``--group-size`` does not apply.
"""

from __future__ import annotations

import torch
from torch import nn

from mergequant.architectures import Architecture
from mergequant.checkpoint_formats import get_format
from mergequant.errors import MergeQuantError
from mergequant.quant.int8 import (channel_int8_dequantize, channel_int8_quantize, fold_into_linear, fold_into_norm,
                                   smooth_scales, weight_column_absmax)
from mergequant.quant.method import QuantContext, QuantLinear, QuantMethod
from mergequant.quant.norms import norm_offset

FOLD_CHECK_RTOL = 1e-3


# ---- smoothing (usable on any decoder layer; tested on its own) ------------------------------------------

def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (not isinstance(m, nn.Linear) and "norm" in type(m).__name__.lower()
            and isinstance(w, torch.Tensor) and w.dim() == 1)


def _absmax_hook(absmax: dict, first_out: dict, state: dict, name: str):
    """Forward hook: running per-channel absmax of a norm's output; chunk 0's output itself kept."""
    def hook(mod, args, out):
        t = out[0] if isinstance(out, (tuple, list)) else out
        a = t.detach().float().abs().reshape(-1, t.shape[-1]).amax(dim=0)
        absmax[name] = a if name not in absmax else torch.maximum(absmax[name], a)
        if state["chunk"] == 0:
            first_out[name] = t
    return hook


@torch.no_grad()
def _run_recording(layer: nn.Module, inputs, norms: dict[str, nn.Module], linears: dict[str, nn.Module]):
    """One pass of ``layer`` over ``inputs``: (norm output absmax over every token, chunk 0's norm
    outputs, chunk 0's Linear inputs, the layer's output on chunk 0)."""
    absmax: dict[str, torch.Tensor] = {}
    first_out: dict[str, torch.Tensor] = {}  # chunk 0: the tensors themselves (kept alive: ids stay unique)
    first_in: dict[str, torch.Tensor] = {}
    state = {"chunk": 0}

    def lin_hook(name):
        def hook(mod, args):
            if state["chunk"] == 0 and args:
                first_in[name] = args[0]
        return hook

    handles = [m.register_forward_hook(_absmax_hook(absmax, first_out, state, n)) for n, m in norms.items()]
    handles += [m.register_forward_pre_hook(lin_hook(n)) for n, m in linears.items()]
    first = None
    try:
        for j, (h, kw) in enumerate(inputs):
            state["chunk"] = j
            out = layer(h, **kw)
            if j == 0:
                first = out[0] if isinstance(out, (tuple, list)) else out
    finally:
        for hd in handles:
            hd.remove()
    return absmax, first_out, first_in, first


@torch.no_grad()
def find_smoothing_groups(layer: nn.Module, inputs) -> tuple[list[tuple[str, list[str], torch.Tensor]], list]:
    """Run ``layer`` over ``inputs`` once: ([(norm name, [Linear names fed by it], act absmax [H])], the
    layer's output on the first chunk), found structurally (see the module docstring).

    Groups are returned only for norms that feed at least one Linear."""
    norms = {n: m for n, m in layer.named_modules() if _is_norm(m)}
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    absmax, first_out, first_in, first = _run_recording(layer, inputs, norms, linears)
    groups = []
    for nname, t in first_out.items():
        fed = [lname for lname, x in first_in.items() if x is t]
        if fed:
            groups.append((nname, fed, absmax[nname]))
    return groups, first


def described_smoothing_groups(arch: Architecture, scaling=None) -> list[tuple[str, list[str]]]:
    """The norm-fed scaling groups of a family (or of one layer's ``scaling``): [(norm, [modules it
    feeds])]; a MoE router reading the norm is listed too (scaled with the experts, not quantized)."""
    return [(g.prev, list(g.linears) + list(g.passengers)) for g in scaling or arch.scaling if g.prev_kind == "norm"]


@torch.no_grad()
def smooth_layer(layer: nn.Module, inputs, alpha: float, *, check: bool = True, log=None,
                 groups: list[tuple[str, list[str]]] | None = None, offset: float | None = None,
                 ) -> list[tuple[str, list[str]]]:
    """SmoothQuant-fold ``layer`` in place (see the module docstring); returns the groups smoothed
    ([] when there was nothing to smooth or the fold check failed and the fold was undone).

    ``groups``: [(norm, [Linears])] as described for the family; None finds them structurally.
    ``offset``: the norms' gain offset (1.0 for ``(1 + w)`` norms); None probes each norm."""
    if groups is None:
        found, ref = find_smoothing_groups(layer, inputs)
    else:
        norms = {n: layer.get_submodule(n) for n, _ in groups}
        absmax, _, _, ref = _run_recording(layer, inputs, norms, {})
        found = [(n, list(lnames), absmax[n]) for n, lnames in groups]
    if not found:
        return []
    mods = dict(layer.named_modules())
    saved = {n: p.data.clone() for n, p in layer.named_parameters()
             if any(n.startswith(g[0] + ".") or any(n.startswith(x + ".") for x in g[1]) for g in found)}
    for nname, lnames, act in found:
        norm = mods[nname]
        s = smooth_scales(act, weight_column_absmax([mods[x].weight for x in lnames]), alpha)
        bias = getattr(norm, "bias", None)
        fold_into_norm(norm.weight, s, norm_offset(norm) if offset is None else offset,
                       bias if isinstance(bias, torch.Tensor) else None)
        for x in lnames:
            fold_into_linear(mods[x].weight, s)
    if check and ref is not None:
        h, kw = next(iter(inputs))
        out = layer(h, **kw)
        out = out[0] if isinstance(out, (tuple, list)) else out
        err = (out.float() - ref.float()).abs().max().item()
        scale = ref.float().abs().max().item() or 1.0
        if not err <= FOLD_CHECK_RTOL * scale:
            params = dict(layer.named_parameters())
            for n, v in saved.items():
                params[n].data.copy_(v)
            if log:
                log(f"warning: SmoothQuant folding changed the layer's output (max error {err:.3g}); "
                    "this layer is quantized without smoothing")
            return []
    return [(n, lnames) for n, lnames, _ in found]


# ---- the method ---------------------------------------------------------------------------------------------

class W8A8Method(QuantMethod):
    name = "w8a8"
    format = get_format("compressed_tensors")
    calibrated = True
    bits_allowed = (8,)
    uses_group_size = False  # one scale per output channel
    smooth = True  # False: plain per-channel int8 weights (for comparisons)

    def validate(self, opts, linears: list[QuantLinear]) -> None:
        if not 0.0 <= opts.alpha <= 1.0:
            raise MergeQuantError(f"--alpha must be in [0, 1] (SmoothQuant migration strength), got {opts.alpha}")

    def process_layer(self, ctx: QuantContext, i, layer, inputs, todo, modules) -> None:
        if self.smooth:
            smoothed = smooth_layer(layer, inputs, ctx.opts.alpha, log=lambda m: ctx.log(f"layer {i}: {m}"),
                                    groups=described_smoothing_groups(ctx.arch, ctx.arch.layer_scaling(ctx.source.config, i)),
                                    offset=ctx.arch.norm_offset)
            ctx.extra.setdefault("smoothed", {})[i] = smoothed
        fdtype = self.float_dtype(ctx.opts)
        for suffix, lin in todo.items():
            mod = modules[suffix]
            W = mod.weight.data.float()
            codes, scale = channel_int8_quantize(W, fdtype)
            W_hat = channel_int8_dequantize(codes, scale)
            ctx.result.proxy_error += float(((W - W_hat) ** 2).sum() / (W ** 2).sum().clamp_min(1e-30))
            mod.weight.data.copy_(W_hat.to(mod.weight.device, mod.weight.dtype))
            ctx.write(lin, self.format.pack(codes, scale))

    def card_settings(self, opts) -> list[tuple[str, str]]:
        return [("bits", "8 (weights int8 per output channel; activations int8 per token, dynamic)"),
                ("SmoothQuant alpha", str(opts.alpha) if self.smooth else "off"),
                ("format", "compressed-tensors `int-quantized`")]

    def card_tags(self, opts) -> list[str]:
        return [self.name, "8bit", "int8", "smoothquant", "compressed-tensors"]
