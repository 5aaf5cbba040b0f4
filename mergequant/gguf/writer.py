"""Write GGUF files (llama.cpp) from a checkpoint, for several file types in one pass.

``write_gguf(model_dir, out_dir, ["Q4_K_M", "Q8_0"])`` plans every output tensor (GGUF name, shape,
and per file type the tensor's GGUF type, from ``mixes``: ``checkpoint_formats.gguf.GGUFFormat.plan``), writes each file's header (metadata:
architecture hyper-parameters, tokenizer, chat template; tensor infos with offsets) up front, then
streams: each source tensor is read once (memory-mapped, in row slabs of ``CHUNK_ELEMENTS``), turned
into float32, and quantized once per distinct type the files need, the bytes appended to each file.
Anonymous memory stays around a few copies of one slab, whatever the model size.

Each transformers family maps to a GGUF architecture with the facts of llama.cpp's own converter
(``convert_hf_to_gguf.py``; :data:`FAMILIES`): Llama-family attention (llama, mistral, mixtral: GGUF
architecture ``llama``) needs q and k rows permuted from transformers' rotary layout (two halves) to
llama.cpp's (interleaved pairs), applied while reading rows; the other families use llama.cpp's NEOX
rotary layout, i.e. transformers' own, and are not permuted. Gemma's RMSNorm multiplies by ``1 + w``,
which llama.cpp stores as the weight itself: ``w + 1`` (computed in float32) for every ``*norm.weight``
of gemma, gemma2 and gemma3. Gemma 1/2 have no output matrix in llama.cpp (the token embedding is the
output). Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` stay fused (``attn_qkv``, and ``ffn_up`` with
2 x intermediate rows). Mixture-of-experts experts (Mixtral, Qwen2-MoE, Qwen3-MoE) are stacked into 3-D
``ffn_{gate,up,down}_exps`` tensors, one expert's matrix at a time; Qwen2-MoE's shared expert is
``ffn_{gate,up,down}_shexp`` and its sigmoid gate ``ffn_gate_inp_shexp``. What llama.cpp hard-codes
and a config could say otherwise (Qwen MoE's top-k weight normalization, Gemma's query scaling, MoE
layers without experts, Phi-3's long-context rope) is refused with one line rather than written into a
file that would compute something else.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mergequant.checkpoint_formats import get_format
from mergequant.errors import MergeQuantError
from mergequant.gguf import mixes
from mergequant.gguf.blocks import row_bytes

CHUNK_ELEMENTS = 1 << 22  # weights per read slab (16 MiB of float32)
ALIGN = 32


@dataclass(frozen=True)
class Family:
    """How one transformers family is written (facts of llama.cpp's converter for its GGUF architecture)."""

    arch: str  # GGUF architecture name
    permute_qk: bool = False  # llama.cpp's "normal" rotary layout: q/k rows interleaved
    norm_shift: float = 0.0  # added to every ``*norm.weight`` (Gemma: llama.cpp stores 1 + w)
    # "own": output.weight when the checkpoint has an untied lm_head; "embd": never (llama.cpp uses the
    # token embedding: Gemma 1/2); "required": always (llama.cpp needs it: Qwen2-MoE; the embedding when tied)
    output: str = "own"


# transformers model_type -> how it is written
FAMILIES = {
    "llama": Family("llama", permute_qk=True),
    "mistral": Family("llama", permute_qk=True),
    "mixtral": Family("llama", permute_qk=True),
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "gemma": Family("gemma", norm_shift=1.0, output="embd"),
    "gemma2": Family("gemma2", norm_shift=1.0, output="embd"),
    "gemma3_text": Family("gemma3", norm_shift=1.0),
    "phi3": Family("phi3"),
    "qwen2_moe": Family("qwen2moe", output="required"),
    "qwen3_moe": Family("qwen3moe"),
}
# transformers model_type -> (GGUF architecture, q/k rotary permutation)
GGUF_ARCH = {mt: (f.arch, f.permute_qk) for mt, f in FAMILIES.items()}
_SKIP = ("rotary_emb.inv_freq",)
_EXPERT_PARTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")  # (gate, up, down), as ExpertLayout orders them


def _tied(config: dict) -> bool:
    from mergequant.architectures import ARCHITECTURES

    arch = ARCHITECTURES.get(config.get("model_type"))
    return arch.ties_embeddings(config) if arch else bool(config.get("tie_word_embeddings", False))


def gguf_architecture(config: dict, where: str = "") -> tuple[str, bool]:
    """(GGUF architecture name, permute q/k) for a config.json; one line when it cannot be converted."""
    import gguf

    mt = config.get("model_type")
    if mt in GGUF_ARCH:
        _check_family(config, where)
        return GGUF_ARCH[mt]
    supported = ", ".join(GGUF_ARCH)
    if isinstance(mt, str) and mt in set(gguf.MODEL_ARCH_NAMES.values()):
        raise MergeQuantError(f"{where}model_type {mt!r}: GGUF defines this architecture but mergequant's GGUF export "
                              f"does not convert it yet (supported: {supported})")
    raise MergeQuantError(f"{where}model_type {mt!r}: GGUF (llama.cpp) defines no architecture for it; --method gguf "
                          f"supports {supported}")


def _check_family(cfg: dict, where: str) -> None:
    """Refuse, in one line, what llama.cpp's graph for the family hard-codes differently from ``cfg``."""
    mt = cfg.get("model_type")

    def refuse(why: str):
        raise MergeQuantError(f"{where}model_type {mt!r}: {why}; --method gguf refuses to write a file llama.cpp "
                              "would compute differently")

    n_head = int(cfg.get("num_attention_heads") or 1)
    head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size") or 0) // n_head)
    if mt in ("gemma", "gemma2") and not _tied(cfg):
        refuse("an untied lm_head (llama.cpp's gemma/gemma2 use the token embedding as the output layer)")
    if mt in ("gemma2", "gemma3_text"):
        # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B shapes
        big = int(cfg.get("num_hidden_layers") or 0) == (46 if mt == "gemma2" else 62)
        want = int(cfg["hidden_size"]) // n_head if big else head_dim
        q = cfg.get("query_pre_attn_scalar")
        if q is not None and float(q) != float(want):
            refuse(f"query_pre_attn_scalar {q} (llama.cpp scales queries by 1/sqrt({want}))")
    if mt == "gemma3_text":
        if cfg.get("attn_logit_softcapping") is not None:
            refuse("attn_logit_softcapping (llama.cpp's gemma3 has none)")
        local = (cfg.get("rope_parameters") or {}).get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            refuse(f"rope type {local.get('rope_type')!r} on the sliding-window layers (llama.cpp: default only)")
    if mt == "phi3":
        rp = _rope(cfg)
        if rp.get("rope_type") in ("longrope", "su"):
            _phi3_long_rope(cfg, rp, refuse)
        elif rp.get("rope_type") not in ("default", None) or rp.get("long_factor"):
            refuse(f"rope scaling {rp.get('rope_type')!r} (llama.cpp's phi3 takes default or longrope)")
    if mt in ("qwen2_moe", "qwen3_moe"):
        step = int(cfg.get("decoder_sparse_step") or 1)
        if step != 1 or cfg.get("mlp_only_layers"):
            refuse("layers without experts (decoder_sparse_step/mlp_only_layers; llama.cpp's "
                   f"{'qwen2moe' if mt == 'qwen2_moe' else 'qwen3moe'} gives every layer experts)")
        norm = bool(cfg.get("norm_topk_prob", False))  # transformers' default for both
        if norm != (mt == "qwen3_moe"):
            refuse(f"norm_topk_prob={norm} (llama.cpp's {'qwen3moe' if mt == 'qwen3_moe' else 'qwen2moe'} "
                   f"{'always' if mt == 'qwen3_moe' else 'never'} renormalizes the top-k expert weights)")


_PHI3_NAME_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")


def check_llama_cpp_name(name: str, tokens: list[str], where: str = "") -> None:
    """llama.cpp gives any model whose ``general.name`` contains "phi3" or "phi-3" Phi-3's token attributes,
    looking up ``<unk>``, ``<s>``, ``</s>`` and ``<|endoftext|>``: without them it fails to load the file.
    One line instead of a file that does not load."""
    low = name.lower()
    if "phi3" in low or "phi-3" in low:
        have = set(tokens)
        missing = [t for t in _PHI3_NAME_TOKENS if t not in have]
        if missing:
            raise MergeQuantError(f"{where}model name {name!r}: llama.cpp applies Phi-3's token rules to names with "
                                  f"phi3/phi-3 and fails without {', '.join(missing)} in the vocabulary; rename the "
                                  "model folder")


def _rope(config: dict) -> dict:
    rp = dict(config.get("rope_parameters") or {})
    if "full_attention" in rp or "sliding_attention" in rp:  # Gemma 3: per layer kind; the global layers' here
        rp = dict(rp.get("full_attention") or {})
    rs = config.get("rope_scaling") or {}
    if isinstance(rs, dict):
        for k, v in rs.items():
            rp.setdefault(k, v)
    rp.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rp.setdefault("rope_type", rp.get("type") or "default")
    return rp


def _phi3_long_rope(cfg: dict, rp: dict, refuse=None) -> tuple[np.ndarray, np.ndarray, float]:
    """Long-context Phi-3 (LongRoPE, rope type ``longrope`` or its old name ``su``) as llama.cpp takes it:
    per-frequency divisors ``rope_factors_long`` / ``rope_factors_short`` (rope_dims / 2 each; transformers
    uses the long ones for sequences past ``original_max_position_embeddings``, llama.cpp for a context
    past it) and ``rope.scaling.attn_factor``, the factor on cos/sin. The latter as transformers computes
    it: the config's ``attention_factor`` if given, else sqrt(1 + ln(f) / ln(original)) for the scale
    f = ``factor`` or max / original positions (llama.cpp's converter always takes max / original; the
    two agree on Phi-3 checkpoints, which carry neither key)."""
    orig = rp.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    if not orig and refuse is not None:
        refuse("longrope without original_max_position_embeddings")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    rot = float(rp.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0)
    half = int(head_dim * rot) // 2
    factors = [rp.get("long_factor"), rp.get("short_factor")]
    if refuse is not None:
        for kind, f in zip(("long_factor", "short_factor"), factors):
            if not isinstance(f, (list, tuple)) or len(f) != half:
                refuse(f"longrope {kind} of length {len(f) if isinstance(f, (list, tuple)) else 'none'} "
                       f"(the rotary dimensions need {half})")
    long_f, short_f = (np.asarray(f, dtype=np.float32) for f in factors)
    attn = rp.get("attention_factor")
    if attn is None:
        scale = float(rp.get("factor") or int(cfg["max_position_embeddings"]) / int(orig))
        attn = math.sqrt(1 + math.log(scale) / math.log(int(orig))) if scale > 1.0 else 1.0
    return long_f, short_f, float(attn)


def _llama3_rope_freqs(rp: dict, head_dim: int) -> np.ndarray:
    """Llama 3.x rope scaling as llama.cpp takes it: a ``rope_freqs`` tensor of per-frequency factors."""
    base = float(rp["rope_theta"])
    factor = float(rp.get("factor", 8.0))
    low, high = float(rp.get("low_freq_factor", 1.0)), float(rp.get("high_freq_factor", 4.0))
    old = float(rp.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


@dataclass
class Planned:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows last dimension = columns)
    read: Callable[[int, int], np.ndarray]  # (first row, end row) over the flattened leading dims -> float32 [r, cols]
    types: dict[str, str] = field(default_factory=dict)  # file type -> GGUF type
    imatrix_key: str | None = None  # source Linear (for --calib)
    experts: int = 0

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]


def _to_f32(t) -> np.ndarray:
    return np.ascontiguousarray(t.float().numpy() if hasattr(t, "float") else t, dtype=np.float32)


def _qk_perm(rows: int, n_head: int) -> np.ndarray:
    """Row order turning transformers' q/k layout (per head: first halves, then second halves of the
    rotary pairs) into llama.cpp's (pairs interleaved)."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _expert_name(ck, name: str) -> tuple[int, int, int] | None:
    """(layer, expert, part: 0 gate / 1 up / 2 down) of a per-expert weight on disk, else None."""
    from mergequant.architectures import ARCHITECTURES

    arch = ARCHITECTURES.get(ck.config.get("model_type"))
    if arch is None or arch.experts is None:
        return None
    m = re.fullmatch(rf"{re.escape(arch.layers)}\.(\d+)\.{re.escape(arch.experts.disk_block)}\.experts\.(\d+)\.(\w+)\.weight",
                     name)
    if not m or m.group(3) not in arch.experts.expert_linears:
        return None
    return int(m.group(1)), int(m.group(2)), arch.experts.expert_linears.index(m.group(3))


def plan_tensors(ck, arch_name: str, permute: bool) -> list[Planned]:
    import gguf

    cfg = ck.config
    fam = FAMILIES.get(cfg.get("model_type"), Family(arch_name, permute))
    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    nmap = gguf.get_tensor_name_map(arch_enum, n_layer)
    tied = _tied(cfg)
    out: list[Planned] = []
    experts: dict[tuple[int, int], dict[int, str]] = {}
    for name, info in ck.tensors.items():
        if name.endswith(_SKIP):
            continue
        ex = _expert_name(ck, name)
        if ex is not None:
            experts.setdefault((ex[0], ex[2]), {})[ex[1]] = name
            continue
        if name == "lm_head.weight" and (tied or fam.output == "embd"):
            continue
        gname = nmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise MergeQuantError(f"{ck.path}: tensor {name} has no GGUF name for architecture {arch_name}")
        shape = tuple(int(d) for d in info.shape)
        perm = None
        if permute and len(shape) in (1, 2) and (name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias")
                                                 or name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias")):
            perm = _qk_perm(shape[0], n_head if ".q_proj." in name else n_kv)
        shift = fam.norm_shift if name.endswith("norm.weight") else 0.0
        out.append(Planned(gname, shape if len(shape) > 1 else (shape[0],), _reader(ck, name, perm, len(shape), shift),
                           imatrix_key=name[: -len(".weight")] if name.endswith(".weight") and len(shape) == 2 else None))
        if fam.output == "required" and tied and gname == "token_embd.weight":
            out.append(Planned("output.weight", shape, _reader(ck, name, None, len(shape))))
    for (layer, part), by_e in sorted(experts.items()):
        names = [by_e[e] for e in sorted(by_e)]
        if sorted(by_e) != list(range(len(names))):
            raise MergeQuantError(f"{ck.path}: layer {layer} has experts {sorted(by_e)}: not 0..{len(names) - 1}")
        r, c = ck.tensors[names[0]].shape
        kind = names[0][: -len(".weight")].rsplit(".", 1)[1]
        out.append(Planned(f"blk.{layer}.{_EXPERT_PARTS[part]}.weight", (len(names), int(r), int(c)),
                           _expert_reader(ck, names, int(r)), imatrix_key=names[0][: -len(".weight")].rsplit(".", 3)[0]
                           + f".experts.*.{kind}", experts=len(names)))
    rp = _rope(cfg)
    if arch_name == "llama" and rp.get("rope_type") == "llama3":
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
        freqs = _llama3_rope_freqs(rp, head_dim)
        out.append(Planned("rope_freqs.weight", freqs.shape, lambda a, b, f=freqs: f.reshape(1, -1)))
    if arch_name == "phi3" and rp.get("rope_type") in ("longrope", "su"):
        for kind, f in zip(("long", "short"), _phi3_long_rope(cfg, rp)[:2]):
            out.append(Planned(f"rope_factors_{kind}.weight", f.shape, lambda a, b, f=f: f.reshape(1, -1)))
    return sorted(out, key=_llama_cpp_order)


def _llama_cpp_order(p: Planned):
    """llama.cpp's tensor order (its loader's map): model-level tensors first, then by layer, by name."""
    if p.name.startswith("blk."):
        return (int(p.name.split(".")[1]), p.name)
    return (-1, p.name)


def _reader(ck, name: str, perm: np.ndarray | None, ndim: int, shift: float = 0.0):
    def read(r0: int, r1: int) -> np.ndarray:
        t = ck.get(name)
        if ndim == 1:
            v = _to_f32(t).reshape(1, -1)
            v = v[:, perm] if perm is not None else v
        elif perm is not None:
            import torch

            v = _to_f32(t[torch.from_numpy(perm[r0:r1])])
        else:
            v = _to_f32(t[r0:r1])
        if shift:
            v = v + np.float32(shift)  # in float32, as transformers computes (1 + w)
        return v
    return read


def _expert_reader(ck, names: list[str], rows: int):
    def read(r0: int, r1: int) -> np.ndarray:
        parts = []
        r = r0
        while r < r1:
            e, i = divmod(r, rows)
            j = min(r1, (e + 1) * rows) - e * rows
            parts.append(_to_f32(ck.get(names[e])[i:j]))
            r = e * rows + j
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    return read


def model_shape(ck, arch_name: str, has_imatrix: bool = False) -> mixes.ModelShape:
    cfg = ck.config
    n_head = int(cfg["num_attention_heads"])
    n_expert = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    fam = FAMILIES.get(cfg.get("model_type"), Family(arch_name))
    has_output = fam.output == "required" or (fam.output == "own" and "lm_head.weight" in ck.tensors
                                              and not _tied(cfg))
    return mixes.ModelShape(arch_name, int(cfg["num_hidden_layers"]), n_head,
                            int(cfg.get("num_key_value_heads") or n_head), n_expert, has_output, has_imatrix)


def _add_hparams(w, ck, arch_name: str, name: str, file_type: str) -> None:
    cfg = ck.config
    n_head = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    rp = _rope(cfg)
    w.add_name(name)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or n_head))
    w.add_rope_freq_base(float(rp["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    if arch_name == "llama":
        w.add_rope_dimension_count(head_dim)
    if cfg.get("head_dim"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(int(cfg.get("vocab_size") or 0))
    _add_family_hparams(w, cfg, arch_name, hidden, n_head)
    kind = rp.get("rope_type")
    if kind == "linear":
        w.add_rope_scaling_type(gguf_rope("LINEAR"))
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf_rope("YARN"))
        w.add_rope_scaling_factor(float(rp["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
    elif kind in ("longrope", "su") and arch_name == "phi3":
        w.add_rope_scaling_attn_factors(_phi3_long_rope(cfg, rp)[2])
    elif kind not in ("default", "llama3", None):
        raise MergeQuantError(f"{ck.path}: rope type {kind!r} is not converted to GGUF (default, linear, yarn, llama3)")
    n_expert = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    if n_expert:
        if cfg.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(int(cfg["shared_expert_intermediate_size"]))
        w.add_expert_count(n_expert)
        w.add_expert_used_count(int(cfg.get("num_experts_per_tok") or 2))
    w.add_file_type(mixes.FTYPE[file_type])
    w.add_quantization_version(2)  # GGML_QNT_VERSION


def _swa_layers(cfg: dict) -> list[bool] | None:
    """Per layer: sliding-window attention (transformers' ``layer_types``), None when the config has none."""
    kinds = cfg.get("layer_types")
    if kinds:
        return [k == "sliding_attention" for k in kinds]
    return None


def _add_family_hparams(w, cfg: dict, arch_name: str, hidden: int, n_head: int) -> None:
    """The keys llama.cpp's converter writes for one architecture beyond the common ones."""
    if arch_name in ("gemma2", "gemma3"):
        swa = _swa_layers(cfg)
        if arch_name == "gemma2":
            w.add_attn_logit_softcapping(float(cfg.get("attn_logit_softcapping") or 0.0))
            w.add_final_logit_softcapping(float(cfg.get("final_logit_softcapping") or 0.0))
            w.add_sliding_window(int(cfg.get("sliding_window") or 4096))
        else:
            if cfg.get("final_logit_softcapping"):
                w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
            if cfg.get("sliding_window") and (swa is None or any(swa)):
                w.add_sliding_window(int(cfg["sliding_window"]))
            local = ((cfg.get("rope_parameters") or {}).get("sliding_attention") or {}).get("rope_theta")
            local = local or cfg.get("rope_local_base_freq")
            if local is not None:
                w.add_rope_freq_base_swa(float(local))
        if swa is not None:  # the exact pattern (llama.cpp's default: every 2nd / 6th layer global)
            w.add_sliding_window_pattern(swa)
    elif arch_name == "phi3":
        rp = _rope(cfg)
        rot = float(rp.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0)
        w.add_rope_dimension_count(int(rot * hidden) // n_head)
        orig = rp.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
        if orig:
            w.add_rope_scaling_orig_ctx_len(int(orig))
        w.add_sliding_window(int(cfg.get("sliding_window") or 0))


def gguf_rope(kind: str):
    import gguf

    return gguf.RopeScalingType[kind]


@dataclass
class GGUFResult:
    files: dict[str, Path]  # file type -> path
    sizes: dict[str, int]
    tensors: int
    types: dict[str, dict[str, int]]  # file type -> GGUF type -> tensor count
    seconds: float = 0.0


def output_name(model_dir: Path, file_type: str) -> str:
    return f"{Path(model_dir).resolve().name}-{file_type}.gguf"


def model_name(model_dir: Path, ck=None) -> str:
    """The name of the model's files (``<name>-<T>.gguf``) and its ``general.name``: the source folder's name,
    or for an adapted model (``BASE+ADAPTER``, an adapter-only folder) the adapter's (folder name, or the last
    part of its Hub id), as the quantize card's title names it."""
    from mergequant.peft.adapted import adapter_of

    a = adapter_of(ck) if ck is not None else None
    if a is None:
        return Path(model_dir).resolve().name
    if Path(a.adapter).exists():
        return Path(a.adapter).resolve().name
    return a.adapter.split("@")[0].rstrip("/").rsplit("/", 1)[-1] or a.adapter_path.resolve().name


def tokenizer_source(model_dir: Path, ck=None) -> Path:
    """Where the tokenizer is read: ``model_dir``, or for an adapted model the adapter folder when it has
    tokenizer files, else its base (:attr:`mergequant.peft.adapted.AdaptedCheckpoint.tokenizer_path`)."""
    from mergequant.peft.adapted import adapter_of, tokenizer_dir

    return tokenizer_dir(ck) if ck is not None and adapter_of(ck) is not None else Path(model_dir)


def write_gguf(model_dir: str | Path, out_dir: str | Path, file_types: list[str], *, imatrix: dict | None = None,
               ck=None, name: str | None = None, progress: bool = False, fsync: bool = True,
               finished: dict[tuple[str, str], Path] | None = None) -> GGUFResult:
    """Write ``out_dir/<name>-<T>.gguf`` for each file type ``T`` (``out_dir`` must exist), one pass.
    ``finished``: (GGUF tensor name, GGUF type) -> a file holding that tensor's bytes in that type, already
    quantized elsewhere (``--gguf-search gptq``: mergequant.gguf.gptq_grid); copied, slab by slab, instead of
    quantizing the tensor here."""
    import logging
    import time

    import gguf

    from mergequant.gguf.tokenizer import add_to_writer, tokenizer_metadata
    from mergequant.merge.moe_layout import per_expert_view
    from mergequant.peft.adapted import open_model

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    file_types = mixes.check_file_types(file_types)
    ck = ck or per_expert_view(open_model(model_dir, hub=False))  # a folder, BASE+ADAPTER or an adapter-only folder
    arch_name, permute = gguf_architecture(ck.config, f"{model_dir}: ")
    tok = tokenizer_metadata(tokenizer_source(model_dir, ck), ck.config)
    planned = get_format("gguf").plan(ck, arch_name, permute, file_types, has_imatrix=imatrix is not None)
    name = name or model_name(model_dir, ck)
    check_llama_cpp_name(name, tok.tokens, f"{model_dir}: ")
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)
    writers = {}
    paths = {}
    try:
        for ft in file_types:
            paths[ft] = out_dir / f"{name}-{ft}.gguf"
            w = gguf.GGUFWriter(paths[ft], arch_name)
            _add_hparams(w, ck, arch_name, name, ft)
            add_to_writer(tok, w)
            if arch_name.startswith("gemma") and tok.model == "llama":
                w.add_add_space_prefix(False)  # as llama.cpp's converter: Gemma's SentencePiece adds no dummy prefix
            for p in planned:
                t = p.types[ft]
                w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.rows * row_bytes(t, p.cols),
                                  raw_dtype=gguf.GGMLQuantizationType[t])
            w.write_header_to_file(paths[ft])
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            writers[ft] = w
        _stream(planned, writers, imatrix, progress, finished)
        for ft, w in writers.items():
            f = w.fout[0]
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    finally:
        for w in writers.values():
            w.close()
    counts = {ft: {} for ft in file_types}
    for p in planned:
        for ft in file_types:
            counts[ft][p.types[ft]] = counts[ft].get(p.types[ft], 0) + 1
    return GGUFResult(paths, {ft: p.stat().st_size for ft, p in paths.items()}, len(planned), counts,
                      time.perf_counter() - t0)


def _imatrix_for(imatrix: dict | None, p: Planned, r0: int, r1: int) -> np.ndarray | None:
    if imatrix is None or p.imatrix_key is None:
        return None
    if p.experts:  # each expert's slab with its own row (llama.cpp: row r0 // rows of the E x cols vector)
        from mergequant.gguf.moe_imatrix import expert_row

        return expert_row(imatrix, p.imatrix_key, r0 // p.shape[1], p.experts)
    return imatrix.get(p.imatrix_key)


def _finished_rows(path: Path, r0: int, r1: int, nbytes: int) -> np.ndarray:
    """Rows [r0, r1) of a finished tensor's bytes (``nbytes`` per row) read from ``path``, for one slab."""
    b = np.fromfile(path, dtype=np.uint8, count=(r1 - r0) * nbytes, offset=r0 * nbytes)
    if b.size != (r1 - r0) * nbytes:  # pragma: no cover - a planning bug
        raise MergeQuantError(f"internal error: {path} holds fewer bytes than rows {r0}..{r1} of {nbytes}")
    return b.reshape(r1 - r0, nbytes)


def _stream(planned: list[Planned], writers: dict, imatrix: dict | None, progress: bool,
            finished: dict[tuple[str, str], Path] | None = None) -> None:
    from tqdm import tqdm

    pack = get_format("gguf").pack
    files = {ft: w.fout[0] for ft, w in writers.items()}
    for f in files.values():
        _pad(f)
    for p in tqdm(planned, desc="gguf", unit="tensor", disable=not progress or None):
        rows, cols = p.rows, p.cols
        step = max(1, CHUNK_ELEMENTS // max(cols, 1))
        if p.experts:  # never mix two experts' rows in one slab (each has its own importance)
            step = min(step, p.shape[1])
        written = {ft: 0 for ft in files}
        r0 = 0
        while r0 < rows:
            r1 = min(rows, r0 + step)
            if p.experts and r0 // p.shape[1] != (r1 - 1) // p.shape[1]:
                r1 = (r0 // p.shape[1] + 1) * p.shape[1]
            x = p.read(r0, r1)
            done: dict[str, np.ndarray] = {}
            im = _imatrix_for(imatrix, p, r0, r1)
            for ft, f in files.items():
                t = p.types[ft]
                if t not in done and finished and (p.name, t) in finished:
                    done[t] = _finished_rows(finished[(p.name, t)], r0, r1, row_bytes(t, cols))
                elif t not in done:
                    done[t] = pack(x.reshape(r1 - r0, cols), t, im)
                b = done[t]
                f.write(memoryview(np.ascontiguousarray(b)).cast("B"))
                written[ft] += b.nbytes
            del x, done
            r0 = r1
        for ft, f in files.items():
            expect = p.rows * row_bytes(p.types[ft], cols)
            if written[ft] != expect:  # pragma: no cover - a planning bug
                raise MergeQuantError(f"internal error: {p.name} wrote {written[ft]} bytes, planned {expect}")
            _pad(f)


def _pad(f) -> None:
    n = (-f.tell()) % ALIGN
    if n:
        f.write(b"\0" * n)
