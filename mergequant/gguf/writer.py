"""Write GGUF files (llama.cpp) from a checkpoint, for several file types in one pass.

``write_gguf(model_dir, out_dir, ["Q4_K_M", "Q8_0"])`` plans every output tensor (GGUF name, shape,
and per file type the tensor's GGUF type, from ``mixes``: ``checkpoint_formats.gguf.GGUFFormat.plan``), writes each file's header (metadata:
architecture hyper-parameters, tokenizer, chat template; tensor infos with offsets) up front, then
streams: each source tensor is read once (memory-mapped, in row slabs of ``CHUNK_ELEMENTS``), turned
into float32, and quantized once per distinct type the files need, the bytes appended to each file.
Anonymous memory stays around a few copies of one slab, whatever the model size.

Llama-family attention (llama, mistral, mixtral: GGUF architecture ``llama``) needs q and k rows
permuted from transformers' rotary layout (two halves) to llama.cpp's (interleaved pairs); the
permutation is applied while reading rows. Mixtral's experts are stacked into 3-D
``ffn_{gate,up,down}_exps`` tensors, one expert's matrix at a time.
"""

from __future__ import annotations

import math
import os
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

# transformers model_type -> (GGUF architecture, q/k rotary permutation)
GGUF_ARCH = {"llama": ("llama", True), "mistral": ("llama", True), "mixtral": ("llama", True),
             "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
_SKIP = ("rotary_emb.inv_freq",)
_EXPERT_KINDS = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def gguf_architecture(config: dict, where: str = "") -> tuple[str, bool]:
    """(GGUF architecture name, permute q/k) for a config.json; one line when it cannot be converted."""
    import gguf

    mt = config.get("model_type")
    if mt in GGUF_ARCH:
        return GGUF_ARCH[mt]
    supported = ", ".join(GGUF_ARCH)
    if isinstance(mt, str) and mt in set(gguf.MODEL_ARCH_NAMES.values()):
        raise MergeQuantError(f"{where}model_type {mt!r}: GGUF defines this architecture but mergequant's GGUF export "
                              f"does not convert it yet (supported: {supported})")
    raise MergeQuantError(f"{where}model_type {mt!r}: GGUF (llama.cpp) defines no architecture for it; --method gguf "
                          f"supports {supported}")


def _rope(config: dict) -> dict:
    rp = dict(config.get("rope_parameters") or {})
    rs = config.get("rope_scaling") or {}
    if isinstance(rs, dict):
        for k, v in rs.items():
            rp.setdefault(k, v)
    rp.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rp.setdefault("rope_type", rp.get("type") or "default")
    return rp


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


def plan_tensors(ck, arch_name: str, permute: bool) -> list[Planned]:
    import gguf

    cfg = ck.config
    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    nmap = gguf.get_tensor_name_map(arch_enum, n_layer)
    tied = bool(cfg.get("tie_word_embeddings", False))
    out: list[Planned] = []
    experts: dict[tuple[int, str], dict[int, str]] = {}
    for name, info in ck.tensors.items():
        if name.endswith(_SKIP):
            continue
        parts = name.split(".")
        if ".block_sparse_moe.experts." in name and parts[-2] in _EXPERT_KINDS:
            experts.setdefault((int(parts[2]), parts[-2]), {})[int(parts[5])] = name
            continue
        if name == "lm_head.weight" and tied:
            continue
        gname = nmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise MergeQuantError(f"{ck.path}: tensor {name} has no GGUF name for architecture {arch_name}")
        shape = tuple(int(d) for d in info.shape)
        perm = None
        if permute and len(shape) in (1, 2) and (name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias")
                                                 or name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias")):
            perm = _qk_perm(shape[0], n_head if ".q_proj." in name else n_kv)
        out.append(Planned(gname, shape if len(shape) > 1 else (shape[0],), _reader(ck, name, perm, len(shape)),
                           imatrix_key=name[: -len(".weight")] if name.endswith(".weight") and len(shape) == 2 else None))
    for (layer, kind), by_e in sorted(experts.items()):
        names = [by_e[e] for e in sorted(by_e)]
        r, c = ck.tensors[names[0]].shape
        out.append(Planned(f"blk.{layer}.{_EXPERT_KINDS[kind]}.weight", (len(names), int(r), int(c)),
                           _expert_reader(ck, names, int(r)), imatrix_key=names[0][: -len(".weight")].rsplit(".", 3)[0]
                           + f".experts.*.{kind}", experts=len(names)))
    rp = _rope(cfg)
    if arch_name == "llama" and rp.get("rope_type") == "llama3":
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
        freqs = _llama3_rope_freqs(rp, head_dim)
        out.append(Planned("rope_freqs.weight", freqs.shape, lambda a, b, f=freqs: f.reshape(1, -1)))
    return sorted(out, key=_llama_cpp_order)


def _llama_cpp_order(p: Planned):
    """llama.cpp's tensor order (its loader's map): model-level tensors first, then by layer, by name."""
    if p.name.startswith("blk."):
        return (int(p.name.split(".")[1]), p.name)
    return (-1, p.name)


def _reader(ck, name: str, perm: np.ndarray | None, ndim: int):
    def read(r0: int, r1: int) -> np.ndarray:
        t = ck.get(name)
        if ndim == 1:
            v = _to_f32(t).reshape(1, -1)
            return v[:, perm] if perm is not None else v
        if perm is not None:
            import torch

            return _to_f32(t[torch.from_numpy(perm[r0:r1])])
        return _to_f32(t[r0:r1])
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
    has_output = "lm_head.weight" in ck.tensors and not bool(cfg.get("tie_word_embeddings", False))
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
    kind = rp.get("rope_type")
    if kind == "linear":
        w.add_rope_scaling_type(gguf_rope("LINEAR"))
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf_rope("YARN"))
        w.add_rope_scaling_factor(float(rp["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3", None):
        raise MergeQuantError(f"{ck.path}: rope type {kind!r} is not converted to GGUF (default, linear, yarn, llama3)")
    n_expert = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(int(cfg.get("num_experts_per_tok") or 2))
    w.add_file_type(mixes.FTYPE[file_type])
    w.add_quantization_version(2)  # GGML_QNT_VERSION


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


def write_gguf(model_dir: str | Path, out_dir: str | Path, file_types: list[str], *, imatrix: dict | None = None,
               ck=None, name: str | None = None, progress: bool = False, fsync: bool = True) -> GGUFResult:
    """Write ``out_dir/<name>-<T>.gguf`` for each file type ``T`` (``out_dir`` must exist), one pass."""
    import logging
    import time

    import gguf

    from mergequant.gguf.tokenizer import add_to_writer, tokenizer_metadata
    from mergequant.io.checkpoint import Checkpoint
    from mergequant.merge.moe_layout import per_expert_view

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    file_types = mixes.check_file_types(file_types)
    ck = ck or per_expert_view(Checkpoint.open(model_dir))
    arch_name, permute = gguf_architecture(ck.config, f"{model_dir}: ")
    tok = tokenizer_metadata(model_dir, ck.config)
    planned = get_format("gguf").plan(ck, arch_name, permute, file_types, has_imatrix=imatrix is not None)
    name = name or Path(model_dir).resolve().name
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)
    writers = {}
    paths = {}
    try:
        for ft in file_types:
            paths[ft] = out_dir / f"{name}-{ft}.gguf"
            w = gguf.GGUFWriter(paths[ft], arch_name)
            _add_hparams(w, ck, arch_name, name, ft)
            add_to_writer(tok, w)
            for p in planned:
                t = p.types[ft]
                w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.rows * row_bytes(t, p.cols),
                                  raw_dtype=gguf.GGMLQuantizationType[t])
            w.write_header_to_file(paths[ft])
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            writers[ft] = w
        _stream(planned, writers, imatrix, progress)
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
    if p.experts:
        rows = p.shape[1]
        e = r0 // rows
        key = p.imatrix_key.replace("*", str(e))
        return imatrix.get(key)
    return imatrix.get(p.imatrix_key)


def _stream(planned: list[Planned], writers: dict, imatrix: dict | None, progress: bool) -> None:
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
                if t not in done:
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
