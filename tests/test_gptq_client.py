"""Interop: a GPTQ checkpoint in the layout mergequant writes loads in a maintained client.

transformers 5 loads GPTQ only through gptqmodel (+ optimum); auto-gptq is dead. These tests write a
tiny Llama as a GPTQ checkpoint (RTN codes packed with ``formats.gptq_pack``), load it with
``AutoModelForCausalLM.from_pretrained`` (gptqmodel kernels on CPU) and compare its logits with a
plain LlamaForCausalLM whose Linear weights are our own ``gptq_dequantize`` of the same tensors.
Skipped where gptqmodel is not installed; install notes in docs/gptq-client-notes.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

# gptqmodel sizes a CPU thread pool from the core count at import; pin it so small CI boxes work.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

# every test here loads a checkpoint in gptqmodel; whether it is installed is looked up, not imported
# (importing gptqmodel takes seconds, which a run that deselects `client` should not pay at collection)
pytestmark = [pytest.mark.client,
              pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None,
                                 reason="gptqmodel/optimum not installed (scripts/install-gptq-client.sh)")]

import torch
from safetensors.torch import save_file

from mergequant.demo import build_tiny_llama
from mergequant.quant import formats
from mergequant.quant.gptq import quantize_rtn

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BITS = 4
HIDDEN, INTER, LAYERS = 128, 256, 2
TOKENS = [[1, 17, 300, 42, 999, 5, 1500, 7, 64, 2000]]


def _load_plain(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(src.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _write_gptq(tmp: Path, *, group_size: int, sym: bool, desc_act: bool, checkpoint_format: str, seed: int = 0):
    """Write the GPTQ checkpoint; return (dir, tiny model dir, {linear name: dequantized [N, K] fp32})."""
    src = build_tiny_llama(tmp / "tiny", dtype=torch.float32, hidden=HIDDEN, intermediate=INTER, layers=LAYERS)
    dense = _load_plain(src)
    gen = torch.Generator().manual_seed(seed)
    out_dir = tmp / f"gptq-{checkpoint_format}-g{group_size}-{'sym' if sym else 'asym'}-{'act' if desc_act else 'noact'}"
    out_dir.mkdir()
    tensors, deq = {}, {}
    for name, w in dense.items():
        mod = name.removesuffix(".weight")
        if not (name.endswith(".weight") and mod.endswith(LINEARS)):
            tensors[name] = w.to(torch.float16).contiguous()
            continue
        K = w.shape[1]
        if desc_act:
            perm = torch.randperm(K, generator=gen)
            q_p, scales, zeros = quantize_rtn(w[:, perm], bits=BITS, group_size=group_size, sym=sym)
            q = torch.empty_like(q_p)
            q[:, perm] = q_p  # column i of the permuted run is original channel perm[i]
            g_idx = formats.g_idx_for(K, group_size, perm)
        else:
            q, scales, zeros = quantize_rtn(w, bits=BITS, group_size=group_size, sym=sym)
            g_idx = formats.g_idx_for(K, group_size)
        packed = formats.gptq_pack(q.T.contiguous(), zeros, scales, g_idx, bits=BITS,
                                   checkpoint_format=checkpoint_format)
        for k, v in packed.items():
            tensors[f"{mod}.{k}"] = v.contiguous()
        deq[name] = formats.gptq_dequantize(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"],
                                            bits=BITS, checkpoint_format=checkpoint_format)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    qcfg = formats.gptq_quantize_config(bits=BITS, group_size=group_size, desc_act=desc_act, sym=sym,
                                        checkpoint_format=checkpoint_format)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    cfg["torch_dtype"] = "float16"
    if "dtype" in cfg:
        cfg["dtype"] = "float16"
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    (out_dir / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out_dir / f.name)
    return out_dir, src, dense, deq


def _reference_logits(src: Path, dense: dict, deq: dict | None) -> torch.Tensor:
    """fp32 LlamaForCausalLM: our dequantized Linears, fp16-rounded everything else (as written)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(src)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    deq = deq or {}  # None: the unquantized model (fp32 Linears), for the size of the quantization error
    state = {n: deq[n] if n in deq else t.to(torch.float16).to(torch.float32) for n, t in dense.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float()


def _client_logits(ckpt: Path) -> tuple[torch.Tensor, object]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), device_map="cpu").eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float(), model


def _check(tmp_path, **kw):
    ckpt, src, dense, deq = _write_gptq(tmp_path, **kw)
    ref = _reference_logits(src, dense, deq)
    unquant = _reference_logits(src, dense, None)  # the same model before quantization
    got, model = _client_logits(ckpt)
    assert model.dtype == torch.float16
    # the client really swapped in quantized kernels (not a silent dense load)
    qlayers = [m for m in model.modules() if hasattr(m, "qweight")]
    assert len(qlayers) == len(LINEARS) * LAYERS
    diff = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"{kw}: max|logit diff| = {diff:.3e} (max|logit| = {scale:.3f}), kernel = {type(qlayers[0]).__name__}")
    # fp16 activations/kernels vs an fp32 reference: a few fp16 ulps of the logit scale
    assert diff <= 1e-2 * max(scale, 1.0), (diff, scale)
    # and the tolerance is far below the 4-bit quantization error itself, so a wrong bit layout, zero
    # offset or g_idx handling (which moves the logits at least that much) cannot pass
    qerr = (ref - unquant).abs().max().item()
    print(f"    4-bit quantization error in logits (reference vs unquantized) = {qerr:.3e}")
    assert diff * 5 < qerr, (diff, qerr)
    return diff


@pytest.mark.parametrize("group_size", [32, 64])
def test_gptq_v1_sym_loads_in_gptqmodel(tmp_path, group_size):
    _check(tmp_path, group_size=group_size, sym=True, desc_act=False, checkpoint_format="gptq")


def test_gptq_v1_sym_desc_act_loads_in_gptqmodel(tmp_path):
    _check(tmp_path, group_size=32, sym=True, desc_act=True, checkpoint_format="gptq")


def test_gptq_v2_asym_loads_in_gptqmodel(tmp_path):
    _check(tmp_path, group_size=32, sym=False, desc_act=False, checkpoint_format="gptq_v2")
