"""What mergequant knows about each model family, as data: one ``Architecture`` per config ``model_type``.

Every quantization method reads its architecture knowledge from here (GPTQ's true-sequential order,
which Linears get quantized, AWQ's and SmoothQuant's scaling maps, where the decoder layers live,
which modules stay in float), so supporting another dense family is one entry in ``ARCHITECTURES``
and a run of ``tests/test_architectures.py``, which checks every name below against a real
transformers model and its saved checkpoint. Names are relative to a decoder layer, as transformers
names the modules in memory; for the dense families they are also the names on disk.

>>> arch = architecture_for({"model_type": "qwen2"})
>>> arch.layer_prefix(3)
'model.layers.3.'
>>> arch.sequential[0]
('self_attn.k_proj', 'self_attn.v_proj', 'self_attn.q_proj')
>>> [g.name for g in arch.scaling]
['qkv', 'o', 'gate_up', 'down']

Mixture-of-experts families (mixtral, qwen2_moe, qwen3_moe) are described (``ExpertLayout``: the
per-expert names on disk, the fused tensors transformers 5 holds in memory, routers, the shared
expert) but not quantized yet: ``is_moe`` tells the driver to refuse them with one line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mergequant.errors import MergeQuantError

__all__ = ["ARCHITECTURES", "Architecture", "ExpertLayout", "ScaleGroup", "architecture_for",
           "architecture_for_layer_class"]


@dataclass(frozen=True)
class ScaleGroup:
    """One scaling group of AWQ / SmoothQuant: ``prev`` produces the input of every Linear in ``linears``.

    A per-input-channel scale ``s`` is folded as ``prev``'s output divided by ``s`` and the Linears'
    input columns multiplied by ``s``: the float function is unchanged only if ``linears`` lists
    *every* reader of that output, hence one group per producer, never per Linear.

    ``prev_kind``: ``"norm"`` (RMSNorm/LayerNorm, gain folded with the architecture's ``norm_offset``) or
    ``"linear"`` (its output rows are divided). ``block``: the module whose output AWQ judges a
    candidate scale by (``self_attn``, ``mlp``); None when the Linears alone are judged (exactly,
    from ``X^T X``). ``prev_rows``: ``(k, n)`` when ``prev`` is a fused Linear and the input is row
    chunk ``k`` of ``n`` equal chunks of its output (Phi-3's ``gate_up_proj``: up is chunk 1 of 2);
    the group applies only where those rows match the Linears' input width (``applies``), which is
    also how grouped-query attention, where ``v`` is narrower than ``o``'s input, is skipped.
    """

    name: str
    prev: str
    prev_kind: str
    linears: tuple[str, ...]
    block: str | None
    prev_rows: tuple[int, int] | None = None
    # modules that read the same input but are never quantized (a MoE router, ``shared_expert_gate``):
    # their input columns are scaled with the Linears' (or the float function would change), nothing else
    passengers: tuple[str, ...] = ()

    def rows(self, prev_out: int, in_features: int) -> slice | None:
        """The rows of ``prev``'s weight [prev_out, .] that produce the Linears' input of width
        ``in_features``; None when the shapes do not allow the fold (the group is skipped)."""
        k, n = self.prev_rows or (0, 1)
        if prev_out % n or prev_out // n != in_features:
            return None
        return slice(k * in_features, (k + 1) * in_features)


@dataclass(frozen=True)
class ExpertLayout:
    """Where a mixture-of-experts block keeps its experts, on disk and in transformers 5's memory.

    On disk (Hub checkpoints, what ``save_pretrained`` writes): one 2-D weight per expert,
    ``{layer}.{disk_block}.experts.{e}.{name}.weight`` for ``name`` in ``expert_linears`` (gate, up,
    down order). In memory transformers 5 fuses them: ``{memory_block}.experts.gate_up_proj``
    [E, 2I, H] (cat(gate, up) on dim 1) and ``{memory_block}.experts.down_proj`` [E, H, I], and
    renames Mixtral's ``block_sparse_moe`` to ``mlp``. The router (``router``, in memory names) is
    not an ``nn.Linear`` there and is never quantized; nor is Qwen2-MoE's ``shared_expert_gate``.
    """

    disk_block: str
    memory_block: str
    expert_linears: tuple[str, str, str]  # on-disk names of (gate, up, down)
    num_experts_key: str  # config key holding the expert count
    router: str = "mlp.gate"
    fused_gate_up: str = "mlp.experts.gate_up_proj"
    fused_down: str = "mlp.experts.down_proj"
    shared_expert: tuple[str, ...] = ()  # dense Linears of a shared expert (quantizable like an MLP)
    shared_expert_gate: str | None = None

    memory_linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    sparse_step_key: str | None = None  # qwen MoE: layers (i + 1) % step != 0, or in mlp_only_layers, are dense

    def expert_count(self, config: Mapping[str, Any]) -> int | None:
        """The number of routed experts config.json declares (``num_experts_key``, else transformers 5's
        ``num_local_experts``, under which it saves Qwen MoE configs); None when neither is a positive int."""
        for key in dict.fromkeys((self.num_experts_key, "num_local_experts")):
            n = _get(config, key)
            if isinstance(n, int) and not isinstance(n, bool) and n >= 1:
                return n
        return None

    def expert_module(self, e: int, which: int) -> str:
        """Name (relative to the layer) of expert ``e``'s gate (0), up (1) or down (2) Linear once the
        quantizer has un-fused the experts (``mergequant.quant.moe``): ``mlp.experts.3.gate_proj``.
        These are also the names GPTQModel loads quantized experts under."""
        return f"{self.memory_block}.experts.{e}.{self.memory_linears[which]}"

    def parse_expert_module(self, name: str) -> tuple[int, int] | None:
        """(expert, part) of an un-fused expert Linear name (``mlp.experts.3.up_proj`` -> (3, 1)), else None."""
        m = re.fullmatch(rf"{re.escape(self.memory_block)}\.experts\.(\d+)\.(\w+)", name)
        if not m or m.group(2) not in self.memory_linears:
            return None
        return int(m.group(1)), self.memory_linears.index(m.group(2))

    def is_sparse_layer(self, config: Mapping[str, Any], i: int) -> bool:
        """Whether decoder layer ``i`` holds routed experts (Qwen MoE may keep some layers dense)."""
        if self.sparse_step_key is None:
            return True
        step = _get(config, self.sparse_step_key) or 1
        only = _get(config, "mlp_only_layers") or ()
        return i not in only and (i + 1) % step == 0

    def expert_weight(self, e: int, which: int) -> str:
        """On-disk name (relative to the layer) of expert ``e``'s gate (0), up (1) or down (2) weight."""
        return f"{self.disk_block}.experts.{e}.{self.expert_linears[which]}.weight"

    def to_disk(self, memory_name: str) -> str:
        """A module or parameter name in memory -> its name on disk (``mlp.gate`` -> ``block_sparse_moe.gate``,
        ``mlp.experts.3.gate_proj.weight`` -> ``block_sparse_moe.experts.3.w1.weight``)."""
        head, _, rest = memory_name.partition(".")
        if head != self.memory_block or not rest:
            return memory_name
        parts = rest.split(".")
        if len(parts) >= 3 and parts[0] == "experts" and parts[1].isdigit() and parts[2] in self.memory_linears:
            parts[2] = self.expert_linears[self.memory_linears.index(parts[2])]
        return ".".join([self.disk_block, *parts])

    def to_memory(self, disk_name: str) -> str:
        """Inverse of ``to_disk``: ``block_sparse_moe.experts.3.w1.weight`` -> ``mlp.experts.3.gate_proj.weight``."""
        head, _, rest = disk_name.partition(".")
        if head != self.disk_block or not rest:
            return disk_name
        parts = rest.split(".")
        if len(parts) >= 3 and parts[0] == "experts" and parts[1].isdigit() and parts[2] in self.expert_linears:
            parts[2] = self.memory_linears[self.expert_linears.index(parts[2])]
        return ".".join([self.memory_block, *parts])


@dataclass(frozen=True)
class Architecture:
    """One model family (see the module docstring). Every name is relative to a decoder layer unless
    it says otherwise."""

    model_type: str
    layer_class: str  # transformers' decoder-layer class: the runner checks the built model matches
    sequential: tuple[tuple[str, ...], ...]  # Linears to quantize, in true-sequential groups sharing one input
    scaling: tuple[ScaleGroup, ...]  # AWQ (all groups) and SmoothQuant (the norm-fed ones), in layer order
    no_clip: tuple[str, ...] = ()  # AWQ: not weight-clipped (q/k errors pass through the softmax)
    never_quantized: tuple[str, ...] = ()  # Linear-like modules of a layer left in float (routers)
    norm_offset: float = 0.0  # 1.0: norms multiply by (1 + weight) (Gemma), so folds use (1 + w) / s - 1
    layers: str = "model.layers"  # the decoder-layer ModuleList: attribute path in the CausalLM and tensor prefix
    embed: str = "model.embed_tokens"  # model-level names from here on
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    tied_default: bool = False  # tie_word_embeddings when config.json does not say
    experts: ExpertLayout | None = None
    notes: str = ""
    # the attention module of a layer (holds every Linear of the attention groups); GPTQ replays its
    # output once those are quantized (mergequant.quant.replay)
    attention: str = "self_attn"

    @property
    def quantized(self) -> tuple[str, ...]:
        """Every quantized Linear of a layer, in true-sequential order."""
        return tuple(s for group in self.sequential for s in group)

    @property
    def is_moe(self) -> bool:
        return self.experts is not None

    def layer_groups(self, config: Mapping[str, Any], i: int, num_experts: int | None = None
                     ) -> tuple[tuple[str, ...], ...]:
        """Layer ``i``'s quantized Linears in true-sequential groups, by their names in memory.

        Dense families: ``sequential``. MoE: the attention groups, a shared expert's (Qwen2-MoE), then
        every routed expert's gate and up as one group (they all read the post-attention norm's output:
        with all-token calibration that is one input, hence one Hessian), then every expert's down
        (each reads its own input). A layer without experts (Qwen MoE's ``mlp_only_layers``) has a
        dense MLP: the Llama groups."""
        if not self.is_moe:
            return self.sequential
        ex = self.experts
        if not ex.is_sparse_layer(config, i):
            return self.sequential[:2] + _MLP
        n = num_experts if num_experts is not None else ex.expert_count(config)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise MergeQuantError(f"{model_name(config)}: config.json has no usable expert count "
                                  f"({ex.num_experts_key})")
        gate_up = tuple(ex.expert_module(e, w) for e in range(n) for w in (1, 0))
        down = tuple(ex.expert_module(e, 2) for e in range(n))
        return self.sequential + (gate_up, down)

    def layer_scaling(self, config: Mapping[str, Any], i: int, num_experts: int | None = None
                      ) -> tuple[ScaleGroup, ...]:
        """Layer ``i``'s AWQ/SmoothQuant scaling groups, by names in memory. MoE: the post-attention norm
        feeds the router, a shared expert (and its gate) and every expert's gate/up: one group, the router
        and ``shared_expert_gate`` scaled as passengers; then up -> down for the shared expert and for
        each expert. A dense layer of a MoE family scales like Llama."""
        if not self.is_moe:
            return self.scaling
        attn = self.scaling[:2]
        if not self.experts.is_sparse_layer(config, i):
            return attn + _llama_scaling()[2:]
        ex = self.experts
        groups = self.layer_groups(config, i, num_experts)
        gate_up, downs = groups[-2], groups[-1]
        shared = ex.shared_expert
        passengers = (ex.router,) + ((ex.shared_expert_gate,) if ex.shared_expert_gate else ())
        out = attn + (ScaleGroup("gate_up", "post_attention_layernorm", "norm", tuple(shared[:2]) + gate_up, "mlp",
                                 passengers=passengers),)
        if shared:
            out += (ScaleGroup("shared_down", shared[0], "linear", (shared[2],), None),)
        for d in downs:
            e = ex.parse_expert_module(d)[0]
            out += (ScaleGroup(f"down{e}", ex.expert_module(e, 1), "linear", (d,), None),)
        return out

    def to_disk(self, name: str) -> str:
        """A layer-relative name in memory -> on disk (identity for dense families)."""
        return self.experts.to_disk(name) if self.experts else name

    def to_memory(self, name: str) -> str:
        """A layer-relative name on disk -> in memory (identity for dense families)."""
        return self.experts.to_memory(name) if self.experts else name

    def parameter_counts(self, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
        """(total, active per token) parameters from tensor shapes by name (per-expert names): a token
        uses ``num_experts_per_tok`` of a sparse layer's experts, so the rest are not active."""
        import math

        total = sum(math.prod(s) for s in shapes.values())
        if not self.is_moe:
            return total, total
        ex = self.experts
        top_k = _get(config, "num_experts_per_tok") or 1
        per_layer: dict[int, list[int]] = {}
        pattern = re.compile(rf"{re.escape(self.layers)}\.(\d+)\.{re.escape(ex.disk_block)}\.experts\.(\d+)\.")
        for name, shape in shapes.items():
            m = pattern.match(name)
            if m:
                per_layer.setdefault(int(m.group(1)), []).append(math.prod(shape))
        idle = 0
        for layer, sizes in per_layer.items():
            n = len({name.split(".experts.")[1].split(".")[0] for name in shapes
                     if name.startswith(f"{self.layer_prefix(layer)}{ex.disk_block}.experts.")})
            idle += sum(sizes) * max(0, n - top_k) // max(n, 1)
        return total, total - idle

    def layer_prefix(self, i: int) -> str:
        """Tensor-name prefix of decoder layer ``i``: ``model.layers.3.``."""
        return f"{self.layers}.{i}."

    def split_name(self, name: str) -> tuple[int, str] | None:
        """(layer index, name relative to the layer) for a tensor inside a decoder layer, else None."""
        m = re.match(rf"{re.escape(self.layers)}\.(\d+)\.(.+)$", name)
        return (int(m.group(1)), m.group(2)) if m else None

    def ties_embeddings(self, config: Mapping[str, Any]) -> bool:
        """Whether lm_head reuses the embedding table (then the checkpoint may hold no lm_head weight)."""
        tie = config.get("tie_word_embeddings")
        return self.tied_default if tie is None else bool(tie)

    def head_weight_on_disk(self, config: Mapping[str, Any], names) -> str:
        """The tensor that holds lm_head's weight: its own, or the embedding's when tied and absent."""
        own = f"{self.lm_head}.weight"
        return own if own in names or not self.ties_embeddings(config) else f"{self.embed}.weight"


# ---- the families ------------------------------------------------------------------------------------------

_ATTN = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj")
_MLP = (("mlp.up_proj", "mlp.gate_proj"), ("mlp.down_proj",))
_LLAMA_SEQUENTIAL = (_ATTN, ("self_attn.o_proj",), *_MLP)
_QK = ("self_attn.q_proj", "self_attn.k_proj")


def _llama_scaling(mlp_norm: str = "post_attention_layernorm") -> tuple[ScaleGroup, ...]:
    """input_layernorm -> q,k,v; v -> o (skipped under GQA); ``mlp_norm`` -> gate,up; up -> down."""
    return (ScaleGroup("qkv", "input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                       "self_attn"),
            ScaleGroup("o", "self_attn.v_proj", "linear", ("self_attn.o_proj",), None),
            ScaleGroup("gate_up", mlp_norm, "norm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
            ScaleGroup("down", "mlp.up_proj", "linear", ("mlp.down_proj",), None))


def _dense(model_type: str, layer_class: str, **kw) -> Architecture:
    """A Llama-shaped family: separate q/k/v and gate/up projections."""
    kw.setdefault("sequential", _LLAMA_SEQUENTIAL)
    kw.setdefault("scaling", _llama_scaling())
    kw.setdefault("no_clip", _QK)
    return Architecture(model_type, layer_class, **kw)


def _moe(model_type: str, layer_class: str, experts: ExpertLayout, **kw) -> Architecture:
    """A mixture-of-experts family: attention as Llama's, the MLP replaced by routed experts. Only the
    attention (and a shared expert's dense Linears) appear in ``sequential``/``scaling`` for now: the
    post-attention norm also feeds the router and every expert, which the scaling map must list
    together once MoE quantization exists."""
    shared = experts.shared_expert
    seq = (_ATTN, ("self_attn.o_proj",)) + ((shared[:2], shared[2:]) if shared else ())
    never = (experts.router,) + ((experts.shared_expert_gate,) if experts.shared_expert_gate else ())
    return Architecture(model_type, layer_class, sequential=seq, scaling=_llama_scaling()[:2], no_clip=_QK,
                        never_quantized=never, experts=experts, **kw)


_GEMMA2_NOTE = ("post_attention_layernorm normalizes the attention output; the MLP input is "
                "pre_feedforward_layernorm's output")

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    _dense("llama", "LlamaDecoderLayer"),
    _dense("mistral", "MistralDecoderLayer"),
    _dense("qwen2", "Qwen2DecoderLayer", notes="q/k/v have biases (folded with v's rows for v -> o)"),
    _dense("qwen3", "Qwen3DecoderLayer",
           notes="q_norm/k_norm act per head inside attention after q/k: neither quantized nor scaled"),
    _dense("gemma", "GemmaDecoderLayer", norm_offset=1.0, tied_default=True),
    _dense("gemma2", "Gemma2DecoderLayer", norm_offset=1.0, tied_default=True,
           scaling=_llama_scaling("pre_feedforward_layernorm"), notes=_GEMMA2_NOTE),
    _dense("gemma3_text", "Gemma3DecoderLayer", norm_offset=1.0, tied_default=True,
           scaling=_llama_scaling("pre_feedforward_layernorm"), notes=_GEMMA2_NOTE + "; q_norm/k_norm as Qwen3"),
    Architecture(
        "phi3", "Phi3DecoderLayer",
        sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        # fused Linears are scaled as one group each; v -> o folds into v's rows, the last third of
        # qkv_proj, which only matches o's input without grouped-query attention (else skipped);
        # up -> down folds into up's rows, the second half of gate_up_proj
        scaling=(ScaleGroup("qkv", "input_layernorm", "norm", ("self_attn.qkv_proj",), "self_attn"),
                 ScaleGroup("o", "self_attn.qkv_proj", "linear", ("self_attn.o_proj",), None, prev_rows=(2, 3)),
                 ScaleGroup("gate_up", "post_attention_layernorm", "norm", ("mlp.gate_up_proj",), "mlp"),
                 ScaleGroup("down", "mlp.gate_up_proj", "linear", ("mlp.down_proj",), None, prev_rows=(1, 2))),
        no_clip=("self_attn.qkv_proj",),  # its q/k rows must not be clipped, and clipping is per Linear
        notes="qkv_proj = cat(q, k, v) rows; gate_up_proj = cat(gate, up) rows"),
    _moe("mixtral", "MixtralDecoderLayer",
         ExpertLayout("block_sparse_moe", "mlp", ("w1", "w3", "w2"), "num_local_experts")),
    _moe("qwen2_moe", "Qwen2MoeDecoderLayer",
         ExpertLayout("mlp", "mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts",
                      sparse_step_key="decoder_sparse_step",
                      shared_expert=("mlp.shared_expert.up_proj", "mlp.shared_expert.gate_proj",
                                     "mlp.shared_expert.down_proj"),
                      shared_expert_gate="mlp.shared_expert_gate"),
         notes="q/k/v have biases; layers in mlp_only_layers (or off decoder_sparse_step) have a dense mlp"),
    _moe("qwen3_moe", "Qwen3MoeDecoderLayer",
         ExpertLayout("mlp", "mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts",
                      sparse_step_key="decoder_sparse_step"),
         notes="q_norm/k_norm as Qwen3; layers in mlp_only_layers (or off decoder_sparse_step) have a dense mlp"),
)}

DENSE = tuple(mt for mt, a in ARCHITECTURES.items() if not a.is_moe)


def _get(config, key: str):
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def model_name(config) -> str:
    """How errors name a model: its first ``architectures`` entry, else its model_type."""
    archs = _get(config, "architectures") or []
    if archs and isinstance(archs[0], str):
        return archs[0]
    return str(_get(config, "model_type") or "the model")


def supported_families() -> str:
    """``llama, mistral, ...; mixture-of-experts (not quantized yet): mixtral, ...`` for messages."""
    moe = [mt for mt in ARCHITECTURES if mt not in DENSE]
    return f"{', '.join(DENSE)}; mixture-of-experts (described, not quantized yet): {', '.join(moe)}"


def architecture_for(config, where: str = "") -> Architecture:
    """The description of ``config``'s family (a config.json dict or a transformers config).

    Raises MergeQuantError (one line, naming the model and the supported families) for a family
    without a description: guessing names would quantize some Linears and silently skip others.
    ``where`` (e.g. ``"path/to/model: "``) prefixes the message."""
    mt = _get(config, "model_type")
    arch = ARCHITECTURES.get(mt) if isinstance(mt, str) else None
    if arch is None:
        why = f"model_type {mt!r} has no architecture description" if mt else "config.json has no model_type"
        raise MergeQuantError(f"{where}{model_name(config)} is not supported ({why}; supported: "
                              f"{supported_families()})")
    return arch


def architecture_for_layer_class(cls_name: str) -> Architecture:
    """The description whose decoder layer class is ``cls_name`` (for code handed a bare layer)."""
    for arch in ARCHITECTURES.values():
        if arch.layer_class == cls_name:
            return arch
    raise MergeQuantError(f"decoder layer {cls_name} belongs to no described family "
                          f"(supported: {', '.join(ARCHITECTURES)})")


def resolve(root, path: str):
    """``root.a.b`` for ``path`` "a.b" (None if any step is missing): attribute paths of the description."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj

