"""GPTQ and round-to-nearest: the math. Both write the GPTQ on-disk format (qweight/qzeros/scales/
g_idx, ``mergequant.checkpoint_formats.gptq``), which each holds as ``method.format``; neither
inherits the other.

GPTQ runs per decoder layer in true-sequential order (the family's ``Architecture.sequential``, for
Llama k,v,q | o | up,gate | down): each group's
input Hessians are accumulated on activations computed with the previous groups already quantized,
then the group is solved and its dequantized weights put back into the layer.
"""

from __future__ import annotations

import torch

from mergequant.checkpoint_formats import get_format
from mergequant.errors import MergeQuantError
from mergequant.memory import mapped_allocations, release_free_memory
from mergequant.quant import formats
from mergequant.quant.compact import QuantizedForward
from mergequant.quant.gptq import (
    ROW_BLOCK_BYTES,
    SUPPORTED_BITS,
    HessianAccumulator,
    gptq_quantize,
    gptq_quantize_batch,
    quantize_rtn,
)
from mergequant.quant.method import QuantContext, QuantLinear, QuantMethod


# With --moe-calibration all, every expert's down_proj reads an input of its own: their Hessians are
# accumulated a batch at a time, at most this many bytes of them (one at a time for Mixtral-8x7B, whose
# down Hessian is 14336^2 float32 = 822 MB; all at once for small models, in one pass over the layer).
EXPERT_HESSIAN_BYTES = 512 * 2**20
# The experts' gate/up products on their routed tokens, kept from the down projections' statistics pass
# for the layer's output pass when they fit (tiny Mixtral: 96 MiB; Mixtral-8x7B, 4k tokens: 448 MiB)
EXPERT_REPLAY_BYTES = 1 << 30
# The experts' input (and the router's choices) per calibration token, kept from the gate/up statistics pass
# for the down projections' passes when it fits: those passes then skip the layer up to the experts (norms,
# attention replay, router). Tiny Mixtral: 16 MiB; Mixtral-8x7B, 128 x 2048 tokens in bfloat16: 2 GiB (not kept)
EXPERT_INPUT_BYTES = 1 << 30
# Trims inside a layer only ahead of Hessians at least this big (K >= 1449); see _release_before
TRIM_BEFORE_HESSIAN_BYTES = 8 * 2**20
GPU_ROW_BLOCK_BYTES = 512 * 2**20  # GPTQ's working copy of W's rows on a GPU (CPU: gptq.ROW_BLOCK_BYTES)


def _expert_stats_dtype(inputs) -> torch.dtype | None:
    """The dtype in which the experts' gate/up run to produce their down projections' statistics:
    bfloat16 when the checkpoint's activations are stored in it and the device computes bfloat16 fast
    (``hardware.fast_bfloat16``), else the layer's compute dtype (None).

    Why: with all-token calibration every expert's gate and up run on every calibration token only
    to produce its down projection's Hessian, the largest float cost of an MoE layer after the
    Hessians themselves; a bfloat16 product is ~3x faster on CPUs with AVX-512 BF16 or AMX (and on
    GPUs). It is the precision the model runs in (and GPTQModel calibrates in). The Hessian is still
    accumulated in float32, the layer's output (what the next layer receives) still computed in the
    compute dtype, and gate/up's own statistics come from the unrounded input. On a CPU without
    bfloat16 instructions the same products in bfloat16 are ~16x slower than in float32 (tiny
    Mixtral: 201 s against 12 s), so there they stay in the compute dtype."""
    from mergequant.hardware import fast_bfloat16

    hidden = getattr(inputs, "hidden", None)
    if not hidden or hidden[0].dtype != torch.bfloat16:
        return None
    return torch.bfloat16 if fast_bfloat16(hidden[0].device) else None


def _calibration_tokens(inputs) -> tuple[int, torch.dtype] | None:
    """(calibration tokens, compute dtype) of a layer's inputs, for sizing what a pass keeps per token;
    None when the inputs hold no hidden states."""
    hidden = getattr(inputs, "hidden", None)
    if not hidden:
        return None
    return sum(h.shape[:-1].numel() for h in hidden), inputs.compute_dtype or hidden[0].dtype


def _fits(inputs, per_token: int, budget: int) -> bool:
    """Whether ``per_token`` values per calibration token, in the compute dtype, fit ``budget`` bytes."""
    sized = _calibration_tokens(inputs)
    return sized is not None and sized[0] * per_token * torch.empty((), dtype=sized[1]).element_size() <= budget


def _release_before(k: int) -> None:
    """Return the freed heap to the OS before a capture or solve whose Hessian (K x K float32) is at least
    ``TRIM_BEFORE_HESSIAN_BYTES``: its solve's large temporaries are mapped (``mapped_allocations``), so
    freed activations still resident would add to the peak. Below that the matrices are too small to
    move the peak, and the next pass would only fault the same memory in again (the tiny Mixtral's 24
    trims inside layers cost 5-10% of its run). The runner still trims between layers."""
    if 4 * k * k >= TRIM_BEFORE_HESSIAN_BYTES:
        release_free_memory()


def _replay_attention(ctx, layer, inputs, kept=None) -> object:
    """Install an ``AttentionReplay`` on ``layer``'s attention (the rest of the layer's passes, the output
    pass included, reuse its recorded output); False when it does not fit or the layer has none.
    ``kept``: (attention-input checksums, outputs) per chunk from the o_proj pass, when it kept them."""
    from mergequant.architectures import resolve
    from mergequant.quant.replay import AttentionReplay

    attn = resolve(layer, ctx.arch.attention)
    if attn is not None and kept:
        return AttentionReplay.install_recorded(attn, *kept) or False
    sized = _calibration_tokens(inputs)
    if attn is None or sized is None:
        return False
    return AttentionReplay.install(attn, len(inputs.hidden), sized[0], inputs.hidden[0].shape[-1], sized[1]) or False


def _top_k(ctx) -> int:
    k = ctx.source.config.get("num_experts_per_tok")
    return k if isinstance(k, int) and k > 0 else 1


def _check_damp(opts) -> None:
    # rtn checks it too: the value is recorded in the config (damp_percent) whichever method ran
    if not 0 < opts.damp < 1:
        raise MergeQuantError(f"--damp must be in (0, 1), got {opts.damp}")


def _card_settings(fmt, opts) -> list[tuple[str, str]]:
    gs = "per row (-1)" if opts.group_size == -1 else str(opts.group_size)
    return [("bits", str(opts.bits)), ("group size", gs), ("act order (desc_act)", str(opts.desc_act)),
            ("symmetric", str(opts.sym)), ("checkpoint format", fmt.checkpoint_format(opts))]


class RTNMethod(QuantMethod):
    """Round-to-nearest per group: the no-calibration baseline, same files as GPTQ."""

    name = "rtn"
    format = get_format("gptq")
    calibrated = False
    bits_allowed = SUPPORTED_BITS

    def validate(self, opts, linears: list[QuantLinear]) -> None:
        self.format.validate(opts, linears)
        _check_damp(opts)

    def write_codes(self, ctx: QuantContext, lin: QuantLinear, q_kn, scales, zeros, g_idx) -> None:
        """Pack (``self.format``) and write codes given in checkpoint orientation [K, N]."""
        ctx.write(lin, self.format.pack(q_kn, scales, zeros, g_idx, ctx.opts))

    def quantize_weight(self, ctx: QuantContext, lin: QuantLinear, W: torch.Tensor) -> None:
        o = ctx.opts
        q, scales, zeros = quantize_rtn(W, o.bits, o.group_size, o.sym)
        self.write_codes(ctx, lin, q.T, scales, zeros, formats.g_idx_for(lin.in_features, o.group_size))

    def card_settings(self, opts) -> list[tuple[str, str]]:
        return _card_settings(self.format, opts)

    def card_tags(self, opts) -> list[str]:
        return [self.name, f"{opts.bits}bit", "gptq"]


class GPTQMethod(QuantMethod):
    """GPTQ per decoder layer. The float weights of the quantized Linears are never materialized:
    the solver reads each from the memory-mapped checkpoint, and once solved the module computes
    from its codes (``compact.QuantizedForward``, bit-identical W_hat), so the layer costs about an
    eighth of its float32 size (4-bit) while the Hessians are accumulated."""

    name = "gptq"
    format = get_format("gptq")
    calibrated = True
    defers_weights = True
    bits_allowed = SUPPORTED_BITS

    def validate(self, opts, linears: list[QuantLinear]) -> None:
        self.format.validate(opts, linears)
        _check_damp(opts)

    def write_codes(self, ctx: QuantContext, lin: QuantLinear, q_kn, scales, zeros, g_idx) -> None:
        """Pack (``self.format``) and write codes given in checkpoint orientation [K, N]."""
        ctx.write(lin, self.format.pack(q_kn, scales, zeros, g_idx, ctx.opts))

    def card_settings(self, opts) -> list[tuple[str, str]]:
        extra = [] if opts.calib_dtype == "float32" else [("calibration forward dtype", opts.calib_dtype)]
        return _card_settings(self.format, opts) + extra

    def card_tags(self, opts) -> list[str]:
        return [self.name, f"{opts.bits}bit", "gptq"]

    def process_layer(self, ctx, i, layer, inputs, todo, modules) -> None:
        widest = max(m.in_features for m in modules.values())
        dev = inputs.hidden[0].device if inputs.hidden else torch.device("cpu")  # where the layer runs
        from mergequant.quant.moe import MoECalibration

        moe = ctx.extra.get("moe") or MoECalibration()
        starved: set[int] = set()
        expert_inputs = None  # per chunk (x, router's choices), kept by the gate/up pass for the downs' passes
        replay = None
        kept = None  # the attention's outputs, built from the o_proj pass (see _keeps_attention_output)
        # each group is quantized after the previous ones, on inputs computed with them already quantized
        for group in ctx.groups(i):
            if replay is None and not any(s.startswith(ctx.arch.attention + ".") for s in group):
                replay = _replay_attention(ctx, layer, inputs, kept)  # the attention is final from here on
                kept = None
            names = [s for s in group if s in todo and s in modules]
            experts = {s: ctx.arch.experts.parse_expert_module(s) for s in names} if ctx.arch.is_moe else {}
            experts = {s: p for s, p in experts.items() if p is not None}
            if experts and all(p[1] != 2 for p in experts.values()):
                # the experts' gate/up pass is the first to reach the experts: it counts the router's
                # choices, which decide (routed calibration) which experts are too starved to solve
                width = max(modules[s].in_features for s in names) + _top_k(ctx)  # x and the router's choices
                expert_inputs = [] if _fits(inputs, width, EXPERT_INPUT_BYTES) else None
                accs = self._expert_gate_up_stats(layer, inputs, names, experts, moe, i, expert_inputs)
                starved = set(moe.starved(i, ctx.result.calib_tokens, _top_k(ctx)))
                if starved:
                    self._round_starved(ctx, i, [s for s in names if experts[s][0] in starved], todo, modules, dev)
                    names = [s for s in names if experts[s][0] not in starved]
                self._solve_shared(ctx, accs, names, todo, modules)
                continue
            if experts and starved:
                self._round_starved(ctx, i, [s for s in names if experts[s][0] in starved], todo, modules, dev)
                names = [s for s in names if experts[s][0] not in starved]
            acts = ([], []) if experts and self._keeps_expert_activations(ctx, inputs, modules, names, moe) else None
            if experts and names:
                self._note_stats_dtype(ctx, inputs, kept_routed=acts is not None)
            for batch in self._capture_batches(names, modules, experts):
                if experts:
                    accs = self._expert_down_stats(layer, inputs, batch, experts, moe, modules, acts, expert_inputs)
                    self._solve_shared(ctx, accs, batch, todo, modules)
                    continue
                attn = self._keeps_attention_output(ctx, layer, inputs, batch, modules)
                record = ([], []) if attn is not None else None
                accs = self._capture(layer, inputs, batch, modules, widest, record=record, attention=attn)
                self._solve_shared(ctx, accs, batch, todo, modules)
                if record is not None and len(record[0]) == len(record[1]) == len(inputs):
                    o_proj = modules[batch[0]]  # now computing from its codes: the attention's final output
                    kept = (record[0], [(o_proj(x), None) for x in record[1]])
                del record
            if acts is not None:  # the downs are solved: the output pass reuses the gate/up products
                from mergequant.quant.moe import ExpertActivationReplay, experts_of

                (experts_mod,) = experts_of(layer)
                ExpertActivationReplay.install(experts_mod, *acts)

    # ---- routed experts: statistics straight from the experts' input ---------------------------------------
    # A hook-driven capture would run every expert through the layer's forward once per group (all-token
    # calibration: each on every token) only to see its inputs. Instead each pass stops the layer at the
    # experts module and computes what the statistics need from its input: nothing more for gate/up (they
    # read that input), and gate, up and the activation, not down, for the down projections. On the tiny
    # Mixtral this cut the expert arithmetic of a GPTQ run about threefold.

    @staticmethod
    def _expert_inputs(layer, inputs):
        """Per calibration chunk: (x [n, H], the router's top-k expert ids [n, k], the experts module):
        the input of the layer's un-fused experts, the layer's forward stopped there."""
        from mergequant.quant.moe import experts_of
        from mergequant.quant.runner import StopLayer

        (experts_mod,) = experts_of(layer)
        seen = {}

        def pre(mod, args):
            seen["x"], seen["idx"] = args[0], args[1]
            raise StopLayer

        hook = experts_mod.register_forward_pre_hook(pre)
        try:
            for h, kw in inputs:
                try:
                    layer(h, **kw)
                except StopLayer:
                    pass
                yield seen.pop("x"), seen.pop("idx"), experts_mod
        finally:
            hook.remove()

    def _expert_gate_up_stats(self, layer, inputs, names, experts, moe, i, kept=None) -> dict[str, HessianAccumulator]:
        """Hessians of every expert's gate/up: one shared from every token (all-token calibration) or
        one per expert from its routed tokens; counts the router's choices into ``moe.tokens[i]``.
        ``kept``: a list that receives each chunk's (experts' input, router's choices, experts module) for
        the down projections' passes (``_expert_down_stats``); with all-token calibration the input is kept
        in the statistics dtype (``_expert_stats_dtype``), the only one those passes read it in."""
        accs: dict[str, HessianAccumulator] = {}
        counts = None
        stats_dtype = _expert_stats_dtype(inputs) if moe.mode == "all" else None
        with torch.no_grad():
            for x, idx, mod in self._expert_inputs(layer, inputs):
                if kept is not None:
                    kept.append((x if stats_dtype is None else x.to(stats_dtype), idx, mod))
                c = torch.bincount(idx.reshape(-1).long(), minlength=mod.num_experts)[: mod.num_experts]
                counts = c if counts is None else counts + c
                if moe.mode == "all":
                    acc = accs.get(names[0]) or HessianAccumulator(x.shape[-1])
                    acc.add(x)
                    for s in names:
                        accs[s] = acc
                    continue
                for e in sorted({experts[s][0] for s in names}):
                    mine = [s for s in names if experts[s][0] == e]
                    acc = accs.get(mine[0]) or HessianAccumulator(x.shape[-1])
                    acc.add(x[(idx == e).any(dim=-1)])
                    for s in mine:
                        accs[s] = acc
        moe.tokens[i] = counts.tolist()
        return accs

    def _expert_down_stats(self, layer, inputs, batch, experts, moe, modules, kept=None,
                           expert_inputs=None) -> dict[str, HessianAccumulator]:
        """Hessians of a batch of experts' down projections: each from ``act(gate(x)) * up(x)`` with the
        expert's (already quantized) gate and up, over every token or the expert's routed tokens.

        ``kept`` (routed calibration only): (chunk keys, per-chunk dicts) that receive each expert's products
        on its routed tokens, computed in the layer's compute dtype exactly as the routed forward computes
        them, for the layer's output pass to reuse (``moe.ExpertActivationReplay``). Without ``kept``,
        every product is in the statistics dtype (``_expert_stats_dtype``), written a row block at a time
        (``UnfusedExperts.gate_up``) into one float32 buffer reused for every expert and chunk (a 16-bit
        product takes the values converting it afterwards would give).
        ``expert_inputs``: what ``_expert_gate_up_stats`` kept, read instead of running the layer up to
        its experts again."""
        from mergequant.quant.replay import checksum

        accs = {s: HessianAccumulator(modules[s].in_features) for s in batch}
        stats_dtype = _expert_stats_dtype(inputs)
        buf = None
        chunks = expert_inputs if expert_inputs is not None else self._expert_inputs(layer, inputs)
        with torch.no_grad():
            for j, (x, idx, mod) in enumerate(chunks):
                if kept is not None:
                    if j == len(kept[0]):
                        kept[0].append(checksum(x))
                        kept[1].append({})
                    for s in batch:  # (routed calibration: these products are the statistics too)
                        e = experts[s][0]
                        kept[1][j][e] = act = mod.routed_activations(x, idx, e)
                        accs[s].add(act)
                    continue
                if stats_dtype is not None:
                    x = x.to(stats_dtype)  # (a no-op for inputs kept in it)
                for s in batch:
                    e = experts[s][0]
                    xe = x if moe.mode == "all" else x[(idx == e).any(dim=-1)]
                    n = xe.shape[:-1].numel()
                    if buf is None or buf.shape[0] < n:
                        buf = torch.empty(n, modules[s].in_features, dtype=torch.float32, device=xe.device)
                    accs[s].add(mod.gate_up(e, xe, out=buf[:n]))
        return accs

    @staticmethod
    def _note_stats_dtype(ctx, inputs, kept_routed: bool) -> None:
        """Record (for the card) the dtype of the products the experts' down statistics come from, and
        say once when a bfloat16 checkpoint's products stay in float32 because the device is slow at bfloat16."""
        from mergequant.hardware import slow_bfloat16_note

        dtype = None if kept_routed else _expert_stats_dtype(inputs)
        sized = _calibration_tokens(inputs)
        name = str(dtype or (sized[1] if sized else torch.float32)).removeprefix("torch.")
        first = ctx.result.expert_stats_dtype is None
        ctx.result.expert_stats_dtype = name
        hidden = getattr(inputs, "hidden", None)
        if first and name != "bfloat16" and not kept_routed and hidden and hidden[0].dtype == torch.bfloat16:
            ctx.log(f"note: the experts' down-projection statistics are computed in {name}, not bfloat16: "
                    f"{slow_bfloat16_note(hidden[0].device)}, many times slower than {name}")

    @staticmethod
    def _keeps_expert_activations(ctx, inputs, modules, downs: list[str], moe) -> bool:
        """Whether to keep the experts' routed gate/up products (what the output pass would compute
        again): with routed calibration, when they fit ``EXPERT_REPLAY_BYTES`` (about tokens x top_k x
        intermediate size in the compute dtype). Not with all-token calibration: there the statistics
        pass would have to compute the routed rows apart, in the compute dtype instead of bfloat16,
        which costs what the output pass saves (measured on the tiny Mixtral: the same time, 96 MiB more)."""
        if moe.mode != "routed" or not downs:
            return False
        return _fits(inputs, _top_k(ctx) * max(modules[s].in_features for s in downs), EXPERT_REPLAY_BYTES)

    @staticmethod
    def _capture_batches(names: list[str], modules, experts: dict) -> list[list[str]]:
        """``names`` split so that modules with inputs of their own (every expert's down_proj) hold at
        most ``EXPERT_HESSIAN_BYTES`` of Hessians at a time (Mixtral-8x7B: one 822 MB down Hessian)."""
        if not names or not experts or any(p[1] != 2 for p in experts.values()):
            return [names] if names else []
        k = max(modules[s].in_features for s in names)
        per = max(1, EXPERT_HESSIAN_BYTES // (4 * k * k))
        return [names[j:j + per] for j in range(0, len(names), per)]

    @staticmethod
    def _keeps_attention_output(ctx, layer, inputs, batch, modules):
        """The attention module when this capture is the o_proj pass and its inputs should be kept, else None.

        The attention's output is ``o_proj(o_proj's input)``; once o_proj is quantized it no longer
        changes for the rest of the layer. Keeping o_proj's inputs from its own pass (and the checksum
        of each chunk's attention input) lets every later pass replay the attention without computing
        it even once more. Kept only when they fit ``replay.REPLAY_BYTES``."""
        from mergequant.architectures import resolve
        from mergequant.quant import replay

        attn = resolve(layer, ctx.arch.attention)
        if attn is None or batch != [f"{ctx.arch.attention}.o_proj"]:
            return None
        width = max(modules[batch[0]].in_features, modules[batch[0]].out_features)
        return attn if _fits(inputs, width, replay.REPLAY_BYTES) else None

    @staticmethod
    def _capture(layer, inputs, names, modules, widest, *, record=None, attention=None) -> dict[str, HessianAccumulator]:
        """One Hessian accumulator per module of ``names``, shared by modules that receive the very
        same input tensor: q/k/v, gate/up, and with all-token calibration every expert's gate/up.
        ``record``: two lists that receive, per chunk, the checksum of ``attention``'s input and the
        (single) captured input."""
        from mergequant.quant.replay import checksum
        from mergequant.quant.runner import capture_module_inputs

        accs: dict[str, HessianAccumulator] = {}

        def add(shared: list[str], x):
            acc = accs.get(shared[0]) or HessianAccumulator(x.shape[-1])
            acc.add(x)
            for s in shared:
                accs[s] = acc
            if record is not None:
                record[1].append(x)

        hook = None
        if record is not None:
            def pre(mod, args, kwargs):
                record[0].append(checksum(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]))
            hook = attention.register_forward_pre_hook(pre, with_kwargs=True)

        k = max(modules[s].in_features for s in names)
        _release_before(k)  # the previous pass's temporaries
        # the group with the widest input holds the layer's largest Hessian while its capture runs
        # the most activations (the MLP): that is a peak of the whole run, so its chunks' freed
        # activations go back to the OS one by one (the other groups skip the re-faulting cost)
        try:
            capture_module_inputs(layer, inputs, {s: modules[s] for s in names}, add, parallel=True,
                                  release_between_chunks=k == widest)
        finally:
            if hook is not None:
                hook.remove()
        return accs

    def _solve_shared(self, ctx, accs, names, todo, modules) -> None:
        """Solve ``names``: modules sharing a Hessian as one stacked weight (GPTQ treats rows
        independently given H: one Cholesky, larger and faster products, identical results)."""
        by_acc: dict[int, list[str]] = {}
        for s in names:
            by_acc.setdefault(id(accs[s]), []).append(s)
        groups = list(by_acc.values())
        if self._batchable(ctx, groups, modules):
            self._solve_batch(ctx, [accs[g[0]] for g in groups], [[modules[s] for s in g] for g in groups],
                              [[todo[s] for s in g] for g in groups])
            accs.clear()
            return
        for shared in groups:
            acc = accs[shared[0]]
            for s in shared:
                del accs[s]
            self._solve(ctx, [modules[s] for s in shared], [todo[s] for s in shared], acc)
        accs.clear()

    @staticmethod
    def _batchable(ctx, groups: list[list[str]], modules) -> bool:
        """Whether ``groups`` (the modules sharing each Hessian, every group made of the same shapes: a
        batch of experts' down projections, or with routed calibration every expert's gate and up) can
        be solved as one batch: natural column order only (no act order, whose permutation differs per
        expert; no static groups)."""
        o = ctx.opts
        if len(groups) < 2 or o.desc_act or o.static_groups:
            return False
        shapes = {tuple((modules[s].out_features, modules[s].in_features) for s in g) for g in groups}
        return len(shapes) == 1

    def _solve_batch(self, ctx, accs, mods, lins) -> None:
        """Independent solves of one shape (``mods[b]`` / ``lins[b]``: the modules sharing Hessian b, stacked),
        their column loops run as one batch (``gptq_quantize_batch``: bit-identical to solving each on its
        own, several times fewer small operations)."""
        o = ctx.opts
        _release_before(accs[0].in_features)
        Hs = [acc.take() for acc in accs]
        dev = Hs[0].device
        parts = [[ctx.source_weight(lin).to(dev) for lin in group] for group in lins]
        with mapped_allocations():
            results = gptq_quantize_batch(parts, Hs, bits=o.bits, group_size=o.group_size, sym=o.sym, damp=o.damp,
                                          row_block_bytes=ROW_BLOCK_BYTES if dev.type == "cpu" else GPU_ROW_BLOCK_BYTES)
        del Hs, parts
        for group_mods, group_lins, res in zip(mods, lins, results):
            self._install(ctx, group_mods, group_lins, res)

    def _round_starved(self, ctx, i: int, names: list[str], todo, modules, dev: torch.device) -> None:
        """Round-to-nearest for the Linears of experts the router starved (routed calibration): a
        Hessian from a handful of tokens fits those tokens, not the expert's job. Computed on ``dev``,
        where the layer runs (the installed forward must be on the layer's device)."""
        o = ctx.opts
        for s in names:
            lin = todo[s]
            q, scales, zeros = quantize_rtn(ctx.source_weight(lin).to(dev).float(), o.bits, o.group_size, o.sym)
            g_idx = formats.g_idx_for(lin.in_features, o.group_size).to(dev)
            codes = q.T.to(torch.uint8).contiguous()
            modules[s].forward = QuantizedForward(modules[s], codes, scales, zeros, g_idx, bits=o.bits)
            self.write_codes(ctx, lin, codes, scales, zeros, g_idx)
            e = ctx.arch.experts.parse_expert_module(s)[0]
            fell = ctx.result.expert_fallbacks.setdefault(i, [])
            if e not in fell:
                fell.append(e)

    def _solve(self, ctx, mods, lins, acc: HessianAccumulator) -> None:
        o = ctx.opts
        _release_before(acc.in_features)  # the capture's activation temporaries, before the solver's matrices
        # acc.take() hands H over without another reference: the solver overwrites it with the inverse
        # factor and frees it on return, before the codes are packed. Its large temporaries are mapped
        # so they leave no freed-but-resident heap behind (see mergequant.memory).
        H = acc.take()
        # the source weights are memory-mapped on the CPU: the solver runs where H is (the GPU if used)
        parts = [ctx.source_weight(lin).to(H.device) for lin in lins]
        with mapped_allocations():
            # rows are solved a block at a time (bounded working copy); on a GPU a block of 24 MiB of rows
            # means many more sequential column steps, each a handful of kernel launches: use larger blocks
            res = gptq_quantize(parts, H, bits=o.bits, group_size=o.group_size, desc_act=o.desc_act,
                                static_groups=o.static_groups, sym=o.sym, damp=o.damp, overwrite_h=True,
                                row_block_bytes=ROW_BLOCK_BYTES if H.device.type == "cpu" else GPU_ROW_BLOCK_BYTES)
        del H, parts
        self._install(ctx, mods, lins, res)

    def _install(self, ctx, mods, lins, res) -> None:
        """Record a solve (fallback, proxy error), write its codes and let its modules compute from them."""
        o = ctx.opts
        if res.fallback_rtn:
            ctx.result.fallbacks.extend(lin.prefix for lin in lins)
            ctx.log(f"warning: {', '.join(lin.prefix for lin in lins)}: Cholesky failed at every damping; "
                    "used round-to-nearest")
        ctx.result.proxy_error += res.error
        start = 0
        for mod, lin in zip(mods, lins):
            rows = slice(start, start + lin.out_features)
            start += lin.out_features
            # the module now computes from its codes: exactly W_hat, at 1/8 of its float32 size (4-bit)
            mod.forward = QuantizedForward(mod, res.codes[:, rows], res.scales[:, rows], res.zeros[:, rows],
                                           res.g_idx, bits=o.bits)
            self.write_codes(ctx, lin, res.codes[:, rows], res.scales[:, rows], res.zeros[:, rows], res.g_idx)
