"""`mergequant quantize`: GPTQ/RTN checkpoints whose tensors dequantize to what the solver chose, a model
closer to full precision with GPTQ than with RTN, and clean failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergequant.evaluate import load_dequantized
from mergequant.io.checkpoint import Checkpoint
from mergequant.quant import formats
from mergequant.quant.gptq import quantize_rtn
from mergequant.quant.quantize import QuantizeOptions, run_quantize

from helpers import cli, run_cli

TEXT = "\n\n".join(f"Chapter {i}. It is a truth universally acknowledged, that a single man in possession of a good "
                   f"fortune must be in want of a wife; and {i} more words follow here, to be or not to be." for i in range(60))


@pytest.fixture(scope="module")
def model(tiny_models) -> Path:
    # float32, 2 layers (read-only: shared by the session); group size 32 divides hidden 64 and intermediate 160
    # (and 3-bit needs multiples of 32)
    return tiny_models["base"]


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("c") / "calib.txt"
    f.write_text(TEXT)
    return f


def _load(d: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def _quantize(model, out, **kw):
    return run_quantize(model, QuantizeOptions(out=out, quiet=True, fsync=False, **kw), log=lambda m: None)


def test_rtn_checkpoint_dequantizes_to_the_rtn_weights(model, tmp_path):
    out = tmp_path / "rtn"
    _quantize(model, out, method="rtn", bits=4, group_size=32)
    sd, src = _load(out), Checkpoint.open(model)
    name = "model.layers.1.mlp.down_proj"
    W = src.get(f"{name}.weight").float()
    q, scales, zeros = quantize_rtn(W, 4, 32, True)
    g = torch.arange(W.shape[1]) // 32
    expected = scales[g].T.half().float() * (q - zeros[g].T)  # scales are stored as float16
    got = formats.gptq_dequantize(sd[f"{name}.qweight"], sd[f"{name}.qzeros"], sd[f"{name}.scales"], sd[f"{name}.g_idx"], 4)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert f"{name}.weight" not in sd and sd["model.embed_tokens.weight"].dtype == torch.float16
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((out / "quantize_config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq" and cfg["quantization_config"]["bits"] == 4
    assert cfg["quantization_config"]["checkpoint_format"] == "gptq"
    assert "base_model_relation" not in (out / "README.md").read_text()  # a local source: no Hub parent


def _logit_error(model_dir: Path, quant_dir: Path, ids: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    q = load_dequantized(Checkpoint.open(quant_dir)).eval()
    with torch.no_grad():
        return float((ref(ids).logits - q(ids).logits).pow(2).mean())


def test_gptq_is_closer_to_full_precision_than_rtn(model, calib, tmp_path):
    from transformers import AutoTokenizer

    _quantize(model, tmp_path / "rtn", method="rtn", bits=3, group_size=32)
    res = _quantize(model, tmp_path / "gptq", method="gptq", bits=3, group_size=32, calib=str(calib), samples=16,
                    seqlen=64)
    assert res.modules == 14 and res.fallbacks == [] and res.calib_tokens == 16 * 64
    tok = AutoTokenizer.from_pretrained(model)
    ids = torch.tensor([tok(TEXT[:2000], add_special_tokens=False)["input_ids"][:128]])
    e_rtn, e_gptq = _logit_error(model, tmp_path / "rtn", ids), _logit_error(model, tmp_path / "gptq", ids)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    card = (tmp_path / "gptq" / "README.md").read_text()
    assert "| bits | 3 |" in card and "16 samples, 1,024 tokens" in card


def test_asymmetric_writes_gptq_v2_and_desc_act_g_idx(model, calib, tmp_path):
    out = tmp_path / "v2"
    _quantize(model, out, method="gptq", bits=4, group_size=32, sym=False, desc_act=True, calib=str(calib), samples=8,
              seqlen=64)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["checkpoint_format"] == "gptq_v2" and cfg["sym"] is False and cfg["desc_act"] is True
    g_idx = _load(out)["model.layers.0.mlp.down_proj.g_idx"]
    assert sorted(torch.bincount(g_idx).tolist()) == [32] * 5  # 160 columns, 5 groups of 32, in permuted order
    assert not torch.equal(g_idx, torch.arange(160, dtype=torch.int32) // 32)


@pytest.mark.parametrize("args, needle", [
    (["--method", "rtn", "--group-size", "48"], "--group-size 48 does not divide in_features 64"),
    (["--method", "gptq", "--group-size", "32"], "--calib is required"),
    (["--method", "rtn", "--bits", "5", "--group-size", "32"], "--bits 5"),
])
def test_bad_options(model, tmp_path, args, needle, case_cli):
    out = tmp_path / "out"
    proc = case_cli("quantize", model, "-o", out, *args)  # the first case through the real CLI, the others in-process
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.slow
def test_bad_inputs(model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    proc = run_cli("quantize", model, "-o", out, "--calib", empty, "--group-size", "32")
    assert proc.returncode == 2 and "empty" in proc.stderr and str(empty) in proc.stderr and not out.exists()
    no_cfg = tmp_path / "nocfg"
    no_cfg.mkdir()
    (no_cfg / "model.safetensors").write_bytes((Path(model) / "model-00001-of-00002.safetensors").read_bytes()
                                               if (Path(model) / "model-00001-of-00002.safetensors").exists() else b"")
    proc = cli("quantize", no_cfg, "-o", out, "--method", "rtn")  # in-process (the first refusal above: the real CLI)
    assert proc.returncode == 2 and "config.json" in proc.stderr and not out.exists()
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    from safetensors.torch import save_file
    save_file({"h.0.attn.c_attn.weight": torch.zeros(4, 12)}, gpt2 / "model.safetensors")
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    proc = cli("quantize", gpt2, "-o", out, "--method", "rtn")
    assert proc.returncode == 2 and "GPT2LMHeadModel is not supported" in proc.stderr and not out.exists()


@pytest.mark.client
@pytest.mark.parametrize("sym, desc_act", [(True, False), (False, True)])
def test_quantize_output_loads_in_gptqmodel(model, calib, tmp_path, sym, desc_act):
    """The `quantize` command's own output in a real client (transformers + gptqmodel): same logits as our
    dequantizing loader, up to the client's float16 arithmetic."""
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    _quantize(model, out, method="gptq", bits=4, group_size=32, sym=sym, desc_act=desc_act, calib=str(calib),
              samples=8, seqlen=64)
    ids = torch.randint(0, 2048, (1, 24), generator=torch.Generator().manual_seed(0))
    client = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu").eval()
    assert len([m for m in client.modules() if hasattr(m, "qweight")]) == 14
    ours = load_dequantized(Checkpoint.open(out)).eval()
    with torch.no_grad():
        got, ref = client(ids).logits.float(), ours(ids).logits.float()
    assert (got - ref).abs().max() <= 1e-2 * max(ref.abs().max().item(), 1.0)


def test_eval_before_and_after_goes_into_the_card(model, calib, tmp_path):
    from mergequant.evaluate import evaluate_model

    out = tmp_path / "q"
    res = _quantize(model, out, method="rtn", bits=4, group_size=32, eval_data=str(calib), seqlen=64)
    fp, q = res.perplexity["full precision"], res.perplexity["rtn 4-bit"]
    assert fp == pytest.approx(evaluate_model(str(model), str(calib), seqlen=64, progress=False).perplexity)
    assert q == pytest.approx(evaluate_model(str(out), str(calib), seqlen=64, progress=False).perplexity)
    assert fp != q
    card = (out / "README.md").read_text()
    assert f"| full precision | {fp:.4f} |" in card and f"| rtn 4-bit | {q:.4f} |" in card


@pytest.mark.client
def test_eval_backends_agree_on_a_gptq_checkpoint(model, calib, tmp_path):
    """`eval` runs a GPTQ checkpoint through transformers + gptqmodel (`--backend transformers`) or our
    own dequantizing loader (`dequant`; what `auto` picks on CPU): same perplexity up to the client's
    float16 arithmetic, and the result says which one ran. Asking for a missing client is a clear error."""
    import importlib.util

    from mergequant.errors import MergeQuantError
    from mergequant.evaluate import evaluate_model

    out = tmp_path / "q"
    _quantize(model, out, method="rtn", bits=4, group_size=32)
    ours = evaluate_model(str(out), str(calib), seqlen=64, max_tokens=600, progress=False, backend="dequant")
    assert ours.backend == "dequant"
    auto = evaluate_model(str(out), str(calib), seqlen=64, max_tokens=600, progress=False)
    assert auto.backend == "dequant" and auto.nll == ours.nll  # on CPU, auto never picks the slow client path
    have = all(importlib.util.find_spec(m) for m in ("gptqmodel", "optimum"))
    if have:
        client = evaluate_model(str(out), str(calib), seqlen=64, max_tokens=600, progress=False, backend="transformers")
        assert client.backend == "transformers"
        assert client.perplexity == pytest.approx(ours.perplexity, rel=5e-3)
        assert client.nll != ours.nll  # really a different code path (fp16 kernels), not the same loader twice
    else:
        with pytest.raises(MergeQuantError, match="gptqmodel"):
            evaluate_model(str(out), str(calib), seqlen=64, progress=False, backend="transformers")


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_feeds_each_layer_the_quantized_layers_outputs(model, calib, tmp_path, monkeypatch, desc_act):
    """The layer loop never holds the float weights of the Linears it quantizes (they are read from
    the checkpoint, and solved modules compute from their codes): what it feeds forward must be the
    quantized model's own hidden states, i.e. those of the written checkpoint (up to its float16 scales)."""
    from mergequant.quant.runner import LayerRunner

    seen = {}
    run = LayerRunner.run

    def recording_run(self, *a, **kw):
        out = run(self, *a, **kw)
        seen["ids"], seen["hidden"] = self.calib_ids, torch.cat(out)
        return out

    monkeypatch.setattr(LayerRunner, "run", recording_run)
    _quantize(model, tmp_path / "g", method="gptq", bits=4, group_size=32, desc_act=desc_act, calib=str(calib),
              samples=8, seqlen=64)

    def final_hidden(m):
        got = []
        hook = m.model.norm.register_forward_pre_hook(lambda mod, args: got.append(args[0]))
        with torch.no_grad():
            m(seen["ids"])
        hook.remove()
        return got[0]

    from transformers import AutoModelForCausalLM

    quant = final_hidden(load_dequantized(Checkpoint.open(tmp_path / "g")).float().eval())
    full = final_hidden(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval())
    scale = quant.abs().mean()
    err_quant = float((seen["hidden"] - quant).abs().mean() / scale)
    err_full = float((seen["hidden"] - full).abs().mean() / scale)
    assert err_quant < 2e-3, err_quant  # float16 scales in the file vs float32 in the solver
    assert err_full > 20 * err_quant, (err_full, err_quant)  # quantization visibly changed the model
