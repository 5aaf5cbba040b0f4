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

    def expert_weight(self, e: int, which: int) -> str:
        """On-disk name (relative to the layer) of expert ``e``'s gate (0), up (1) or down (2) weight."""
        return f"{self.disk_block}.experts.{e}.{self.expert_linears[which]}.weight"

    def to_disk(self, memory_name: str) -> str:
        """A non-expert module name in memory -> its name on disk (``mlp.gate`` -> ``block_sparse_moe.gate``)."""
        head, _, rest = memory_name.partition(".")
        return f"{self.disk_block}.{rest}" if head == self.memory_block and rest else memory_name


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

    @property
    def quantized(self) -> tuple[str, ...]:
        """Every quantized Linear of a layer, in true-sequential order."""
        return tuple(s for group in self.sequential for s in group)

    @property
    def is_moe(self) -> bool:
        return self.experts is not None

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
                      shared_expert=("mlp.shared_expert.up_proj", "mlp.shared_expert.gate_proj",
                                     "mlp.shared_expert.down_proj"),
                      shared_expert_gate="mlp.shared_expert_gate"),
         notes="q/k/v have biases; layers in mlp_only_layers (or off decoder_sparse_step) have a dense mlp"),
    _moe("qwen3_moe", "Qwen3MoeDecoderLayer",
         ExpertLayout("mlp", "mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts"),
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

