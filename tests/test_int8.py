"""`--method int8`: bitsandbytes LLM.int8 checkpoints. Hand-computed codes, the exact tensor layout and
config transformers writes for `load_in_8bit`, our own dequantizing reader, the --bits policy, and the
real client (transformers + bitsandbytes on CPU) reading the same numbers we wrote."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergequant.errors import MergeQuantError
from mergequant.evaluate import load_dequantized
from mergequant.io.checkpoint import Checkpoint
from mergequant.quant.int8 import llm_int8_dequantize, llm_int8_quantize
from mergequant.quant.quantize import QuantizeOptions, run_quantize

from helpers import run_cli

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def model(tiny_models) -> Path:
    return tiny_models["base"]  # float32, 2 layers, hidden 64 (read-only: shared by the session)


@pytest.fixture(scope="module")
def int8_out(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("i8o") / "q"
    # group_size=-1: the driver's generic check would reject the default 128 on hidden 64 (see docs/int8.md)
    run_quantize(model, QuantizeOptions(out=out, method="int8", group_size=-1, quiet=True, fsync=False), log=lambda m: None)
    return out


def _load(d: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def test_llm_int8_codes_by_hand():
    W = torch.tensor([[1.0, -2.0, 0.5, 4.0],        # SCB 4: x * 31.75 -> 31.75, -63.5, 15.875, 127
                      [127.0, -63.5, 0.5, 1.5],     # SCB 127: factor 1, ties to even: -64, 0, 2
                      [0.0, 0.0, 0.0, 0.0]])        # all zero: SCB 0, codes 0 (no 0/0)
    codes, scb = llm_int8_quantize(W)
    assert codes.dtype == torch.int8 and scb.dtype == torch.float32
    assert codes.tolist() == [[32, -64, 16, 127], [127, -64, 0, 2], [0, 0, 0, 0]]
    assert scb.tolist() == [4.0, 127.0, 0.0]
    deq = llm_int8_dequantize(codes, scb)
    torch.testing.assert_close(deq[0], torch.tensor([32, -64, 16, 127]) * 4.0 / 127, rtol=1e-6, atol=0)
    assert deq[2].abs().max() == 0


def test_checkpoint_layout_and_config(model, int8_out):
    sd, src = _load(int8_out), Checkpoint.open(model)
    for layer in range(2):
        for s in LINEARS:
            p = f"model.layers.{layer}.{s}"
            W = src.get(f"{p}.weight").float()
            codes, scb = llm_int8_quantize(W)
            assert sd[f"{p}.weight"].dtype == torch.int8 and sd[f"{p}.weight"].shape == W.shape
            assert torch.equal(sd[f"{p}.weight"], codes)
            assert sd[f"{p}.SCB"].dtype == torch.float32 and torch.equal(sd[f"{p}.SCB"], scb)
            fmt = sd[f"{p}.weight_format"]
            assert fmt.dtype == torch.uint8 and fmt.shape == () and fmt.item() == 0
    # everything else float16, and nothing else per Linear
    others = {k: v for k, v in sd.items() if not k.endswith((".SCB", ".weight_format")) and v.dtype != torch.int8}
    assert others and all(v.dtype == torch.float16 for v in others.values())
    assert len(sd) == len(src.tensors) + 2 * 2 * len(LINEARS)

    cfg = json.loads((int8_out / "config.json").read_text())
    from transformers import BitsAndBytesConfig

    assert cfg["quantization_config"] == BitsAndBytesConfig(load_in_8bit=True).to_dict()
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float16"
    card = (int8_out / "README.md").read_text()
    assert "8-bit" in card and "4-bit" not in card and "bitsandbytes" in card


def test_eval_reader_dequantizes(model, int8_out):
    m = load_dequantized(Checkpoint.open(int8_out))
    sd, W = _load(int8_out), Checkpoint.open(model).get("model.layers.1.mlp.down_proj.weight").float()
    got = m.model.layers[1].mlp.down_proj.weight.detach()
    torch.testing.assert_close(got, llm_int8_dequantize(sd["model.layers.1.mlp.down_proj.weight"],
                                                        sd["model.layers.1.mlp.down_proj.SCB"]), rtol=0, atol=0)
    # per-row int8: error at most half a step (SCB/254) per element
    assert ((got - W).abs() <= W.abs().amax(1, keepdim=True) / 254 + 1e-7).all()


def test_bits_policy(model, tmp_path):
    with pytest.raises(MergeQuantError, match="8-bit only"):
        run_quantize(model, QuantizeOptions(out=tmp_path / "x", method="int8", bits=3, group_size=-1, quiet=True))
    assert not (tmp_path / "x").exists()
    # no --bits and the default --group-size 128 (which does not divide this model's 64 columns): the
    # method's own width is used and the group size, which int8 does not use, is not validated
    opts = QuantizeOptions(out=tmp_path / "y", method="int8", quiet=True, fsync=False)
    run_quantize(model, opts, log=lambda m: None)
    assert opts.bits == 8 and (tmp_path / "y" / "config.json").exists()


@pytest.mark.slow
def test_cli_bad_bits_is_one_line(model, tmp_path):
    proc = run_cli("quantize", model, "-o", tmp_path / "out", "--method", "int8", "--bits", "2", "--group-size", "-1")
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "8-bit only" in err[0], proc.stderr
    assert not (tmp_path / "out").exists()


# ---- the real client --------------------------------------------------------------------------------------

def _bnb_linear_reference(W_deq: torch.Tensor, x: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """What bitsandbytes' Linear8bitLt computes (inference, CPU): activations in float16, columns with an
    |x| >= threshold element computed in floating point with the dequantized weight, the rest quantized per
    row to int8 (absmax over the non-outlier elements) and multiplied with the int8 codes."""
    scb = W_deq.abs().amax(1)
    cb = torch.round(W_deq * (127.0 / scb[:, None]))
    A = x.reshape(-1, x.shape[-1]).to(torch.float16).float()
    outlier = A.abs() >= threshold
    cols = outlier.any(0)
    A0 = A.masked_fill(outlier, 0)
    rs = A0.abs().amax(1).clamp_min(1e-30)
    ca = torch.round(A0 * (127.0 / rs[:, None]))
    ca[:, cols] = 0
    y = (ca @ cb.T) * rs[:, None] * scb[None, :] / (127 * 127)
    if cols.any():
        y = y + A[:, cols] @ (cb[:, cols] * scb[:, None] / 127).T
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.client
@pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes not installed (scripts/install-int8-clients.sh)")
def test_transformers_bitsandbytes_loads_it(int8_out):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(int8_out).eval()  # no device_map: bitsandbytes runs on CPU
    ours = load_dequantized(Checkpoint.open(int8_out)).eval()
    sd = _load(int8_out)
    q = hf.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear8bitLt"
    # 1. the client holds exactly our int8 codes and row scales
    for layer in range(2):
        for s in LINEARS:
            m = hf.get_submodule(f"model.layers.{layer}.{s}")
            scb = m.weight.SCB if getattr(m.weight, "SCB", None) is not None else m.state.SCB
            assert torch.equal(m.weight.data, sd[f"model.layers.{layer}.{s}.weight"])
            assert torch.equal(scb.float(), sd[f"model.layers.{layer}.{s}.SCB"])
    ids = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    # 2. each Linear8bitLt computes LLM.int8 of our dequantized weight (to float16 rounding), on its real inputs,
    # including an input with outlier columns (|x| >= 6 goes through the float path)
    rec = {}
    hooks = [hf.get_submodule(f"model.layers.{i}.{s}").register_forward_hook(
        lambda m, a, o, k=(i, s): rec.__setitem__(k, (a[0].detach(), o.detach()))) for i in range(2) for s in LINEARS]
    with torch.no_grad():
        b = hf(ids).logits.float()
        a = ours(ids).logits
    for h in hooks:
        h.remove()
    for (i, s), (x, y) in rec.items():
        ref = _bnb_linear_reference(ours.get_submodule(f"model.layers.{i}.{s}").weight.detach(), x.float())
        assert (y.float() - ref).abs().max() <= 4e-3 * max(1.0, ref.abs().max().item()), (i, s)
    x_out = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    x_out[:, 5] = 9.0  # an outlier column
    with torch.no_grad():
        y = q(x_out).float()
    ref = _bnb_linear_reference(ours.model.layers[0].self_attn.q_proj.weight.detach(), x_out.float())
    assert (y - ref).abs().max() <= 4e-3 * max(1.0, ref.abs().max().item())
    # 3. end to end: the client's logits differ from our float forward of the dequantized weights only by what
    # LLM.int8 does to activations (per-token int8 + float16 compute). Tolerance: 2x the effect of that
    # activation quantization measured on our own model (emulated in float32), plus 0.02; and top-1 agrees.
    hooks = [ours.get_submodule(f"model.layers.{i}.{s}").register_forward_hook(
        lambda m, a_, o: _bnb_linear_reference(m.weight, a_[0])) for i in range(2) for s in LINEARS]
    with torch.no_grad():
        sim = ours(ids).logits
    for h in hooks:
        h.remove()
    act_effect = (sim - a).abs().max().item()
    assert (b - a).abs().max().item() <= 2 * act_effect + 0.02
    assert (b - a).abs().max().item() <= 0.1 * a.abs().max().item()
    assert (b.argmax(-1) == a.argmax(-1)).float().mean() >= 0.9
