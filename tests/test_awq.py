"""`mergequant quantize --method awq`: folding keeps the float function, the scale search beats plain
round-to-nearest where AWQ should, the checkpoint holds exactly the solver's weights, it is closer
to full precision than RTN, it loads in a real client (transformers + gptqmodel), and bad input fails
cleanly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

from mergequant.demo import build_tiny_llama, write_checkpoint
from mergequant.errors import MergeQuantError
from mergequant.evaluate import load_dequantized
from mergequant.io.checkpoint import Checkpoint
from mergequant.quant import awq, formats
from mergequant.quant.awq_method import (
    AWQMethod,
    _Block,
    apply_scale,
    capture,
    scaling_groups,
)
from mergequant.quant.quantize import QuantizeOptions, run_quantize
from mergequant.quant.runner import LayerInputs, LayerRunner, linear_modules, run_layer

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM

TEXT = "\n\n".join(f"Chapter {i}. It is a truth universally acknowledged, that a single man in possession of a good "
                   f"fortune must be in want of a wife; and {i} more words follow here, to be or not to be." for i in range(60))
HELD_OUT = " ".join(f"Scene {i}: whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune."
                    for i in range(20))


def _quantize(model, out, **kw):
    return run_quantize(model, QuantizeOptions(out=out, quiet=True, fsync=False, **kw), log=lambda m: None)


def _load(d: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("c") / "calib.txt"
    f.write_text(TEXT)
    return f


def _with_outlier(src: Path, dst: Path, channel: int = 5, factor: float = 12.0) -> Path:
    """A copy of ``src`` whose norms amplify one hidden channel: the activation outlier AWQ is for."""
    ck = Checkpoint.open(src)
    tensors = {}
    for name in ck.tensors:
        t = ck.get(name).clone()
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            t[channel] *= factor
        tensors[name] = t
    return write_checkpoint(dst, dict(ck.config), tensors)


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("awq")
    base = build_tiny_llama(root / "base", dtype=torch.float32, hidden=64, intermediate=160, layers=2, seed=5)
    return _with_outlier(base, root / "outlier")


# ------------------------------------------------------------------------------------------------------
# (a) folding is exact in float
# ------------------------------------------------------------------------------------------------------
FOLD_ARCHS = {
    "llama": {"num_key_value_heads": 4},  # no GQA: the v_proj -> o_proj group is folded too
    "llama_gqa": {"num_key_value_heads": 2},
    "mistral": {"num_key_value_heads": 4},
    "qwen2": {"num_key_value_heads": 4},  # q/k/v biases
    "qwen3": {"num_key_value_heads": 4},  # q_norm / k_norm
    "gemma": {"num_key_value_heads": 4},  # (1 + w) norms
    "gemma2": {"num_key_value_heads": 4, "sliding_window": 4},  # post-attention norm on the attention output
    "gemma3_text": {"num_key_value_heads": 4, "sliding_window": 4,
                    "layer_types": ["sliding_attention", "full_attention"]},
}


@pytest.mark.parametrize("arch", list(FOLD_ARCHS))
def test_folding_preserves_the_float_layer(tmp_path, arch):
    """Random (not searched) scales folded into every scaling group of a decoder layer leave its outputs
    unchanged (< 1e-4, float32), while the weights themselves did change."""
    mt = arch.removesuffix("_gqa")
    cfg = AutoConfig.for_model(mt, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               head_dim=16, vocab_size=128, max_position_embeddings=64, **FOLD_ARCHS[arch])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # random init leaves norms at 1 and biases at 0: make them matter
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    runner = LayerRunner(tmp_path, ids, batch_size=1)
    inputs = runner.capture()
    for i in range(runner.num_layers):
        layer = runner.load_layer(i)
        before = run_layer(layer, inputs)
        modules = linear_modules(layer)
        groups = scaling_groups(layer, modules)
        assert [gr.name for gr in groups] == (["qkv", "gate_up", "down"] if arch == "llama_gqa"
                                               else ["qkv", "o", "gate_up", "down"])
        w0 = {k: m.weight.detach().clone() for k, m in modules.items()}
        for gr in groups:
            s = torch.exp(0.7 * torch.randn(modules[gr.linears[0]].in_features, generator=g))
            apply_scale(gr, modules, s)
        after = run_layer(layer, inputs)
        diff = max((a - b).abs().max().item() for a, b in zip(after, before))
        assert diff < 1e-4, (arch, i, diff)
        changed = {k for k in modules if (modules[k].weight - w0[k]).abs().max() > 1e-3}
        assert changed == set(modules) - ({"self_attn.o_proj"} if arch == "llama_gqa" else set()), changed
        runner.free_layer(i)
        if i + 1 < runner.num_layers:  # the next layer's inputs: this layer's outputs
            inputs = LayerInputs(after, runner._inputs[i + 1].kwargs)


# ------------------------------------------------------------------------------------------------------
# (b) the search
# ------------------------------------------------------------------------------------------------------
def test_pseudo_quantize_matches_awq_format_both_zero_point_modes():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for zp in (True, False):
        qw = awq.pseudo_quantize(w, 4, 32, zp)
        assert qw.q.min() >= 0 and qw.q.max() <= 15 and qw.scales.shape == (2, 16)
        if not zp:
            assert (qw.zeros == 8).all()  # symmetric AWQ GEMM: signed codes stored with a zero point of 8
        packed = AWQMethod.pack(qw)
        deq = formats.awq_dequantize(packed["qweight"], packed["qzeros"], packed["scales"], 32)
        torch.testing.assert_close(deq, qw.w_hat, rtol=0, atol=0)
        assert (qw.w_hat - w).abs().max() < 0.6 * (w.abs().max() / 7)  # really rounds to the grid


def test_searched_scale_beats_round_to_nearest_with_an_outlier_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, 3] *= 30.0  # one salient input channel
    w = torch.randn(96, 64, generator=g) / 8
    ref = x @ w.T

    def block_loss(cands):
        return float((x @ cands[0].T - ref).pow(2).mean())

    res = awq.search_scale(awq.activation_mean(x), [w], block_loss, group_size=32, n_grid=20)
    assert res.ratio is not None and res.ratio > 0
    assert res.loss < 0.7 * res.loss_rtn, (res.loss, res.loss_rtn)
    assert res.scales[3] == res.scales.max()  # the salient channel gets the largest scale
    # activation-only scaling works too, and a grid of 1 (ratio 0 only) is allowed
    assert awq.search_scale(awq.activation_mean(x), [w], block_loss, group_size=32, duo_scaling=False).loss < res.loss_rtn
    assert len(awq.search_scale(awq.activation_mean(x), [w], block_loss, group_size=32, n_grid=1).losses) == 1


def test_searched_scale_beats_rtn_on_real_blocks(outlier_model, calib):
    """On a decoder layer of the outlier model, each scaling group's searched scale is never worse than
    s = 1 (by construction) and is strictly better for the groups reading the amplified channel."""
    from transformers import AutoTokenizer

    from mergequant.quant.calib import calibration_batch

    tok = AutoTokenizer.from_pretrained(outlier_model)
    ids = calibration_batch(str(calib), tok, samples=4, seqlen=64, seed=0)
    runner = LayerRunner(outlier_model, ids, batch_size=2)
    inputs = runner.capture()
    layer = runner.load_layer(0)
    modules = linear_modules(layer)
    cap = capture(layer, inputs, modules)
    found = {}
    for gr in scaling_groups(layer, modules):
        block = _Block(gr, layer, modules, cap)
        res = awq.search_scale(cap.mean(gr.point), [modules[s].weight.data for s in gr.linears], block.loss,
                               group_size=32)
        found[gr.name] = res
        assert res.loss <= res.loss_rtn
    for name in ("qkv", "gate_up"):
        assert found[name].loss < 0.9 * found[name].loss_rtn, (name, found[name].loss, found[name].loss_rtn)
    runner.free_layer(0)


def test_clip_search_lowers_the_output_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    w[:, 7] *= 6  # one outlier weight per row stretches its group's range
    x = torch.randn(1000, 64, generator=g)
    gram = x.T @ x
    max_val = awq.search_clip(w, awq.gram_blocks(gram, 32), group_size=32, row_block=8)
    assert max_val.shape == (32, 2)
    clipped = awq.apply_clip(w, max_val, 32)

    def err(wq):
        return float((x @ (wq - w).T).pow(2).mean())

    assert err(awq.fake_quantize(clipped, 4, 32)) < err(awq.fake_quantize(w, 4, 32))  # 1.116 vs 1.155
    assert (max_val < w.reshape(32, 2, 32).abs().amax(dim=2)).any()  # some group was actually clipped
    # the Gram form of the output error is the error itself
    d = awq.fake_quantize(w, 4, 32) - w
    assert awq.linear_output_mse(d, gram, 1000) == pytest.approx(err(d + w), rel=1e-4)
    torch.testing.assert_close(awq.gram_blocks(gram, 32)[1], gram[32:, 32:])


# ------------------------------------------------------------------------------------------------------
# (c) end to end
# ------------------------------------------------------------------------------------------------------
def test_checkpoint_holds_the_solver_weights_and_beats_rtn(outlier_model, calib, tmp_path, monkeypatch):
    chosen: dict[str, torch.Tensor] = {}
    norms: dict[str, torch.Tensor] = {}
    orig = AWQMethod.process_layer

    def spy(self, ctx, i, layer, inputs, todo, modules):
        orig(self, ctx, i, layer, inputs, todo, modules)
        for suffix, lin in todo.items():
            chosen[lin.prefix] = modules[suffix].weight.detach().clone()
        for n, p in layer.named_parameters():
            if "norm" in n:
                norms[f"model.layers.{i}.{n}"] = p.detach().clone()

    monkeypatch.setattr(AWQMethod, "process_layer", spy)
    out = tmp_path / "awq"
    res = _quantize(outlier_model, out, method="awq", group_size=32, calib=str(calib), samples=8, seqlen=64)
    monkeypatch.undo()
    assert res.modules == 14 and len(chosen) == 14
    sd = _load(out)
    for prefix, w in chosen.items():
        got = formats.awq_dequantize(sd[f"{prefix}.qweight"], sd[f"{prefix}.qzeros"], sd[f"{prefix}.scales"], 32)
        torch.testing.assert_close(got, w, rtol=0, atol=0)
        assert f"{prefix}.weight" not in sd
    src = Checkpoint.open(outlier_model)
    for name, w in norms.items():  # the folded norms were written, not the source ones
        torch.testing.assert_close(sd[name].float(), w.half().float(), rtol=0, atol=0)
    assert any((sd[n].float() - src.get(n).half().float()).abs().max() > 1e-2 for n in norms)
    assert sd["model.layers.0.self_attn.q_proj.qweight"].shape == (64, 8)
    assert sd["model.layers.0.mlp.down_proj.qzeros"].shape == (5, 8)
    assert sd["model.layers.0.mlp.down_proj.scales"].dtype == torch.float16
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                          "version": "gemm", "modules_to_not_convert": None}
    card = (out / "README.md").read_text()
    assert "awq" in card and "gptqmodel" in card

    # closer to full precision than round-to-nearest (asymmetric, same group size) on held-out text
    from transformers import AutoTokenizer

    _quantize(outlier_model, tmp_path / "rtn", method="rtn", group_size=32, sym=False)
    tok = AutoTokenizer.from_pretrained(outlier_model)
    ids = torch.tensor([tok(HELD_OUT, add_special_tokens=False)["input_ids"][:160]])
    fp = AutoModelForCausalLM.from_pretrained(outlier_model, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = fp(ids).logits
        err = {k: float((load_dequantized(Checkpoint.open(tmp_path / k)).eval()(ids).logits - ref).pow(2).mean())
               for k in ("awq", "rtn")}
    print("logit MSE vs full precision:", err)
    assert err["awq"] < 0.8 * err["rtn"], err


@pytest.mark.parametrize("kw", [{"zero_point": False}, {"group_size": -1, "duo_scaling": False, "n_grid": 5}])
def test_other_modes_write_readable_checkpoints(outlier_model, calib, tmp_path, kw):
    opts = {"method": "awq", "group_size": 32, "calib": str(calib), "samples": 4, "seqlen": 64} | kw
    out = tmp_path / "q"
    _quantize(outlier_model, out, **opts)
    sd = _load(out)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["zero_point"] is opts.get("zero_point", True) and cfg["group_size"] == opts["group_size"]
    if kw.get("zero_point") is False:
        assert (sd["model.layers.1.mlp.up_proj.qzeros"] == 0x88888888 - (1 << 32)).all()  # zero point 8 everywhere
    else:
        assert sd["model.layers.1.mlp.down_proj.scales"].shape == (1, 64)
    model = load_dequantized(Checkpoint.open(out))
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


# ------------------------------------------------------------------------------------------------------
# (d) a real client
# ------------------------------------------------------------------------------------------------------
@pytest.mark.client
@pytest.mark.parametrize("kw", [{"group_size": 32}, {"group_size": -1, "zero_point": False}])
def test_awq_checkpoint_loads_in_transformers_with_gptqmodel(calib, tmp_path, kw):
    """transformers + gptqmodel 7.7.0 on CPU (AWQ kernels) compute the same logits as our dequantizing
    loader, up to float16 arithmetic, and that agreement is far tighter than the quantization error."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    pytest.importorskip("gptqmodel")
    # hidden 128 / intermediate 256: sizes the gptqmodel CPU kernels accept
    src = build_tiny_llama(tmp_path / "m", dtype=torch.float32, hidden=128, intermediate=256, layers=2, seed=3)
    out = tmp_path / "awq"
    _quantize(src, out, method="awq", calib=str(calib), samples=4, seqlen=64, **kw)
    ids = torch.randint(0, 2048, (1, 24), generator=torch.Generator().manual_seed(0))
    client = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu").eval()
    qlayers = [m for m in client.modules() if hasattr(m, "qweight")]
    assert len(qlayers) == 14 and "Awq" in type(qlayers[0]).__name__, type(qlayers[0]).__name__
    ours = load_dequantized(Checkpoint.open(out)).eval()
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        got, ref, full = client(ids).logits.float(), ours(ids).logits.float(), fp(ids).logits.float()
    diff, qerr = (got - ref).abs().max().item(), (ref - full).abs().max().item()
    print(f"{kw}: kernel {type(qlayers[0]).__name__}, max|client - ours| {diff:.2e}, max|ours - fp| {qerr:.2e}")
    assert diff <= 1e-2 * max(ref.abs().max().item(), 1.0)
    assert diff * 5 < qerr


# ------------------------------------------------------------------------------------------------------
# (e) bad input
# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bits_3_is_refused_by_the_cli(outlier_model, calib, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("quantize", outlier_model, "-o", out, "--method", "awq", "--bits", "3", "--group-size", "32",
                   "--calib", calib)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --bits 3: --method awq is 4-bit only"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("kw, needle", [
    ({"group_size": 48}, "--group-size 48 does not divide in_features 64"),
    ({"group_size": 32, "n_grid": 0}, "--n-grid must be >= 1"),
    ({"group_size": 32, "calib": None}, "--calib is required for --method awq"),
])
def test_bad_options(outlier_model, calib, tmp_path, kw, needle):
    out = tmp_path / "out"
    opts = {"method": "awq", "calib": str(calib), "samples": 4, "seqlen": 64} | kw
    with pytest.raises(MergeQuantError, match=needle.replace("-", r"\-")) as e:
        _quantize(outlier_model, out, **opts)
    assert "\n" not in str(e.value) and not out.exists()


def test_unsupported_architecture(outlier_model, calib, tmp_path):
    """OLMo 2 has Llama's Linear names but normalises after attention/MLP: no input norm to fold into.
    It has no architecture description, so it is refused (for every method) before any work."""
    cfg = AutoConfig.for_model("olmo2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=2048,
                               max_position_embeddings=128)
    torch.manual_seed(0)
    d = tmp_path / "olmo2"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    for f in outlier_model.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, d / f.name)
    out = tmp_path / "out"
    with pytest.raises(MergeQuantError, match=r"Olmo2ForCausalLM is not supported \(model_type 'olmo2'") as e:
        _quantize(d, out, method="awq", group_size=32, calib=str(calib), samples=4, seqlen=64)
    assert "\n" not in str(e.value) and not out.exists() and not list(tmp_path.glob(".out.partial-*"))
