"""Architecture descriptions (``mergequant.architectures``) against real transformers models.

For every family a tiny random model is built here with transformers: (a) every name of its
description exists, in memory and in the saved checkpoint, and every Linear of a decoder layer is
either quantized or declared never-quantized; (b) folding AWQ and SmoothQuant scales through the
description's scaling map leaves the model's float64 logits unchanged; (c) `quantize --method rtn`
and `--method gptq` run end to end and the dequantized model stays close to the original; (d)
families without a description are refused with one line; MoE families go through every method."""

from __future__ import annotations

import json
import re
import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from torch import nn

from mergequant.architectures import ARCHITECTURES, DENSE, architecture_for, resolve
from mergequant.errors import MergeQuantError
from mergequant.evaluate import load_dequantized
from mergequant.io.checkpoint import Checkpoint
from mergequant.quant.awq_method import apply_scale, scaling_groups
from mergequant.quant.gptq_method import RTNMethod
from mergequant.quant.norms import norm_offset
from mergequant.quant.quantize import QuantizeOptions, run_quantize
from mergequant.quant.runner import LayerInputs, linear_modules
from mergequant.quant.w8a8_method import (
    described_smoothing_groups,
    find_smoothing_groups,
    smooth_layer,
)

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM

V = 2048  # the bundled tokenizer's vocabulary (gptq needs a tokenizer for its calibration text)
MOE = [mt for mt in ARCHITECTURES if mt not in DENSE]
EXTRA = {  # per family: what makes its tiny config valid and exercises its particular layout
    "gemma2": {"sliding_window": 4, "final_logit_softcapping": 5.0},
    "gemma3_text": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 1},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "mlp_only_layers": [1]},  # a dense layer inside a MoE family
}
TEXT = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog, and so on." for i in range(200))


def _config(model_type: str, kv_heads: int = 2):
    return AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, vocab_size=V,
                                max_position_embeddings=64, **EXTRA.get(model_type, {}))


def _model(model_type: str, seed: int = 0, kv_heads: int = 2, dtype=torch.float32) -> nn.Module:
    """A random tiny model whose norms and biases are perturbed away from 1 and 0 (so a mis-fold shows)."""
    torch.manual_seed(seed)
    # float64 experts need the eager loop (transformers' default grouped_mm takes 16/32-bit floats only)
    kw = {"experts_implementation": "eager"} if model_type in MOE and dtype == torch.float64 else {}
    model = AutoModelForCausalLM.from_config(_config(model_type, kv_heads), **kw).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(dtype))
    return model


def _save(model: nn.Module, d: Path) -> Path:
    model.save_pretrained(d)
    data = resources.files("mergequant") / "data"
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        with resources.as_file(data / fname) as src:
            shutil.copyfile(src, d / fname)
    return d


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[nn.Module, Path]]:
    """model_type -> (float32 model, its checkpoint directory), for every described family."""
    out = {}
    for i, mt in enumerate(ARCHITECTURES):
        model = _model(mt, seed=10 * i)
        out[mt] = (model, _save(model, tmp_path_factory.mktemp(mt)))
    return out


def test_every_family_is_tested():
    assert set(ARCHITECTURES) == {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                                  "mixtral", "qwen2_moe", "qwen3_moe"}
    assert set(MOE) == {"mixtral", "qwen2_moe", "qwen3_moe"}


# ---- (a) names ----------------------------------------------------------------------------------------------

def _disk_keys(d: Path) -> set[str]:
    return set(Checkpoint.open(d).tensors)


@pytest.mark.parametrize("mt", list(ARCHITECTURES))
def test_names_match_the_model_and_the_checkpoint(saved, mt):
    arch = architecture_for({"model_type": mt})
    model, d = saved[mt]
    layers = resolve(model, arch.layers)
    assert isinstance(layers, nn.ModuleList) and len(layers) == 2
    layer = layers[0]
    assert type(layer).__name__ == arch.layer_class
    mods = dict(layer.named_modules())
    linears = {n for n, m in mods.items() if isinstance(m, nn.Linear)}
    # every Linear of the layer is quantized or declared float; every declared name exists
    assert linears == set(arch.quantized) | (linears & set(arch.never_quantized)), linears ^ set(arch.quantized)
    assert len(arch.quantized) == len(set(arch.quantized))
    assert all(n in mods for n in arch.never_quantized)
    for g in arch.scaling:
        assert set(g.linears) <= set(arch.quantized) and (g.block is None or g.block in mods)
        prev = mods[g.prev]
        if g.prev_kind == "norm":
            assert not isinstance(prev, nn.Linear) and prev.weight.dim() == 1
            assert norm_offset(prev) == arch.norm_offset, (g.prev, arch.norm_offset)
        else:
            assert g.prev_kind == "linear" and isinstance(prev, nn.Linear) and g.prev in arch.quantized
    assert set(arch.no_clip) <= set(arch.quantized)
    for e in range(2):  # the dense part's names hold for every layer on disk too
        assert all(f"{arch.layer_prefix(e)}{s}.weight" in _disk_keys(d) for s in arch.quantized)

    keys = _disk_keys(d)
    outside = {k for k in keys if not arch.split_name(k)}
    head = set() if arch.ties_embeddings(model.config.to_dict()) else {f"{arch.lm_head}.weight"}
    assert outside == {f"{arch.embed}.weight", f"{arch.final_norm}.weight"} | head
    assert arch.head_weight_on_disk(model.config.to_dict(), keys) in keys
    assert resolve(model, arch.final_norm) is not None and resolve(model, arch.embed) is not None

    rel = {arch.split_name(k)[1] for k in keys if arch.split_name(k) and arch.split_name(k)[0] == 0}
    matrices = {k.removesuffix(".weight") for k in rel if k.endswith(".weight") and len(
        Checkpoint.open(d).tensors[arch.layer_prefix(0) + k].shape) == 2}
    described = set(arch.quantized)
    if arch.is_moe:
        ex = arch.experts
        n = getattr(model.config, ex.num_experts_key)
        per_expert = {ex.expert_weight(e, w).removesuffix(".weight") for e in range(n) for w in range(3)}
        described |= per_expert | {ex.to_disk(r) for r in arch.never_quantized}
        assert per_expert <= matrices
        gate_up, down = resolve(layer, ex.fused_gate_up), resolve(layer, ex.fused_down)
        inter = gate_up.shape[1] // 2
        assert tuple(gate_up.shape) == (n, 2 * inter, 64) and tuple(down.shape) == (n, 64, inter)
        assert resolve(layer, ex.router) is not None
    assert matrices == described, matrices ^ described


@pytest.mark.parametrize("mt", DENSE)
def test_gqa_skips_v_to_o(saved, mt):
    """With 2 key/value heads for 4 query heads v's output is narrower than o's input: no v -> o group."""
    model, _ = saved[mt]
    layer = model.model.layers[0]
    assert [g.name for g in scaling_groups(layer, linear_modules(layer))] == ["qkv", "gate_up", "down"]


# ---- (b) folding keeps the float function -----------------------------------------------------------------

def _layer0_inputs(model, ids) -> LayerInputs:
    got = {}

    def pre(m, args, kw):
        got["h"] = kw.get("hidden_states", args[0] if args else None)
        got["kw"] = {k: v for k, v in kw.items() if k != "hidden_states"}

    h = model.model.layers[0].register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        model(ids, use_cache=False)
    h.remove()
    return LayerInputs([got["h"]], [got["kw"]])


@pytest.mark.parametrize("mt", DENSE)
def test_folding_preserves_the_float_model(mt):
    """Random AWQ scales folded through every scaling group of every layer (v -> o included: no GQA),
    and SmoothQuant's folds through the described norm groups, leave float64 logits unchanged; the
    described SmoothQuant groups are exactly the ones found structurally."""
    arch = ARCHITECTURES[mt]
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    model = _model(mt, seed=5, kv_heads=4, dtype=torch.float64)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    g = torch.Generator().manual_seed(4)
    for layer in model.model.layers:
        modules = linear_modules(layer)
        groups = scaling_groups(layer, modules, arch)
        assert [gr.name for gr in groups] == ["qkv", "o", "gate_up", "down"]
        w0 = {k: m.weight.detach().clone() for k, m in modules.items()}
        for gr in groups:
            s = torch.exp(0.5 * torch.randn(modules[gr.linears[0]].in_features, generator=g, dtype=torch.float64))
            apply_scale(gr, modules, s)
        assert all((modules[k].weight - w0[k]).abs().max() > 1e-3 for k in modules)
    with torch.no_grad():
        awq_logits = model(ids, use_cache=False).logits
    # float64 throughout, except Gemma's norms, which compute in float32 whatever the weights' dtype
    tol = 1e-5 * ref.abs().max().item() if arch.norm_offset else 1e-9
    torch.testing.assert_close(awq_logits, ref, rtol=tol, atol=tol)

    model = _model(mt, seed=5, kv_heads=4, dtype=torch.float64)
    inputs = _layer0_inputs(model, ids)
    structural, _ = find_smoothing_groups(model.model.layers[0], inputs)
    assert {n: set(lins) for n, lins, _ in structural} == {n: set(lins) for n, lins in described_smoothing_groups(arch)}
    for layer in model.model.layers:
        before = layer.input_layernorm.weight.detach().clone()
        smooth_layer(layer, inputs, 0.5, check=False, groups=described_smoothing_groups(arch), offset=arch.norm_offset)
        assert (layer.input_layernorm.weight - before).abs().max() > 1e-3
    with torch.no_grad():
        sq_logits = model(ids, use_cache=False).logits
    # (int8.fold_into_norm / fold_into_linear compute in float32 whatever the weights' dtype)
    torch.testing.assert_close(sq_logits, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def _unfused(mt: str, dtype=torch.float64) -> nn.Module:
    """A tiny random MoE model whose experts are un-fused as the quantizer does it (same weights)."""
    from mergequant.quant.moe import MoECalibration, unfuse_experts

    model = _model(mt, seed=5, kv_heads=4, dtype=dtype)
    fused = [getattr(layer.mlp, "experts", None) for layer in model.model.layers]
    unfuse_experts(model, ARCHITECTURES[mt], model.config.to_dict(), MoECalibration())
    with torch.no_grad():
        for layer, f in zip(model.model.layers, fused):
            if not hasattr(layer.mlp, "experts"):
                continue
            layer.mlp.experts.to(dtype)
            inter = f.gate_up_proj.shape[1] // 2
            for e, ex in enumerate(layer.mlp.experts):
                ex.gate_proj.weight.copy_(f.gate_up_proj[e, :inter])
                ex.up_proj.weight.copy_(f.gate_up_proj[e, inter:])
                ex.down_proj.weight.copy_(f.down_proj[e])
    return model


@pytest.mark.parametrize("mt", MOE)
def test_moe_folding_preserves_the_float_model(mt):
    """MoE layers: the un-fused experts compute what transformers' fused ones do; random AWQ scales
    through every group of ``layer_scaling`` (the router and shared_expert_gate scaled as passengers of
    the experts' gate/up group) and SmoothQuant's described norm groups leave float64 logits
    unchanged; leaving the router out of the fold changes them (the passengers matter)."""
    arch = ARCHITECTURES[mt]
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = _model(mt, seed=5, kv_heads=4, dtype=torch.float64)(ids, use_cache=False).logits
        torch.testing.assert_close(_unfused(mt)(ids, use_cache=False).logits, ref, rtol=1e-9, atol=1e-9)

    def awq_folded(with_passengers: bool) -> torch.Tensor:
        model = _unfused(mt)
        g = torch.Generator().manual_seed(4)
        for i, layer in enumerate(model.model.layers):
            modules = linear_modules(layer)
            scal = arch.layer_scaling(model.config.to_dict(), i)
            groups = scaling_groups(layer, modules, arch, arch.layer_groups(model.config.to_dict(), i), scal)
            assert [gr.name for gr in groups] == [gr.name for gr in scal]
            for gr in groups:
                if not with_passengers:
                    gr.passengers = []
                s = torch.exp(0.5 * torch.randn(modules[gr.linears[0]].in_features, generator=g, dtype=torch.float64))
                apply_scale(gr, modules, s)
        with torch.no_grad():
            return model(ids, use_cache=False).logits

    torch.testing.assert_close(awq_folded(True), ref, rtol=1e-9, atol=1e-9)
    assert (awq_folded(False) - ref).abs().max() > 1e-3

    model = _unfused(mt)
    inputs = _layer0_inputs(model, ids)
    for i, layer in enumerate(model.model.layers):
        groups = described_smoothing_groups(arch, arch.layer_scaling(model.config.to_dict(), i))
        assert any(arch.experts.router in lins for _, lins in groups) or not hasattr(layer.mlp, "experts")
        smooth_layer(layer, inputs, 0.5, check=False, groups=groups, offset=arch.norm_offset)
    with torch.no_grad():
        sq_logits = model(ids, use_cache=False).logits
    torch.testing.assert_close(sq_logits, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# ---- (c) end to end ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text(TEXT)
    return f


def _quantize(d: Path, out: Path, method: str, calib: Path, **kw):
    if method in ("gptq", "awq", "w8a8"):
        kw |= {"calib": str(calib), "samples": 4, "seqlen": 32}
    return run_quantize(d, QuantizeOptions(out=out, method=method, group_size=32, quiet=True, fsync=False, **kw),
                        log=lambda m: None)


def _logits_error(model: nn.Module, quantized: Path) -> float:
    """Relative error (Frobenius) of the dequantized checkpoint's logits against the float model's."""
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        got = load_dequantized(Checkpoint.open(quantized))(ids, use_cache=False).logits
    return ((got - ref).norm() / ref.norm()).item()


def _quantized_names(arch, d: Path) -> set[str]:
    """Input weights the description says get quantized (MoE: every expert's, by its name on disk)."""
    src = Checkpoint.open(d)
    out = set()
    for name in src.tensors:
        loc = arch.split_name(name)
        if loc and name.endswith(".weight"):
            mem = arch.to_memory(loc[1].removesuffix(".weight"))
            if any(mem in g for g in arch.layer_groups(src.config, loc[0])):
                out.add(name)
    return out


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("mt", list(ARCHITECTURES))
def test_quantize_end_to_end(saved, calib, tmp_path, mt, method):
    """Every described Linear is quantized (none left in float; a MoE layer's every expert included,
    under its name on disk) and dequantizes close to its float weight; every other tensor (routers
    included) is written as it was; the dequantized model's logits stay close to the float model's.
    8-bit, so the bounds are tight enough to show any tensor that went astray."""
    arch = ARCHITECTURES[mt]
    model, d = saved[mt]
    res = _quantize(d, tmp_path / "q", method, calib, bits=8)
    quantized = _quantized_names(arch, d)
    expected = {"mixtral": 2 * (4 + 3 * 4), "qwen2_moe": 2 * (4 + 3 + 3 * 4), "qwen3_moe": 4 + 3 * 4 + 4 + 3}
    assert res.modules == len(quantized) == expected.get(mt, 2 * len(arch.quantized))
    ck, src = Checkpoint.open(tmp_path / "q"), Checkpoint.open(d)
    qcfg = ck.config["quantization_config"]
    for name in src.tensors:
        if name in quantized:
            prefix = name.removesuffix(".weight")
            assert name not in ck.tensors and f"{prefix}.qweight" in ck.tensors
            w = src.get(name).float()
            deq = RTNMethod.dequantize(ck.get, prefix, qcfg)
            assert ((deq - w).norm() / w.norm()).item() < 0.02, name
        else:  # float16 copies of everything else (norms, biases, embeddings, routers)
            torch.testing.assert_close(ck.get(name).float(), src.get(name).half().float(), rtol=0, atol=0)
    err = _logits_error(model, tmp_path / "q")
    assert err < 0.05, (mt, method, err)
    if arch.is_moe:  # routers declared unquantized (GPTQModel/vLLM "dynamic" exclusion), nothing else
        (rule,) = qcfg["dynamic"]
        floats = {n.removesuffix(".weight") for n in ck.tensors
                  if arch.split_name(n) and arch.to_memory(arch.split_name(n)[1]).removesuffix(".weight")
                  in arch.never_quantized}
        assert rule.startswith("-:") and floats and all(re.match(rule[2:], f) for f in floats)
        assert not any(re.match(rule[2:], n.removesuffix(".weight")) for n in quantized)
        assert json.loads((tmp_path / "q" / "quantize_config.json").read_text()) == qcfg


@pytest.mark.parametrize("method", ["awq", "w8a8"])
def test_fused_phi3_awq_and_w8a8(saved, calib, tmp_path, method):
    """Phi-3's fused qkv_proj / gate_up_proj go through AWQ's and SmoothQuant's folds as one group each
    (v -> o and up -> down as row chunks of them): AWQ 4-bit is no worse than 4-bit round-to-nearest
    (a fold into the wrong rows would be far worse), W8A8's weights are close."""
    model, d = saved["phi3"]
    _quantize(d, tmp_path / method, method, calib)
    err = _logits_error(model, tmp_path / method)
    if method == "awq":
        _quantize(d, tmp_path / "rtn", "rtn", calib)
        assert err < 1.1 * _logits_error(model, tmp_path / "rtn"), err
    else:
        assert err < 0.05, err


# ---- (d) refusals -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["awq", "w8a8"])
@pytest.mark.parametrize("mt", MOE)
def test_moe_awq_and_w8a8(saved, calib, tmp_path, mt, method):
    """AWQ and W8A8 of every MoE family: every expert quantized, routers (scaled as passengers) kept in
    float; AWQ 4-bit no worse than 4-bit round-to-nearest, W8A8 close to the float model. Routed
    calibration is refused for them in one line (it is GPTQ's)."""
    model, d = saved[mt]
    res = _quantize(d, tmp_path / method, method, calib)
    assert res.modules == len(_quantized_names(ARCHITECTURES[mt], d))
    err = _logits_error(model, tmp_path / method)
    if method == "awq":
        _quantize(d, tmp_path / "rtn", "rtn", calib)
        assert err < 1.1 * _logits_error(model, tmp_path / "rtn"), err
    else:
        assert err < 0.05, err
        ignore = Checkpoint.open(tmp_path / method).config["quantization_config"]["ignore"]
        router = f"model.layers.0.{ARCHITECTURES[mt].to_disk(ARCHITECTURES[mt].experts.router)}"
        assert ignore[0] == "lm_head" and re.match(ignore[1].removeprefix("re:"), router)
    with pytest.raises(MergeQuantError, match=rf"--moe-calibration routed: --method {method} calibrates experts") as e:
        _quantize(d, tmp_path / "routed", method, calib, moe_calibration="routed")
    assert "\n" not in str(e.value) and not (tmp_path / "routed").exists()


def test_unknown_architecture_is_refused_with_one_line(tmp_path):
    cfg = AutoConfig.for_model("olmo2", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=V, max_position_embeddings=64)
    torch.manual_seed(0)
    d = _save(AutoModelForCausalLM.from_config(cfg), tmp_path / "olmo2")
    with pytest.raises(MergeQuantError, match=r"Olmo2ForCausalLM is not supported \(model_type 'olmo2' has no "
                                              r"architecture description; supported: llama, .*phi3.*mixtral") as e:
        _quantize(d, tmp_path / "q", "gptq", Path("unused"))
    assert "\n" not in str(e.value)
    with pytest.raises(MergeQuantError, match="has no model_type"):
        architecture_for({"architectures": ["X"]})


def test_cli_exit_2_one_line(saved, tmp_path):
    """The CLI prints a refusal as one line and exits 2 (routed AWQ of a MoE here)."""
    proc = run_cli("quantize", saved["mixtral"][1], "-o", tmp_path / "q", "--method", "awq", "--calib", "x.txt",
                   "--moe-calibration", "routed")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "routed calibration is for --method gptq" in lines[0], proc.stderr
    assert not (tmp_path / "q").exists()
    assert json.loads((saved["mixtral"][1] / "config.json").read_text())["model_type"] == "mixtral"
