"""AWQ 4-bit: the math. Written in the AWQ GEMM on-disk format (qweight/qzeros/scales, packed along N;
``mergequant.checkpoint_formats.awq``, held as ``AWQMethod.format``).

Per decoder layer (float32, materialized by the layer runner):

1. One pass over the calibration chunks with hooks records, for the inputs of the four scaling
   groups (q/k/v, o, gate/up, down), the mean |x| per channel and ``X^T X`` over every calibration
   token; the attention and MLP inputs themselves are kept for the first chunks only, up to
   ``SEARCH_TOKENS`` tokens, with the attention module's call arguments (rotary embeddings, mask).
   Memory per layer is then about ``SEARCH_TOKENS x 2 hidden`` floats plus the block outputs plus
   ``3 hidden^2 + intermediate^2`` floats for the Gram matrices, whatever ``--samples`` is.
2. For each scaling group of the family's description (``Architecture.scaling``, in order; for Llama
   input_layernorm -> q,k,v; v_proj -> o_proj when the shapes match; post_attention_layernorm (or
   Gemma 2/3's pre_feedforward_layernorm) -> gate,up; up_proj -> down_proj; for Phi-3 the fused
   qkv_proj and gate_up_proj are one group each and v/up are row chunks of them) the
   scale ``s`` is searched (:func:`mergequant.quant.awq.search_scale`) on the block output against
   the float output: the whole attention module or MLP run on the kept inputs, or, for o_proj and
   down_proj, the Linear's exact output error over all tokens from ``X^T X``. Then ``s`` is folded:
   the previous op's output is divided by ``s`` and the group's input columns multiplied by ``s``.
   The float function of the layer is unchanged by folding, so the statistics of step 1 stay valid
   (rescaled by ``1/s``).
3. Each Linear's weights are clipped per group (error from the diagonal blocks of ``X^T X``; not q/k
   (``Architecture.no_clip``), whose errors are amplified through the softmax and whose best clip
   depends on the other factor of q.k) and quantized; the codes are
   written and the dequantized weights put back into the layer, which the runner then runs to make
   the next layer's inputs.

The driver writes the (now folded) norms and biases from the module after ``process_layer``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection

import torch
from torch import nn

from mergequant.architectures import Architecture, architecture_for_layer_class
from mergequant.checkpoint_formats import get_format
from mergequant.errors import MergeQuantError
from mergequant.quant import awq
from mergequant.quant.method import QuantContext, QuantLinear, QuantMethod

SEARCH_TOKENS = 16384  # calibration tokens per layer kept to judge the attention and MLP blocks


def _unsupported(what: str) -> MergeQuantError:
    return MergeQuantError(f"--method awq has no scaling map for {what}; use --method gptq")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class ScalingGroup:
    """One AWQ scaling group of a materialized layer: the description's ``ScaleGroup`` bound to its
    modules. ``prev`` (norm or Linear) produces the input of ``linears``; ``rows`` are the rows of a
    Linear ``prev`` that produce it (all of them unless ``prev`` is fused); ``point`` names where that
    input is recorded; ``block`` the module AWQ judges the scale on (None: the Linears alone)."""

    def __init__(self, name: str, prev: nn.Module, prev_kind: str, linears: list[str], block: str | None,
                 point: str, rows: slice | None = None, offset: float = 0.0, passengers: list[nn.Module] = ()):
        self.name, self.prev, self.prev_kind, self.linears, self.block = name, prev, prev_kind, linears, block
        self.point, self.rows, self.offset = point, rows, offset
        self.passengers = list(passengers)  # scaled with the Linears, never quantized (MoE routers)


def capture_points(arch: Architecture, sequential=None) -> dict[str, str]:
    """Linear -> the point its input is recorded at: the first Linear of its true-sequential group
    (the members of a group read one tensor, e.g. q/k/v the attention norm's output; with all-token
    calibration every expert's gate/up too), except experts' down projections, which each read their
    own input. ``sequential``: one layer's groups (default: the family's dense ones)."""
    points = {}
    for group in sequential or arch.sequential:
        for s in group:
            part = arch.experts.parse_expert_module(s) if arch.is_moe else None
            points[s] = s if part is not None and part[1] == 2 else group[0]
    return points


def scaling_groups(layer: nn.Module, modules: dict[str, nn.Linear], arch: Architecture | None = None,
                   sequential=None, scaling=None) -> list[ScalingGroup]:
    """The scaling map of ``arch`` (by default the family whose decoder-layer class ``layer`` is) bound
    to ``layer``'s modules; groups whose shapes do not allow the fold (``v -> o`` under grouped-query
    attention) are left out. Raises MergeQuantError for an unknown layer or a missing Linear."""
    cls = type(layer).__name__
    try:
        arch = arch or architecture_for_layer_class(cls)
    except MergeQuantError:
        raise _unsupported(f"decoder layer {cls}") from None
    missing = [s for group in sequential or arch.sequential for s in group if s not in modules]
    if missing:
        raise _unsupported(f"decoder layer {cls} without {', '.join(missing)}")
    points = capture_points(arch, sequential)
    groups = []
    for g in scaling or arch.scaling:
        prev = layer.get_submodule(g.prev)
        rows = None
        if g.prev_kind == "linear":
            rows = g.rows(prev.out_features, modules[g.linears[0]].in_features)
            if rows is None:  # e.g. grouped-query attention: v's rows are shared by several heads
                continue
        groups.append(ScalingGroup(g.name, prev, g.prev_kind, list(g.linears), g.block, points[g.linears[0]],
                                   rows, arch.norm_offset, [layer.get_submodule(p) for p in g.passengers]))
    return groups


class _Capture:
    """What the searches need from one pass over the calibration chunks: per capture point the mean
    |x| per channel and ``X^T X`` over every token, and for the inputs of judged blocks (attention,
    MLP) the inputs themselves (first chunks, up to ``budget`` tokens) with the blocks' call arguments."""

    def __init__(self, budget: int, keep_points: Collection[str] = ()):
        self.budget = budget
        self.keep_points = set(keep_points)  # points whose inputs are kept (a block is judged on them)
        self.x: dict[str, list[torch.Tensor]] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.gram: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.calls: dict[str, list[tuple[tuple, dict]]] = {}  # block -> its (args, kwargs) per kept chunk
        self.keep = True  # whether the current chunk is within the budget

    def add(self, point: str, x: torch.Tensor) -> None:
        x = x.detach()
        flat = x.reshape(-1, x.shape[-1]).float()
        if point in self.gram:
            self.abs_sum[point] += flat.abs().sum(dim=0)
            self.gram[point].addmm_(flat.T, flat)
            self.count[point] += flat.shape[0]
        else:
            self.abs_sum[point] = flat.abs().sum(dim=0)
            self.gram[point] = flat.T @ flat
            self.count[point] = flat.shape[0]
        if self.keep and point in self.keep_points:
            self.x.setdefault(point, []).append(x.float())

    def mean(self, point: str) -> torch.Tensor:
        return self.abs_sum[point] / self.count[point]

    def rescale(self, point: str, s: torch.Tensor) -> None:
        """The inputs at ``point`` are now ``x / s`` (scale folded into the previous op)."""
        self.gram[point] = self.gram[point] / s[:, None] / s[None, :]
        if point in self.x:
            self.x[point] = [x / s for x in self.x[point]]


@torch.no_grad()
def capture(layer: nn.Module, inputs, modules: dict[str, nn.Linear], budget: int = SEARCH_TOKENS,
            arch: Architecture | None = None, sequential=None, scaling=None) -> _Capture:
    """Run ``layer`` over ``inputs`` once, recording what the scaling groups need (see module doc):
    every quantized Linear's input statistics at its capture point, and for each judged block its
    inputs and call arguments (rotary embeddings, mask). ``arch``: by default the layer's family."""
    arch = arch or architecture_for_layer_class(type(layer).__name__)
    groups = scaling_groups(layer, modules, arch, sequential, scaling)
    points = dict.fromkeys(capture_points(arch, sequential).values())
    cap = _Capture(budget, {g.point for g in groups if g.block})
    hooks = []
    for point in points:
        hooks.append(modules[point].register_forward_pre_hook(lambda m, args, p=point: cap.add(p, args[0])))

    def block_pre(name):
        def hook(m, args, kwargs):
            if cap.keep:
                cap.calls.setdefault(name, []).append((tuple(args), dict(kwargs)))
        return hook

    for block in dict.fromkeys(g.block for g in groups if g.block):
        hooks.append(layer.get_submodule(block).register_forward_pre_hook(block_pre(block), with_kwargs=True))
    seen = 0
    try:
        for hidden, kw in inputs:
            cap.keep = seen == 0 or seen + hidden.shape[0] * hidden.shape[1] <= budget
            layer(hidden, **kw)
            if cap.keep:
                seen += hidden.shape[0] * hidden.shape[1]
    finally:
        for h in hooks:
            h.remove()
    return cap


def _with_hidden(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    """The block's recorded call with its hidden states replaced by ``x``, in the recorded shape (a MoE
    block is called with [B, T, H]; its Linears, where ``x`` was recorded, see the flattened [B*T, H])."""
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": x.reshape(kwargs["hidden_states"].shape)}
    return (x.reshape(args[0].shape), *args[1:]), kwargs


@contextlib.contextmanager
def _swapped(mods: list[nn.Linear], weights: list[torch.Tensor]):
    saved = [m.weight.data for m in mods]
    try:
        for m, w in zip(mods, weights):
            m.weight.data = w.to(m.weight.dtype)
        yield
    finally:
        for m, w in zip(mods, saved):
            m.weight.data = w


class _Block:
    """The function a scaling group is judged by: ``loss(candidate weights)`` = output MSE vs float.

    A judged block (attention, MLP) is run on the recorded inputs (up to ``SEARCH_TOKENS`` tokens)
    with its recorded call arguments; a Linear-only group (o_proj, down_proj) is scored exactly over
    every calibration token from its ``X^T X`` (:func:`awq.linear_output_mse`)."""

    def __init__(self, group: ScalingGroup, layer: nn.Module, modules: dict[str, nn.Linear], cap: _Capture):
        self.mods = [modules[s] for s in group.linears]
        self.block = group.block
        self.layer = layer
        self.cap, self.point = cap, group.point
        if self.block is None:
            self.w0 = self.mods[0].weight.data.float().clone()
        else:
            self.ref = self.outputs()  # float output, before any scaling

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        module = self.layer.get_submodule(self.block)
        outs = []
        for x, (a, kw) in zip(self.cap.x[self.point], self.cap.calls[self.block]):
            a, kw = _with_hidden(a, kw, x)
            outs.append(_first(module(*a, **kw)))
        return outs

    @torch.no_grad()
    def loss(self, weights: list[torch.Tensor]) -> float:
        if self.block is None:
            return awq.linear_output_mse(weights[0] - self.w0, self.cap.gram[self.point], self.cap.count[self.point])
        with _swapped(self.mods, weights):
            outs = self.outputs()
        sq = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(outs, self.ref))
        return sq / sum(r.numel() for r in self.ref)


@torch.no_grad()
def apply_scale(group: ScalingGroup, modules: dict[str, nn.Linear], s: torch.Tensor) -> None:
    """Fold ``1/s`` into the group's previous op (a norm's gain, or the rows of a Linear that produce
    the input) and ``s`` into its Linears' input columns (in place)."""
    if group.prev_kind == "norm":
        awq.fold_into_norm(group.prev.weight.data, getattr(group.prev, "bias", None), s, group.offset)
    else:
        rows = group.rows or slice(None)
        b = group.prev.bias
        awq.fold_into_linear_rows(group.prev.weight.data[rows], None if b is None else b.data[rows], s)
    for suffix in group.linears:
        awq.scale_linear_cols(modules[suffix].weight.data, s)
    for m in group.passengers:
        awq.scale_linear_cols(m.weight.data, s)


class AWQMethod(QuantMethod):
    name = "awq"
    format = get_format("awq_gemm")
    calibrated = True
    bits_allowed = (4,)

    # ---- before any work ---------------------------------------------------------------------------
    def validate(self, opts, linears: list[QuantLinear]) -> None:
        if opts.n_grid < 1:
            raise MergeQuantError(f"--n-grid must be >= 1, got {opts.n_grid}")
        self.format.validate(opts, linears)  # (the driver checked every layer has all of its family's Linears)

    # ---- the work ----------------------------------------------------------------------------------
    def process_layer(self, ctx: QuantContext, i, layer, inputs, todo, modules) -> None:
        from mergequant.quant.moe import experts_of

        o = ctx.opts
        arch = ctx.arch
        seq, scal = ctx.groups(i), arch.layer_scaling(ctx.source.config, i)
        groups = scaling_groups(layer, modules, arch, seq, scal)  # raises for a missing Linear before any search
        stats = ctx.extra.setdefault("awq", [])
        qkw = {"bits": o.bits, "group_size": o.group_size, "zero_point": o.zero_point}
        cap = capture(layer, inputs, modules, arch=arch, sequential=seq, scaling=scal)
        for m in experts_of(layer):  # statistics taken: judging blocks needs only the routed forward
            m.calibrating = False
        point_of = capture_points(arch, seq)
        for g in groups:
            if not all(s in todo for s in g.linears):
                continue
            block = _Block(g, layer, modules, cap)
            res = awq.search_scale(cap.mean(g.point), [modules[s].weight.data for s in g.linears], block.loss,
                                   n_grid=o.n_grid, duo_scaling=o.duo_scaling, **qkw)
            stats.append({"layer": i, "group": g.name, "ratio": res.ratio, "loss": res.loss, "loss_rtn": res.loss_rtn})
            ctx.result.proxy_error += res.loss
            if res.ratio is not None:
                apply_scale(g, modules, res.scales)
                cap.rescale(g.point, res.scales)
            del block
        for suffix in (s for g in seq for s in g):
            if suffix not in todo:
                continue
            mod, lin = modules[suffix], todo[suffix]
            W = mod.weight.data.float()
            if suffix not in arch.no_clip:
                blocks = awq.gram_blocks(cap.gram[point_of[suffix]], o.group_size)
                W = awq.apply_clip(W, awq.search_clip(W, blocks, **qkw), o.group_size)
            qw = awq.pseudo_quantize(W, **qkw)
            mod.weight.data.copy_(qw.w_hat.to(mod.weight.dtype))
            ctx.write(lin, self.pack(qw))

    @classmethod
    def pack(cls, qw: awq.QuantizedWeight) -> dict[str, torch.Tensor]:
        """AWQ GEMM tensors of one Linear from :func:`awq.pseudo_quantize`'s codes (``cls.format``)."""
        return cls.format.pack(qw.q.T, qw.zeros, qw.scales)

    # ---- describing the settings -------------------------------------------------------------------
    def card_settings(self, opts) -> list[tuple[str, str]]:
        gs = "per row (-1)" if opts.group_size == -1 else str(opts.group_size)
        return [("bits", str(opts.bits)), ("group size", gs), ("zero point", str(opts.zero_point)),
                ("scale grid (n_grid)", str(opts.n_grid)), ("duo scaling", str(opts.duo_scaling)),
                ("format", "AWQ GEMM")]

    def card_tags(self, opts) -> list[str]:
        return [self.name, f"{opts.bits}bit"]
