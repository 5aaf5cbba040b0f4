"""Which GGUF type each tensor gets, per requested file type: llama.cpp's per-tensor mixes.

A file type (``--gguf-type``) is either a plain type (F32, F16, BF16, Q8_0, Q4_0, ..., Q6_K), where
every quantizable weight gets that type, or a k-quant preset (Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M), whose
default type (Q3_K, Q4_K, Q5_K) some tensors are raised above. The rules below are llama.cpp's
(``llama_tensor_get_type`` in llama-quant.cpp), restated for the types this tool writes, so that our
file and ``llama-quantize``'s have the same type per tensor (checked byte for byte in the tests):

- Only 2-D (3-D expert) tensors whose name ends in ``weight`` are quantized; norms (``*_norm.weight``)
  and MoE routers (``ffn_gate_inp``) stay F32, as do all 1-D tensors (llama.cpp counts dimensions as
  ``ggml_n_dims``: a [1, n] tensor such as Qwen2-MoE's ``ffn_gate_inp_shexp`` is 1-D).
- ``output.weight`` (and ``token_embd.weight`` when the model has no separate output): Q6_K for every
  quantized file type except Q8_0 (Q8_0 when the row length is not a multiple of the block).
- ``attn_v`` (and a fused ``attn_qkv``, Phi-3's, which llama.cpp puts in the same category): Q2_K -> Q3_K (Q4_K when n_head / n_kv_head >= 4); Q3_K_M -> Q5_K in the first two layers
  then Q4_K; Q3_K_L -> Q5_K; Q4_K_M, Q5_K_M -> Q6_K where ``use_more_bits``; Q4_K_S -> Q5_K in the first
  four layers; 70B-type models (llama 80 layers with GQA, qwen2 80 layers): Q3_K/Q4_K -> Q5_K; 8-expert
  models: Q8_0 (also ``attn_k``).
- ``ffn_down``: Q2_K -> Q3_K; Q3_K_M -> Q5_K in the first n/16 layers, else Q4_K; Q3_K_L -> Q5_K;
  Q4_K_M, Q5_K_M -> Q6_K where ``use_more_bits``; Q4_K_S -> Q5_K in the first n/8 layers; with an
  importance matrix, Q4_0 / Q5_0 -> Q4_1 / Q5_1 in the first n/8 layers.
- ``attn_output``: Q2_K -> Q3_K, Q3_K_M -> Q4_K, Q3_K_L -> Q5_K; 8-expert models: Q5_K for Q2_K, Q3_K_S,
  Q3_K_M, Q4_K_S, Q4_K_M.
- ``use_more_bits(i, n)``: the first n/8 layers, the last n/8, and every third layer in between.
- A row length that is not a multiple of the chosen type's block falls back: Q2_K, Q3_K -> Q4_0;
  Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0; and to F16 when even that does not divide it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mergequant.errors import MergeQuantError
from mergequant.gguf.blocks import BLOCK

PLAIN = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q6_K")
PRESETS = {"Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
           "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K"}
FILE_TYPES = PLAIN + tuple(PRESETS)
FLOAT_TYPES = ("F32", "F16", "BF16")
# llama.cpp's llama_ftype numbers (general.file_type)
FTYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
         "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32}
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def check_file_types(types: list[str]) -> list[str]:
    """Normalize (upper case, deduplicated, in order) and refuse unknown names with one line."""
    out: list[str] = []
    for t in types:
        u = str(t).strip().upper()
        if u not in FILE_TYPES:
            raise MergeQuantError(f"--gguf-type {t}: unknown GGUF type (choose from {', '.join(FILE_TYPES)})")
        if u not in out:
            out.append(u)
    if not out:
        raise MergeQuantError("--method gguf needs at least one --gguf-type (e.g. --gguf-type Q4_K_M)")
    return out


def default_type(file_type: str) -> str:
    return PRESETS.get(file_type, file_type)


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class ModelShape:
    """What the mixes depend on: the GGUF architecture, layer count, heads, experts, tied output."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    has_output: bool = True  # False: token_embd doubles as the output and is treated like it
    has_imatrix: bool = False

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        return ((self.arch == "llama" and self.n_layer == 80 and self.n_head != self.n_head_kv and self.n_expert <= 1)
                or (self.arch == "qwen2" and self.n_layer == 80))


def quantizable(name: str, n_dims: int | tuple[int, ...]) -> bool:
    """``n_dims``: a count, or the numpy shape (then leading 1s do not count, as in ggml_n_dims: Qwen2-MoE's
    ``ffn_gate_inp_shexp`` [1, n_embd] is 1-D to llama.cpp and stays F32)."""
    if isinstance(n_dims, tuple):
        shape = list(n_dims)
        while len(shape) > 1 and shape[0] == 1:
            shape.pop(0)
        n_dims = len(shape)
    return (n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


_LAYER = re.compile(r"blk\.(\d+)\.")


def tensor_type(file_type: str, name: str, shape: tuple[int, ...], m: ModelShape) -> str:
    """The GGUF type of tensor ``name`` (GGUF name, numpy ``shape``: rows first) in a ``file_type`` file."""
    if not quantizable(name, tuple(shape)):
        return "F32"
    new = default_type(file_type)
    if new in FLOAT_TYPES:
        return new
    ncols = shape[-1]
    layer = int(_LAYER.match(name).group(1)) if _LAYER.match(name) else -1
    ft = file_type
    if name == "output.weight" or (not m.has_output and name == "token_embd.weight"):
        if ncols % BLOCK[new][0]:
            new = "Q8_0"
        elif new != "Q8_0":
            new = "Q6_K"
    elif name == "token_embd.weight":
        pass
    elif "attn_qkv.weight" in name or "attn_v.weight" in name:  # llama.cpp: fused qkv counts as attn_v
        if ft == "Q2_K":
            new = "Q4_K" if m.n_gqa >= 4 else "Q3_K"
        elif ft == "Q3_K_M":
            new = "Q5_K" if layer < 2 else "Q4_K"
        elif ft == "Q3_K_L":
            new = "Q5_K"
        elif ft in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, m.n_layer):
            new = "Q6_K"
        elif ft == "Q4_K_S" and layer < 4:
            new = "Q5_K"
        if m.is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        if m.n_expert == 8:
            new = "Q8_0"
    elif "attn_k.weight" in name:
        if m.n_expert == 8:
            new = "Q8_0"
    elif "attn_q.weight" in name:
        pass
    elif "attn_output.weight" in name:
        if m.n_expert == 8:
            if ft in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                new = "Q5_K"
        elif ft == "Q2_K":
            new = "Q3_K"
        elif ft == "Q3_K_M":
            new = "Q4_K"
        elif ft == "Q3_K_L":
            new = "Q5_K"
    elif "ffn_up" in name or "ffn_gate" in name:
        pass
    elif "ffn_down" in name:
        i, n = layer, m.n_layer
        if ft == "Q2_K":
            new = "Q3_K"
        elif ft == "Q3_K_M":
            new = "Q5_K" if i < n // 16 else "Q4_K"
        elif ft == "Q3_K_L":
            new = "Q5_K"
        elif ft == "Q4_K_M":
            if use_more_bits(i, n):
                new = "Q6_K"
        elif ft == "Q5_K_M" and use_more_bits(i, n):
            new = "Q6_K"
        elif ft == "Q4_K_S" and i < n // 8:
            new = "Q5_K"
        elif ft in ("Q4_0", "Q5_0") and m.has_imatrix and i < n // 8:
            new = "Q4_1" if ft == "Q4_0" else "Q5_1"
    # a row length the type's block does not divide
    if ncols % BLOCK[new][0]:
        new = _FALLBACK.get(new, new)
        if ncols % BLOCK[new][0]:
            new = "F16"
    return new
