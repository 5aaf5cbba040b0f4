"""GGUF export of the families beyond Llama/Qwen: gemma, gemma2, gemma3 (``gemma3_text``), phi3, qwen2_moe,
qwen3_moe, each as a tiny random transformers model:

- written as F32 GGUF and read back with gguf.GGUFReader: the architecture's keys, every tensor's llama.cpp
  name and shape (as llama.cpp's loader creates them), and every tensor equal to its source with the
  documented transforms undone (Gemma norms stored as ``w + 1``, experts stacked);
- (``client``) loaded in llama.cpp (llama-cpp-python 0.3.36): its logits equal transformers' on the same
  tokens within the tolerance of tests/test_gguf_llama_cpp.py; and, for the MoE families and Phi-3 (fused
  ``attn_qkv``, which llama.cpp's mixes treat as ``attn_v``), our quantized files are byte-identical to
  ``llama_model_quantize`` applied to our F32 file;
- what llama.cpp hard-codes differently from a config is refused with one line.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from mergequant.errors import MergeQuantError  # noqa: E402
from mergequant.gguf.writer import gguf_architecture, write_gguf  # noqa: E402

BASE = Path("/work/shared/models/base")
H, I, HEADS, KV, HD, V = 256, 512, 4, 2, 64, 2048  # k-quant friendly: every row length a multiple of 256


def _tokenizer_source(tmp_path_factory) -> Path:
    if (BASE / "tokenizer.json").is_file():
        return BASE
    import torch

    from mergequant.demo import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tok") / "base", seed=0, dtype=torch.bfloat16, hidden=64,
                            intermediate=128, layers=1, heads=4, kv_heads=2)


def _save(model, d: Path, tok: Path, biases: bool = False) -> Path:
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") and biases:
                p.normal_(0, 0.5)  # nonzero, so that a wrong layout shows
            elif n.endswith("norm.weight"):
                p.normal_(0, 0.3)  # Gemma stores w (used as 1 + w); others w: random either way
    model.to(torch.bfloat16).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, d / f)
    return d


COMMON = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_attention_heads=HEADS, num_key_value_heads=KV,
              max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=None, initializer_range=0.05)


def _gemma(d, tok):
    from transformers import GemmaConfig, GemmaForCausalLM

    return _save(GemmaForCausalLM(GemmaConfig(**COMMON, num_hidden_layers=2, head_dim=HD)), d, tok)


def _gemma2(d, tok):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # a window shorter than the test's 200 tokens, and softcaps that bite, so that each key matters
    cfg = Gemma2Config(**COMMON, num_hidden_layers=4, head_dim=HD, query_pre_attn_scalar=HD, sliding_window=48,
                       attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    return _save(Gemma2ForCausalLM(cfg), d, tok)


def _gemma3(d, tok):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # layer 2 global: llama.cpp's default pattern (every 6th) would make it sliding, so the written pattern matters;
    # the global layers' linear rope scaling and the local layers' own theta too
    cfg = Gemma3TextConfig(**COMMON, num_hidden_layers=4, head_dim=HD, query_pre_attn_scalar=HD, sliding_window=48,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                           rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                            "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                               "rope_theta": 1000000.0}})
    return _save(Gemma3ForCausalLM(cfg), d, tok)


def _phi3(d, tok):
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(**COMMON, num_hidden_layers=2, original_max_position_embeddings=512,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    return _save(Phi3ForCausalLM(cfg), d, tok)


def _qwen2_moe(d, tok):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(**COMMON, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                         shared_expert_intermediate_size=I, norm_topk_prob=False, tie_word_embeddings=False)
    return _save(Qwen2MoeForCausalLM(cfg), d, tok, biases=True)


def _qwen3_moe(d, tok):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    # 8 experts: llama.cpp's mixes raise attn_v/attn_k/attn_output for exactly 8
    cfg = Qwen3MoeConfig(**COMMON, num_hidden_layers=2, head_dim=HD, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=256, norm_topk_prob=True, tie_word_embeddings=False)
    return _save(Qwen3MoeForCausalLM(cfg), d, tok)


BUILDERS = {"gemma": _gemma, "gemma2": _gemma2, "gemma3_text": _gemma3, "phi3": _phi3, "qwen2_moe": _qwen2_moe,
            "qwen3_moe": _qwen3_moe}
GGUF_NAME = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "qwen2_moe": "qwen2moe",
             "qwen3_moe": "qwen3moe"}


def _build(request, tmp_path_factory, family: str) -> Path:
    import torch

    torch.manual_seed(list(BUILDERS).index(family))
    tok = _tokenizer_source(tmp_path_factory)
    # not "phi3": llama.cpp applies Phi-3's token rules to any model whose general.name says phi3 (see below)
    name = "tiny-phi" if family == "phi3" else family
    return BUILDERS[family](tmp_path_factory.mktemp(family) / name, tok)


@pytest.fixture(scope="module", params=list(BUILDERS))
def f32_file(request, tmp_path_factory):
    family = request.param
    model = _build(request, tmp_path_factory, family)
    out = tmp_path_factory.mktemp(f"{family}-gguf")
    return family, model, write_gguf(model, out, ["F32"], fsync=False).files["F32"]


# ---- what llama.cpp expects (its loader's tensors, numpy order: ggml's ne reversed) -----------------------------

def _expected_shapes(family: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    out = {"token_embd.weight": (V, h), "output_norm.weight": (h,)}
    if family in ("phi3", "qwen2_moe", "qwen3_moe"):
        out["output.weight"] = (V, h)
    for i in range(cfg["num_hidden_layers"]):
        b = f"blk.{i}."
        out[b + "attn_norm.weight"] = (h,)
        out[b + "ffn_norm.weight"] = (h,)
        out[b + "attn_output.weight"] = (h, heads * hd)
        if family == "phi3":
            out[b + "attn_qkv.weight"] = (heads * hd + 2 * kv * hd, h)
            out[b + "ffn_up.weight"] = (2 * cfg["intermediate_size"], h)
            out[b + "ffn_down.weight"] = (h, cfg["intermediate_size"])
            continue
        out.update({b + "attn_q.weight": (heads * hd, h), b + "attn_k.weight": (kv * hd, h),
                    b + "attn_v.weight": (kv * hd, h)})
        if family == "qwen2_moe":
            out.update({b + "attn_q.bias": (heads * hd,), b + "attn_k.bias": (kv * hd,), b + "attn_v.bias": (kv * hd,)})
        if family in ("gemma3_text", "qwen3_moe"):
            out.update({b + "attn_q_norm.weight": (hd,), b + "attn_k_norm.weight": (hd,)})
        if family in ("gemma2", "gemma3_text"):
            out.update({b + "post_attention_norm.weight": (h,), b + "post_ffw_norm.weight": (h,)})
        if family.endswith("_moe"):
            e, f = cfg.get("num_experts") or cfg["num_local_experts"], cfg["moe_intermediate_size"]
            out.update({b + "ffn_gate_inp.weight": (e, h), b + "ffn_gate_exps.weight": (e, f, h),
                        b + "ffn_up_exps.weight": (e, f, h), b + "ffn_down_exps.weight": (e, h, f)})
            if family == "qwen2_moe":
                s = cfg["shared_expert_intermediate_size"]
                out.update({b + "ffn_gate_inp_shexp.weight": (1, h), b + "ffn_gate_shexp.weight": (s, h),
                            b + "ffn_up_shexp.weight": (s, h), b + "ffn_down_shexp.weight": (h, s)})
        else:
            i_ff = cfg["intermediate_size"]
            out.update({b + "ffn_gate.weight": (i_ff, h), b + "ffn_up.weight": (i_ff, h),
                        b + "ffn_down.weight": (h, i_ff)})
    return out


def _source_under_gguf_names(family: str, model: Path) -> dict[str, np.ndarray]:
    """The source tensors as llama.cpp's converter stores them, from the checkpoint directly: gguf-py's name
    map, Gemma norms + 1, experts stacked, the tied embedding as the only output."""
    import json

    from safetensors.torch import load_file as load_torch

    cfg = json.loads((model / "config.json").read_text())
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[GGUF_NAME[family]]
    nmap = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    src = {}
    for f in sorted(model.glob("*.safetensors")):
        src.update({k: v.float().numpy() for k, v in load_torch(f).items()})
    out, experts = {}, {}
    for name, w in src.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", name)
        if m:
            experts.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = w
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj", name)  # fused on disk
        if m:
            layer, part = int(m.group(1)), m.group(2)
            if part == "down":
                experts[(layer, "down")] = dict(enumerate(w))
            else:
                half = w.shape[1] // 2
                experts[(layer, "gate")] = dict(enumerate(w[:, :half]))
                experts[(layer, "up")] = dict(enumerate(w[:, half:]))
            continue
        if family.startswith("gemma") and name.endswith("norm.weight"):
            w = w + 1.0
        g = nmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert g is not None, name
        out[g] = w
    for (layer, part), by_e in experts.items():
        out[f"blk.{layer}.ffn_{part}_exps.weight"] = np.stack([by_e[e] for e in sorted(by_e)])
    return out


@pytest.mark.slow
def test_f32_file_has_llama_cpp_keys_names_shapes_and_the_source_values(f32_file):
    import json

    family, model, path = f32_file
    cfg = json.loads((model / "config.json").read_text())
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.") or k.endswith(("model", "pre"))}
    a = GGUF_NAME[family]
    assert f["general.architecture"] == a
    assert f[f"{a}.block_count"] == cfg["num_hidden_layers"]
    assert f[f"{a}.embedding_length"] == H and f[f"{a}.attention.head_count_kv"] == KV
    assert f[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert f["tokenizer.ggml.model"] == "gpt2"
    if family.startswith("gemma"):
        assert f[f"{a}.attention.key_length"] == HD and f[f"{a}.attention.value_length"] == HD
    if family == "gemma2":
        assert f["gemma2.attn_logit_softcapping"] == pytest.approx(2.0)
        assert f["gemma2.final_logit_softcapping"] == pytest.approx(3.0)
        assert f["gemma2.attention.sliding_window"] == 48
        assert f["gemma2.attention.sliding_window_pattern"] == [True, False, True, False]
    if family == "gemma3_text":
        assert f["gemma3.attention.sliding_window"] == 48
        assert f["gemma3.attention.sliding_window_pattern"] == [True, True, False, True]
        assert f["gemma3.rope.freq_base"] == pytest.approx(1e6) and f["gemma3.rope.freq_base_swa"] == pytest.approx(1e4)
        assert f["gemma3.rope.scaling.type"] == "linear" and f["gemma3.rope.scaling.factor"] == pytest.approx(4.0)
    if family == "phi3":
        assert f["phi3.rope.dimension_count"] == HD // 2  # partial_rotary_factor 0.5
        assert f["phi3.rope.scaling.original_context_length"] == 512
        assert f["phi3.attention.sliding_window"] == 0
    if family.endswith("_moe"):
        assert f[f"{a}.expert_count"] == (cfg.get("num_experts") or cfg["num_local_experts"]) and f[f"{a}.expert_used_count"] == 2
        assert f[f"{a}.expert_feed_forward_length"] == cfg["moe_intermediate_size"]
    if family == "qwen2_moe":
        assert f["qwen2moe.expert_shared_feed_forward_length"] == cfg["shared_expert_intermediate_size"]
    got = {t.name: t for t in r.tensors}
    want = _expected_shapes(family, cfg)
    assert {n: tuple(int(d) for d in reversed(t.shape)) for n, t in got.items()} == want
    src = _source_under_gguf_names(family, model)
    if family in ("phi3", "qwen2_moe", "qwen3_moe"):
        assert "output.weight" in src
    assert set(src) == set(want)
    for name, t in got.items():
        assert t.tensor_type.name == "F32", name
        y = np.asarray(t.data, dtype=np.float32).reshape(want[name])
        assert np.array_equal(y, src[name].reshape(want[name])), name


# ---- one-line refusals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,expect", [
    ({"model_type": "gemma", "tie_word_embeddings": False}, "untied lm_head"),
    ({"model_type": "gemma2", "hidden_size": 256, "num_attention_heads": 4, "head_dim": 64, "num_hidden_layers": 4,
      "query_pre_attn_scalar": 128}, "query_pre_attn_scalar 128"),
    ({"model_type": "gemma3_text", "attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"model_type": "phi3", "rope_scaling": {"rope_type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}},
     "longrope without original_max_position_embeddings"),
    ({"model_type": "phi3", "hidden_size": 256, "num_attention_heads": 4, "original_max_position_embeddings": 512,
      "rope_scaling": {"rope_type": "longrope", "long_factor": [1.0] * 32, "short_factor": [1.0]}},
     "longrope short_factor of length 1 (the rotary dimensions need 32)"),
    ({"model_type": "phi3", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope scaling 'yarn' (llama.cpp's phi3 takes default or longrope)"),
    ({"model_type": "qwen2_moe", "norm_topk_prob": True}, "norm_topk_prob=True"),
    ({"model_type": "qwen3_moe", "norm_topk_prob": False}, "norm_topk_prob=False"),
    ({"model_type": "qwen3_moe", "norm_topk_prob": True, "mlp_only_layers": [0]}, "layers without experts"),
    ({"model_type": "qwen2_moe", "decoder_sparse_step": 2}, "layers without experts"),
])
def test_what_llama_cpp_computes_differently_is_refused_in_one_line(cfg, expect):
    with pytest.raises(MergeQuantError, match=re.escape(expect)) as e:
        gguf_architecture(cfg, "m: ")
    assert "\n" not in str(e.value) and str(e.value).startswith(f"m: model_type {cfg['model_type']!r}")


def test_the_supported_configs_are_accepted():
    assert gguf_architecture({"model_type": "gemma"}) == ("gemma", False)  # tied by default
    assert gguf_architecture({"model_type": "gemma3_text", "query_pre_attn_scalar": 256, "head_dim": 256,
                              "hidden_size": 1152, "num_attention_heads": 4, "num_hidden_layers": 26}) == ("gemma3", False)
    assert gguf_architecture({"model_type": "qwen3_moe", "norm_topk_prob": True}) == ("qwen3moe", False)
    assert gguf_architecture({"model_type": "qwen2_moe"}) == ("qwen2moe", False)
    assert gguf_architecture({"model_type": "phi3", "rope_parameters": {"rope_type": "default"}}) == ("phi3", False)


def test_mixes_treat_phi3_attn_qkv_as_attn_v_and_a_1xn_tensor_as_1d():
    from mergequant.gguf import mixes

    m = mixes.ModelShape("phi3", 32, 32, 32)
    assert [mixes.tensor_type("Q4_K_M", f"blk.{i}.attn_qkv.weight", (9216, 3072), m) for i in (0, 4, 6)] == \
        ["Q6_K", "Q4_K", "Q6_K"]
    assert mixes.tensor_type("Q3_K_M", "blk.0.attn_qkv.weight", (9216, 3072), m) == "Q5_K"
    assert mixes.tensor_type("Q8_0", "blk.0.ffn_gate_inp_shexp.weight", (1, 2048), m) == "F32"
    assert mixes.tensor_type("Q8_0", "blk.0.ffn_gate_shexp.weight", (5632, 2048), m) == "Q8_0"


@pytest.mark.slow
def test_cli_writes_a_new_family_and_refuses_a_phi3_name_llama_cpp_cannot_load(request, tmp_path_factory, tmp_path):
    from helpers import cli

    model = _build(request, tmp_path_factory, "phi3")
    out = tmp_path / "o"
    r = cli("quantize", model, "-o", out, "--method", "gguf", "--gguf-type", "Q4_K_M", "-q")
    assert r.returncode == 0, r.stderr
    f = gguf.GGUFReader(out / f"{model.name}-Q4_K_M.gguf")
    assert f.fields["general.architecture"].contents() == "phi3"
    types = {t.name: t.tensor_type.name for t in f.tensors}
    assert (types["blk.0.attn_qkv.weight"], types["blk.1.attn_qkv.weight"]) == ("Q4_K", "Q6_K")  # as attn_v
    # llama.cpp gives names with "phi3" Phi-3's token rules, which look up <unk>, <s>, </s>, <|endoftext|>
    named = shutil.copytree(model, tmp_path / "my-phi3-merge")
    r = cli("quantize", named, "-o", tmp_path / "o2", "--method", "gguf", "--gguf-type", "Q8_0")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "llama.cpp applies Phi-3's token rules" in r.stderr and "<unk>" in r.stderr
    assert not (tmp_path / "o2").exists()


# ---- llama.cpp itself -----------------------------------------------------------------------------------------

def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama.cpp not installed (bash scripts/install-llama-cpp.sh)")


@pytest.mark.client
@pytest.mark.slow
def test_llama_cpp_logits_equal_transformers(f32_file):
    import torch
    from transformers import AutoModelForCausalLM

    llama_cpp = _llama_cpp()
    family, model, path = f32_file
    ids = np.random.default_rng(0).integers(2, V, 200).tolist()
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
        if family.startswith("gemma"):
            # llama.cpp's CPU GELU is a float16 table (input and output rounded to half): measured max |diff|
            # 1.1e-3..1.4e-3 against the exact GELU; with transformers using the same rounding, the rest of the
            # graph is checked at the usual tolerance
            exact = want
            for layer in hf.model.layers:
                layer.mlp.act_fn = _GgmlGelu()
            want = hf(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_batch=256, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    assert diff < 1e-3, f"{family}: llama.cpp logits differ from transformers by up to {diff:.4g} (largest {scale:.3g})"
    assert scale > 0.5  # logits with a spread, so the comparison means something
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99
    if family.startswith("gemma"):
        assert float(np.abs(got - exact).max()) < 5e-3  # and close to the exact-GELU model too


def _GgmlGelu():
    """ggml's CPU GELU (tanh form) as its float16 table computes it: x rounded to half, the result stored as
    half; exact beyond |x| >= 10."""
    import torch

    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):  # ggml_gelu_f32, in float32 and its order, stored as half
        g = np.float32(0.5) * h * (np.float32(1) + np.tanh(np.float32(0.7978845608028654) * h
                                                          * (np.float32(1) + np.float32(0.044715) * h * h)))
    table = torch.from_numpy(np.nan_to_num(g.astype(np.float16).astype(np.float32)))

    class GgmlGelu(torch.nn.Module):
        def forward(self, x):
            y = table[x.half().view(torch.int16).long() & 0xFFFF]
            return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))

    return GgmlGelu()


@pytest.mark.client
@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "phi3"])
def test_quantized_files_are_byte_identical_to_llama_quantize(family, request, tmp_path_factory, tmp_path):
    _llama_cpp()
    from test_gguf_llama_cpp import _tensors, llama_quantize

    types = ["Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K"]
    model = _build(request, tmp_path_factory, family)
    res = write_gguf(model, tmp_path, ["F32"] + types, fsync=False)
    bad = []
    for ft in types:
        ref_path = tmp_path / f"ref-{ft}.gguf"
        llama_quantize(res.files["F32"], ref_path, ft)
        ours, ref = _tensors(res.files[ft]), _tensors(ref_path)
        assert set(ours) == set(ref), ft
        for name in ref:
            if ours[name][0] != ref[name][0]:
                bad.append(f"{ft} {name}: type {ours[name][0]} vs llama.cpp {ref[name][0]}")
            elif ours[name][1] != ref[name][1]:
                bad.append(f"{ft} {name} ({ref[name][0]}): bytes differ")
    assert not bad, f"{family}: " + "; ".join(bad[:20])
    if family == "qwen3_moe":  # 8 experts: llama.cpp's bumps apply
        assert _tensors(res.files["Q4_K_M"])["blk.0.attn_v.weight"][0] == "Q8_0"


# ---- long-context Phi-3 (LongRoPE) ---------------------------------------------------------------------------

def _phi3_longrope(d, tok, **rope):
    from transformers import Phi3Config, Phi3ForCausalLM

    half = HD // 4  # rotary dims HD / 2 (partial_rotary_factor 0.5), one factor per frequency pair
    rng = np.random.default_rng(7)
    params = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
              "long_factor": [float(x) for x in 1 + 7 * rng.random(half)],
              "short_factor": [float(x) for x in 1 + 0.5 * rng.random(half)], **rope}
    cfg = Phi3Config(**{**COMMON, "max_position_embeddings": 2048}, num_hidden_layers=2,
                     original_max_position_embeddings=512, rope_parameters=params)
    return _save(Phi3ForCausalLM(cfg), d, tok)


@pytest.fixture(scope="module")
def longrope(tmp_path_factory):
    import torch

    torch.manual_seed(11)
    model = _phi3_longrope(tmp_path_factory.mktemp("phi3lr") / "tiny-phi-128k", _tokenizer_source(tmp_path_factory))
    out = tmp_path_factory.mktemp("phi3lr-gguf")
    return model, write_gguf(model, out, ["F32", "Q4_K_M"], fsync=False).files


@pytest.mark.slow
def test_phi3_longrope_writes_llama_cpp_rope_factors_and_attn_factor(longrope):
    import json
    import math

    model, files = longrope
    cfg = json.loads((model / "config.json").read_text())
    rp = cfg["rope_parameters"]
    r = gguf.GGUFReader(files["F32"])
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith("phi3.")}
    # transformers' own factor on cos/sin: sqrt(1 + ln(2048 / 512) / ln(512))
    assert f["phi3.rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(512)), rel=1e-6)
    assert f["phi3.rope.scaling.original_context_length"] == 512 and f["phi3.context_length"] == 2048
    tensors = {t.name: t for t in r.tensors}
    for kind in ("long", "short"):
        t = tensors[f"rope_factors_{kind}.weight"]
        assert t.tensor_type.name == "F32"
        assert np.array_equal(np.asarray(t.data, dtype=np.float32).ravel(),
                              np.asarray(rp[f"{kind}_factor"], dtype=np.float32))
    q = {t.name: t.tensor_type.name for t in gguf.GGUFReader(files["Q4_K_M"]).tensors}
    assert q["rope_factors_long.weight"] == q["rope_factors_short.weight"] == "F32"


@pytest.mark.client
@pytest.mark.slow
def test_phi3_longrope_in_llama_cpp(longrope, tmp_path):
    """Within the original context both use the short factors: llama.cpp's logits equal transformers'; and
    our Q4_K_M equals llama-quantize of our F32 file (the factor tensors stay F32)."""
    import torch
    from transformers import AutoModelForCausalLM

    llama_cpp = _llama_cpp()
    from test_gguf_llama_cpp import _tensors, llama_quantize

    model, files = longrope
    ids = np.random.default_rng(3).integers(2, V, 200).tolist()
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(files["F32"]), logits_all=True, n_ctx=512, n_batch=256, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    assert float(np.abs(got - want).max()) < 1e-3 and float(np.abs(want).max()) > 0.5
    ref = tmp_path / "ref.gguf"
    llama_quantize(files["F32"], ref, "Q4_K_M")
    ours, theirs = _tensors(files["Q4_K_M"]), _tensors(ref)
    assert set(ours) == set(theirs)
    assert [n for n in theirs if ours[n] != theirs[n]] == []
