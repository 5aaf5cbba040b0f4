"""The Llama-shaped families' decoder in plain torch, for the layer-by-layer runner.

Why: building the model skeleton through transformers imports its modeling stack (``modeling_utils``,
the attention and kernel registries, ...), 2.5-4 s of a 2-core machine before any work starts, and
every forward of a transformers layer goes through its generic wrappers (deprecation shims, kwargs
checks, gradient-checkpointing hooks). For a small model that start-up is most of a quantization
run. The families below are a handful of well-known operations: RMSNorm, rotary embeddings,
grouped-query causal attention, SwiGLU MLPs and softmax-top-k routed experts, so the runner builds
them here instead whenever the checkpoint's ``config.json`` is one this module computes exactly like
transformers 5 (``native_refusal`` says when it is not: then the runner uses transformers, as before).

The modules mirror transformers' module tree and names one for one (``model.embed_tokens``,
``model.layers.N.self_attn.q_proj``, ``model.layers.N.mlp.gate``, ``model.norm``, ``lm_head``, the
decoder-layer class named as the family's ``Architecture.layer_class``) and their call conventions
(a layer takes ``hidden_states, attention_mask=, position_embeddings=, position_ids=``; attention
returns ``(output, None)``; a router returns ``(logits, top-k weights, top-k ids)``), so every
quantization method, hook and test sees the same model whichever builder ran. Routed experts are
built directly as ``quant.moe.UnfusedExperts`` (one Linear per expert projection). The arithmetic
follows transformers 5.24 operation by operation (RMSNorm in float32 then cast, cos/sin cast to the
activation dtype, SDPA with ``is_causal``, softmax routing in float32); ``tests/test_native.py``
checks every family's logits and per-layer outputs against transformers' own model.

Parameters are created on the meta device (the runner loads each layer's weights from the
checkpoint when it processes that layer); buffers (the rotary ``inv_freq``) are real.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergequant.architectures import ARCHITECTURES, Architecture
from mergequant.quant.meta import meta_embedding, meta_linear
from mergequant.quant.moe import MoECalibration, UnfusedExperts

__all__ = ["NATIVE_FAMILIES", "build_native", "native_refusal"]

NATIVE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
_QK_NORM = ("qwen3", "qwen3_moe")
# config keys read here whose transformers default differs by family or is not obvious: when absent,
# the runner builds through transformers (which knows its defaults) instead of guessing
_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
             "rms_norm_eps")
_MOE_REQUIRED = {"mixtral": ("num_experts_per_tok",),
                 "qwen2_moe": ("num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                               "norm_topk_prob"),
                 "qwen3_moe": ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob")}
_DEFAULT_WINDOW = {"mistral": 4096}  # sliding_window when config.json does not say (transformers' default)


def _int(config: Mapping[str, Any], key: str) -> bool:
    v = config.get(key)
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _rope_theta(config: Mapping[str, Any]) -> float | None:
    """The rotary base of a plain (``default``) rotary embedding, else None (scaled variants are left
    to transformers: llama3, yarn, linear, dynamic, longrope compute other frequencies)."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping):
        if params.get("rope_type", "default") != "default" or set(params) - {"rope_theta", "rope_type"}:
            return None
        theta = params.get("rope_theta")
    else:
        if config.get("rope_scaling") not in (None, {}):
            return None
        theta = config.get("rope_theta")
    return float(theta) if isinstance(theta, (int, float)) and not isinstance(theta, bool) and theta > 0 else None


def native_refusal(config: Mapping[str, Any], seqlen: int) -> str | None:
    """Why ``config`` (a config.json dict) must be built through transformers instead, or None when the
    native modules compute exactly what transformers' would for sequences of ``seqlen`` tokens."""
    mt = config.get("model_type")
    if mt not in NATIVE_FAMILIES:
        return f"model_type {mt!r} has no native decoder"
    missing = [k for k in _REQUIRED + _MOE_REQUIRED.get(mt, ()) if k not in config]
    if missing:
        return f"config.json does not set {', '.join(missing)}"
    arch = ARCHITECTURES[mt]
    if arch.is_moe and arch.experts.expert_count(config) is None:
        return f"config.json does not set {arch.experts.num_experts_key}"
    if not all(_int(config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                         "num_hidden_layers", "vocab_size")):
        return "a size in config.json is not a positive integer"
    if config.get("hidden_act", "silu") != "silu":
        return f"activation {config.get('hidden_act')!r}"
    if _rope_theta(config) is None:
        return "a scaled or unusual rotary embedding"
    if config.get("partial_rotary_factor") not in (None, 1, 1.0):
        return "a partial rotary embedding"
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if not isinstance(kv, int) or heads % kv:
        return "num_key_value_heads does not divide num_attention_heads"
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if not isinstance(head_dim, int) or head_dim % 2:
        return "an odd or missing head_dim"
    # attention windows: none may cut the calibration sequences
    if config.get("use_sliding_window"):
        return "sliding-window attention"
    layer_types = config.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return "sliding-window attention layers"
    if mt in ("mistral", "mixtral"):
        window = config.get("sliding_window", _DEFAULT_WINDOW.get(mt))
        if window is not None and (not isinstance(window, int) or window < seqlen):
            return f"a sliding window ({window}) shorter than the sequences"
    if mt in _MOE_REQUIRED and not isinstance(config.get("norm_topk_prob", True), bool):
        return "norm_topk_prob is not a boolean"
    return None


# ---- modules ------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalized in float32 and cast back before the gain."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, device="meta"))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin of ``position * inv_freq`` (each frequency used twice), in the activations' dtype."""

    def __init__(self, head_dim: int, theta: float, device):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary positions (Qwen3: RMSNorm on each head's q and k)."""

    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.head_dim, self.heads, self.kv_heads = c.head_dim, c.heads, c.kv_heads
        self.scaling = c.head_dim ** -0.5
        self.q_proj = meta_linear(c.hidden, c.heads * c.head_dim, c.qkv_bias)
        self.k_proj = meta_linear(c.hidden, c.kv_heads * c.head_dim, c.qkv_bias)
        self.v_proj = meta_linear(c.hidden, c.kv_heads * c.head_dim, c.qkv_bias)
        self.o_proj = meta_linear(c.heads * c.head_dim, c.hidden, c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.eps)
            self.k_norm = RMSNorm(c.head_dim, c.eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **_):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.kv_heads != self.heads:  # each key/value head serves heads / kv_heads query heads
            rep = self.heads // self.kv_heads
            b, n, t, d = k.shape
            k = k[:, :, None].expand(b, n, rep, t, d).reshape(b, n * rep, t, d)
            v = v[:, :, None].expand(b, n, rep, t, d).reshape(b, n * rep, t, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.scaling,
                                             is_causal=attention_mask is None and q.shape[2] > 1)
        out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(out), None


class MLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj = meta_linear(hidden, inter, bias)
        self.up_proj = meta_linear(hidden, inter, bias)
        self.down_proj = meta_linear(inter, hidden, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TopKRouter(nn.Module):
    """Softmax over the experts (float32), the top ``k``, renormalized to sum 1 when ``normalize``
    (Mixtral always; Qwen MoE per ``norm_topk_prob``). Qwen casts the weights back to the logits'
    dtype, Mixtral keeps them in float32 (as transformers does)."""

    def __init__(self, hidden: int, experts: int, top_k: int, normalize: bool, cast_back: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden, device="meta"))
        self.top_k, self.normalize, self.cast_back = top_k, normalize, cast_back

    def forward(self, x: torch.Tensor):
        logits = F.linear(x.reshape(-1, self.weight.shape[1]), self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            top /= top.sum(dim=-1, keepdim=True)
        return logits, (top.to(logits.dtype) if self.cast_back else top), idx


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ Qwen2-MoE's shared expert, scaled by ``sigmoid(shared_expert_gate(x))``)."""

    def __init__(self, c: SimpleNamespace, layer: int, calib: MoECalibration):
        super().__init__()
        self.gate = TopKRouter(c.hidden, c.experts, c.top_k, c.norm_topk, cast_back=c.model_type != "mixtral")
        self.experts = UnfusedExperts(c.experts, c.hidden, c.expert_inter, nn.SiLU(), layer, calib, device="meta")
        if c.shared_inter:
            self.shared_expert = MLP(c.hidden, c.shared_inter)
            self.shared_expert_gate = meta_linear(c.hidden, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        shared = self.shared_expert(x) if hasattr(self, "shared_expert") else None
        _, weights, idx = self.gate(x)
        out = self.experts(x, idx, weights)
        if shared is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out.reshape(shape)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: ``h + attn(norm(h))``, then ``+ mlp(norm(.))``. Subclassed per family
    under transformers' class name (``_layer_class``)."""

    def __init__(self, c: SimpleNamespace, layer: int, calib: MoECalibration):
        super().__init__()
        self.self_attn = Attention(c)
        if c.sparse(layer):
            self.mlp = SparseMoeBlock(c, layer, calib)
        else:
            self.mlp = MLP(c.hidden, c.inter, c.mlp_bias)
        self.input_layernorm = RMSNorm(c.hidden, c.eps)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_embeddings=None,
                position_ids=None, **_) -> torch.Tensor:
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states),
                                           position_embeddings=position_embeddings, attention_mask=attention_mask)[0]
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm; ``forward(input_ids)`` runs them (causal, no cache)."""

    def __init__(self, c: SimpleNamespace, arch: Architecture, calib: MoECalibration, device):
        super().__init__()
        self.embed_tokens = meta_embedding(c.vocab, c.hidden)
        layer_cls = _layer_class(arch.layer_class)
        self.layers = nn.ModuleList(layer_cls(c, i, calib) for i in range(c.layers))
        self.norm = RMSNorm(c.hidden, c.eps)
        self.rotary_emb = RotaryEmbedding(c.head_dim, c.theta, device)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **_) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        pe = self.rotary_emb(h, position_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=position_ids)
        return self.norm(h)


class CausalLM(nn.Module):
    """``model`` + ``lm_head``; ``config`` holds config.json's values as attributes (read by the runner).
    Subclassed per family under transformers' causal-LM class name."""

    def __init__(self, config: Mapping[str, Any], c: SimpleNamespace, arch: Architecture, calib, device):
        super().__init__()
        self.config = SimpleNamespace(**{k: v for k, v in config.items() if isinstance(k, str)})
        self.model = DecoderModel(c, arch, calib, device)
        self.lm_head = meta_linear(c.hidden, c.vocab)

    def forward(self, input_ids: torch.Tensor, **_) -> torch.Tensor:
        return self.lm_head(self.model(input_ids))


_CLASSES: dict[tuple[type, str], type] = {}


def _named(base: type, name: str) -> type:
    """A subclass of ``base`` called ``name`` (so code that identifies a family by its class name,
    like AWQ's layer lookup and the runner's messages, sees transformers' names)."""
    key = (base, name)
    if key not in _CLASSES:
        _CLASSES[key] = type(name, (base,), {"__module__": __name__, "__qualname__": name})
    return _CLASSES[key]


def _layer_class(name: str) -> type:
    return _named(DecoderLayer, name)


def _settings(config: Mapping[str, Any], arch: Architecture) -> SimpleNamespace:
    mt = config["model_type"]
    heads = config["num_attention_heads"]
    experts = arch.experts.expert_count(config) if arch.is_moe else None
    c = SimpleNamespace(
        model_type=mt, hidden=config["hidden_size"], inter=config["intermediate_size"], heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads, layers=config["num_hidden_layers"],
        vocab=config["vocab_size"], eps=float(config["rms_norm_eps"]), theta=_rope_theta(config),
        qkv_bias=(True if mt == "qwen2" else bool(config.get("qkv_bias", True)) if mt == "qwen2_moe"
                  else bool(config.get("attention_bias", False))),
        o_bias=bool(config.get("attention_bias", False)) if mt in ("llama", "qwen3", "qwen3_moe") else False,
        mlp_bias=bool(config.get("mlp_bias", False)) if mt == "llama" else False,
        qk_norm=mt in _QK_NORM, experts=experts, top_k=config.get("num_experts_per_tok"),
        norm_topk=True if mt == "mixtral" else bool(config.get("norm_topk_prob")),
        expert_inter=config["intermediate_size"] if mt == "mixtral" else config.get("moe_intermediate_size"),
        shared_inter=config.get("shared_expert_intermediate_size") if mt == "qwen2_moe" else None,
    )
    c.sparse = (lambda i: arch.experts.is_sparse_layer(config, i)) if arch.is_moe else (lambda i: False)
    return c


def build_native(config: Mapping[str, Any], arch: Architecture, calib: MoECalibration | None = None,
                 device: str | torch.device = "cpu") -> nn.Module:
    """The causal LM for ``config`` (check ``native_refusal`` first), parameters on meta, buffers on
    ``device``, in eval mode."""
    c = _settings(config, arch)
    cls_name = arch.layer_class.replace("DecoderLayer", "ForCausalLM")
    model = _named(CausalLM, cls_name)(config, c, arch, calib or MoECalibration(), device)
    return model.eval()

