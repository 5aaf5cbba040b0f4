"""Synthetic checkpoints for the GPU check (``bench/gpu_check.py``) and ``tests/test_gpu.py``, drawn on any device.

**Dense Llama** (``build_llama``): ``merge_bench``'s recipe -- weights N(0, 1/fan_in), norms 1 + 0.05 N(0, 1),
bf16, one tensor in memory at a time, seeded per tensor name -- with the random numbers drawn on
``device``. On the GPU machine a CUDA generator makes an 8B-shaped model in seconds (the CPU generator needs
minutes), and the time left is the disk's. A "fine-tune" (``variant`` other than "base") is the base tensor
(drawn again from its seed, not read back) plus ``merge_bench``'s perturbation: 30% of the weights move by
about 0.2 mean|x|, the rest by 5% of that. The same seeds on the same device type and torch version give
the same bytes; CPU and CUDA generators give different numbers, which does not matter: every comparison
is between tools or devices on the same files. The bundled 2048-token tokenizer (``mergequant/data/``) is
written next to the weights.

**Tiny Mixtral** (``build_tiny_mixtral``): random weights under the per-expert names Hub checkpoints use
(``block_sparse_moe.experts.E.w1|w2|w3``, router ``block_sparse_moe.gate``), for when the trained tiny
Mixtral of ``shared/models/moe-mixtral`` is not on the machine.

A folder is reused when its ``gpu_synth.json`` records the same spec (shapes, seeds, device type, torch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

GENERATOR_VERSION = 1  # bump when the numbers change, so cached folders are rebuilt

# Widths of the models the check builds. "8b": Mistral-7B's exact shape (Llama-3-8B's widths with a
# 32000-token vocabulary): 7.24e9 parameters, 14.5 GB in bf16. "1b": TinyLlama-1.1B, merge_bench's "1b".
SHAPES = {
    "8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=32000),
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    "tiny": dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=2048),
}


def seed_for(*parts) -> int:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def llama_config(shape: dict, *, max_position_embeddings: int = 8192) -> dict:
    """A LlamaForCausalLM config.json for ``shape`` (keys as in ``SHAPES``)."""
    from mergequant.demo import tiny_llama_config

    cfg = tiny_llama_config(hidden=shape["hidden"], intermediate=shape["intermediate"], layers=shape["layers"],
                            heads=shape["heads"], kv_heads=shape["kv_heads"], vocab=shape["vocab"])
    # tiny_llama_config caps positions at 512, which would cap the calibration windows (2048 tokens)
    cfg["max_position_embeddings"] = max_position_embeddings
    return cfg


def parameter_count(cfg: dict) -> int:
    from mergequant.demo import llama_tensor_shapes

    return sum(math.prod(s) for s in llama_tensor_shapes(cfg).values())


class _Lazy:
    """A tensor for ``write_checkpoint``: dtype and shape up front (for the shard plan), the data only when
    the writer asks for it (``contiguous()``), so one tensor is in memory at a time."""

    def __init__(self, make, shape, dtype=torch.bfloat16):
        self._make, self.shape, self.dtype = make, tuple(shape), dtype

    def contiguous(self) -> torch.Tensor:
        t = self._make()
        assert t.dtype == self.dtype and tuple(t.shape) == self.shape, (t.dtype, t.shape, self.shape)
        return t.contiguous()


def _generator(device: torch.device, *parts) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed_for(*parts))


def dense_tensor(name: str, shape, device: torch.device, variant: str = "base") -> torch.Tensor:
    """One bf16 tensor of the synthetic model ``variant`` ("base", or a fine-tune's name), on the CPU."""
    x = torch.randn(shape, generator=_generator(device, "base", name), device=device)
    if name.endswith("norm.weight"):
        x = 1.0 + 0.05 * x
    else:
        x = x / math.sqrt(shape[-1])
    x = x.to(torch.bfloat16)
    if variant != "base":
        g = _generator(device, "ft", variant, name)
        x = x.float()
        noise = torch.randn(shape, generator=g, device=device).mul_(x.abs().mean() * 0.2)
        keep = torch.rand(shape, generator=g, device=device) < 0.3
        x = (x + torch.where(keep, noise, noise * 0.05)).to(torch.bfloat16)
    return x.cpu()


def _spec(cfg: dict, device: torch.device, variant: str, shards: int) -> dict:
    return {"generator": GENERATOR_VERSION, "variant": variant, "device_type": device.type,
            "torch": torch.__version__.split("+")[0], "shards": shards, "config": cfg}


def _reuse(path: Path, spec: dict) -> bool:
    marker = path / "gpu_synth.json"
    try:
        return json.loads(marker.read_text()) == spec
    except (OSError, ValueError):
        return False


def build_llama(path: Path, shape: dict, *, device: str | torch.device = "cpu", variant: str = "base",
                shards: int = 2, log=print) -> tuple[Path, float]:
    """The synthetic Llama ``variant`` of ``shape`` at ``path`` (reused when already built with the same
    spec). Returns (path, seconds spent building; 0 when reused)."""
    from mergequant.demo import llama_tensor_shapes, write_checkpoint

    device = torch.device(device)
    path = Path(path)
    cfg = llama_config(shape)
    spec = _spec(cfg, device, variant, shards)
    if _reuse(path, spec):
        return path, 0.0
    t0 = time.perf_counter()
    tmp = path.parent / f".{path.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    tensors = {n: _Lazy(lambda n=n, s=s: dense_tensor(n, s, device, variant), s)
               for n, s in llama_tensor_shapes(cfg).items()}
    write_checkpoint(tmp, cfg, tensors, shards=shards)
    (tmp / "gpu_synth.json").write_text(json.dumps(spec, indent=2) + "\n")
    os.rename(tmp, path)
    took = time.perf_counter() - t0
    log(f"built {path} ({variant}, {parameter_count(cfg) / 1e9:.2f}B parameters, drawn on {device.type}) "
        f"in {took:.1f} s")
    return path, took


def mixtral_config(*, hidden: int = 64, intermediate: int = 128, layers: int = 2, experts: int = 4, top_k: int = 2,
                   heads: int = 4, kv_heads: int = 2, vocab: int = 2048) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "num_local_experts": experts,
        "num_experts_per_tok": top_k, "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 0,
        "eos_token_id": 1, "torch_dtype": "bfloat16", "router_aux_loss_coef": 0.02, "output_router_logits": False,
        "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
    }


def mixtral_tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_local_experts"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "block_sparse_moe.gate.weight": (e, h),
        })
        for x in range(e):
            ep = f"{p}block_sparse_moe.experts.{x}."
            shapes.update({ep + "w1.weight": (i, h), ep + "w2.weight": (h, i), ep + "w3.weight": (i, h)})
    return shapes


def build_tiny_mixtral(path: Path, *, device: str | torch.device = "cpu", shards: int = 2, **cfg_kw) -> Path:
    """A random MixtralForCausalLM (per-expert tensor names, bf16, the bundled tokenizer) at ``path``."""
    from mergequant.demo import write_checkpoint

    device = torch.device(device)
    path = Path(path)
    cfg = mixtral_config(**cfg_kw)
    spec = _spec(cfg, device, "mixtral", shards)
    if _reuse(path, spec):
        return path
    shutil.rmtree(path, ignore_errors=True)
    tensors = {n: _Lazy(lambda n=n, s=s: dense_tensor(n, s, device), s) for n, s in mixtral_tensor_shapes(cfg).items()}
    write_checkpoint(path, cfg, tensors, shards=shards)
    (path / "gpu_synth.json").write_text(json.dumps(spec, indent=2) + "\n")
    return path
