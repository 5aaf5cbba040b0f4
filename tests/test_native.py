"""The runner's plain-torch decoder (``mergequant.quant.native``) against transformers' own models.

For every family it covers, a tiny random transformers model is saved and run through the
layer-by-layer runner: the runner must pick the native modules, and their logits must equal
transformers' (bit for bit for the dense families; MoE within float32 rounding, since transformers
sums the experts in another order). The module tree (names, shapes, classes' names) must be the
one the transformers skeleton gives, so every method's hooks see the same model. Configurations the
native modules do not compute like transformers (scaled rotary, a window shorter than the
sequences, other families) must be refused, and then the transformers skeleton gives transformers'
logits. Finally, a whole GPTQ run must not import transformers' modeling code or torch._dynamo
(what the native path is for: seconds of start-up on a small machine).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mergequant.quant import native
from mergequant.quant.native import NATIVE_FAMILIES, native_refusal
from mergequant.quant.runner import LayerRunner

pytest.importorskip("transformers")
from test_architectures import EXTRA, V, _model, _save  # noqa: E402

MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    out = {}
    for i, mt in enumerate(NATIVE_FAMILIES + ("gemma",)):
        model = _model(mt, seed=100 + i)
        out[mt] = (model, _save(model, tmp_path_factory.mktemp(mt)))
    return out


def _ids(seed: int = 0, shape=(3, 12)) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mt", NATIVE_FAMILIES)
def test_native_logits_equal_transformers(families, mt):
    model, d = families[mt]
    ids = _ids()
    runner = LayerRunner(d, ids, batch_size=2)
    assert runner.native and type(runner.model).__module__ == native.__name__
    got = runner.run(finish=True)
    with torch.no_grad():
        ref = model(ids).logits
    if mt in MOE:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, ref)


def _transformers_runner(d, ids, monkeypatch) -> LayerRunner:
    with monkeypatch.context() as m:
        m.setattr(native, "native_refusal", lambda config, seqlen: "forced off")
        runner = LayerRunner(d, ids, batch_size=2)
    assert not runner.native
    return runner


@pytest.mark.parametrize("mt", NATIVE_FAMILIES)
def test_native_tree_is_the_transformers_skeletons(families, mt, monkeypatch):
    _, d = families[mt]
    ids = _ids()
    ours, theirs = LayerRunner(d, ids), _transformers_runner(d, ids, monkeypatch)
    assert type(ours.model).__name__ == type(theirs.model).__name__
    shapes = lambda r: {n: tuple(p.shape) for n, p in r.model.named_parameters()}  # noqa: E731
    # transformers' rotary module has buffers of its own (original_inv_freq); parameters must match exactly
    assert shapes(ours) == shapes(theirs)
    for a, b in zip(ours.layers, theirs.layers):
        assert type(a).__name__ == type(b).__name__
        assert {n: type(m).__name__ for n, m in a.named_modules() if isinstance(m, torch.nn.Linear)} == \
               {n: type(m).__name__ for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)}
    assert torch.equal(ours.model.model.rotary_emb.inv_freq, theirs.model.model.rotary_emb.inv_freq)


def _config(d) -> dict:
    return json.loads((d / "config.json").read_text())


def _with(d, tmp_path, **changes):
    """A copy of checkpoint folder ``d`` with config.json changed."""
    import shutil

    out = tmp_path / "changed"
    shutil.copytree(d, out)
    cfg = {**_config(d), **changes}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_refusals(families):
    llama = _config(families["llama"][1])
    assert native_refusal(llama, 12) is None
    assert "gemma" in native_refusal(_config(families["gemma"][1]), 12)
    scaled = {**llama, "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 16}}
    assert "rotary" in native_refusal(scaled, 12)
    assert "activation" in native_refusal({**llama, "hidden_act": "gelu"}, 12)
    assert "rms_norm_eps" in native_refusal({k: v for k, v in llama.items() if k != "rms_norm_eps"}, 12)
    mistral = _config(families["mistral"][1])
    assert native_refusal({**mistral, "sliding_window": 16}, 12) is None
    assert "sliding window" in native_refusal({**mistral, "sliding_window": 4}, 12)
    assert "sliding window" in native_refusal({k: v for k, v in mistral.items() if k != "sliding_window"}, 8192)
    qwen2 = _config(families["qwen2"][1])
    assert "sliding" in native_refusal({**qwen2, "use_sliding_window": True}, 12)
    assert "sliding" in native_refusal({**qwen2, "layer_types": ["sliding_attention", "full_attention"]}, 12)


def test_a_short_window_goes_through_transformers(families, tmp_path):
    """Mistral with a 4-token window over 12-token sequences: transformers masks beyond the window, so
    the runner must build transformers' model, and its logits are transformers'."""
    from transformers import AutoModelForCausalLM

    d = _with(families["mistral"][1], tmp_path, sliding_window=4)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    ids = _ids(1)
    runner = LayerRunner(d, ids, batch_size=2)
    assert not runner.native
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(runner.run(finish=True), ref, rtol=1e-5, atol=1e-5)
    # and the window really matters here (else this test could not tell the two paths apart)
    plain = LayerRunner(families["mistral"][1], ids, batch_size=2)
    assert plain.native and (plain.run(finish=True) - ref).abs().max() > 1e-3


def test_qwen3_moe_with_num_experts_key(families, tmp_path):
    """Hub Qwen3-MoE configs say num_experts; transformers 5 saves num_local_experts: both are read."""
    d = families["qwen3_moe"][1]
    cfg = _config(d)
    n = cfg.pop("num_local_experts")
    d2 = _with(d, tmp_path)
    (d2 / "config.json").write_text(json.dumps({**cfg, "num_experts": n}))
    ids = _ids(2)
    a = LayerRunner(d, ids, batch_size=2)
    b = LayerRunner(d2, ids, batch_size=2)
    assert a.native and b.native
    assert torch.equal(a.run(finish=True), b.run(finish=True))


def test_gptq_run_imports_no_transformers_modeling(families, tmp_path):
    """A GPTQ run of a native family in a fresh interpreter never imports transformers' modeling code,
    torch._dynamo or the merge kernels' numba (their import is seconds of a small machine's start-up)."""
    from mergequant.quant.fast_tokenizer import fast_tokenizer

    _, d = families["mixtral"]
    if fast_tokenizer(d) is None:  # (the tokenizer rules are for transformers 5.24; else AutoTokenizer runs)
        pytest.skip("the calibration tokenizer needs transformers under this transformers version")
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(300)))
    code = ("import sys, mergequant.cli\n"
            f"sys.argv = ['mergequant', 'quantize', {str(d)!r}, '-o', {str(tmp_path / 'q')!r}, '--method', 'gptq',"
            f" '--calib', {str(calib)!r}, '--samples', '4', '--seqlen', '16', '--group-size', '32', '--quiet']\n"
            "try:\n    mergequant.cli.main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in sys.modules if m.startswith(('transformers.models', 'transformers.modeling',"
            " 'torch._dynamo', 'numba'))))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "q" / "config.json").is_file()
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_extra_configs_stay_covered():
    # the MoE families' tiny configs exercise a shared expert and a dense layer inside an MoE model
    assert "shared_expert_intermediate_size" in EXTRA["qwen2_moe"] and EXTRA["qwen3_moe"]["mlp_only_layers"] == [1]


def test_llama_biases_and_tied_head(tmp_path):
    """Llama's optional attention and MLP biases, and a head tied to the embedding (no lm_head tensor)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=V,
                               max_position_embeddings=64, attention_bias=True, mlp_bias=True,
                               tie_word_embeddings=True)
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = _save(model, tmp_path / "llama-bias")
    ids = _ids(4)
    runner = LayerRunner(d, ids, batch_size=2)
    assert runner.native
    assert runner.layers[0].self_attn.o_proj.bias is not None and runner.layers[0].mlp.down_proj.bias is not None
    with torch.no_grad():
        ref = model(ids).logits
    assert torch.equal(runner.run(finish=True), ref)
