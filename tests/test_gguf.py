"""`--method gguf`: our block quantizers against gguf-py's reference ports (byte for byte, adversarial
blocks included), k-quant error bounds, the per-tensor mixes, a one-pass multi-type file read back with
gguf.GGUFReader and dequantized against the source, and the one-line refusals. Byte identity with
llama.cpp itself and logits/tokenization in llama.cpp: tests/test_gguf_llama_cpp.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf.constants import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as gg_dequantize  # noqa: E402
from gguf.quants import quantize as gg_quantize  # noqa: E402

from mergequant.errors import MergeQuantError  # noqa: E402
from mergequant.gguf import mixes  # noqa: E402
from mergequant.gguf.blocks import f16_to_f32, f32_to_f16, quantize_blocks, to_bf16  # noqa: E402

from helpers import cli  # noqa: E402

CLASSIC = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
KQUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# relative RMS error bounds on Gaussian weights (measured: Q2_K 0.30, Q3_K 0.15, Q4_K 0.071, Q5_K 0.036,
# Q6_K 0.018, Q8_0 0.004, Q4_0 0.11, Q4_1 0.09, Q5_0 0.055, Q5_1 0.045)
REL_RMS = {"F32": 0.0, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.006, "Q4_0": 0.13, "Q4_1": 0.11, "Q5_0": 0.07,
           "Q5_1": 0.06, "Q2_K": 0.34, "Q3_K": 0.18, "Q4_K": 0.085, "Q5_K": 0.045, "Q6_K": 0.022}


def adversarial_rows(cols: int = 256) -> np.ndarray:
    """Rows that break naive quantizers: zeros, one huge value, negative-only, denormals, ties, tiny/huge
    mixtures, a constant row, float16 overflow."""
    rng = np.random.default_rng(7)
    rows = [np.zeros(cols), rng.standard_normal(cols) * 0.02]
    r = np.zeros(cols)
    r[5] = 1e4
    rows.append(r)
    r = rng.standard_normal(cols) * 1e-3
    r[100] = -300.0
    rows.append(r)
    rows.append(-np.abs(rng.standard_normal(cols)))
    rows.append(np.abs(rng.standard_normal(cols)) + 1.0)
    rows.append(np.full(cols, np.float32(1e-42)))  # float32 denormals
    rows.append(rng.standard_normal(cols) * 1e-39)
    rows.append(np.full(cols, 0.37))
    rows.append(np.tile([-1.0, 1.0, 0.5, -0.5], cols // 4))
    rows.append(np.arange(cols) - cols / 2.0)
    rows.append(rng.standard_normal(cols) * 1e6)  # scales beyond float16
    r = rng.standard_normal(cols)
    r[::16] = 0.0
    rows.append(r)
    return np.asarray(rows, dtype=np.float32)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf-py's reference overflows float16 on purpose here
@pytest.mark.parametrize("qtype", CLASSIC)
def test_classic_blocks_are_byte_identical_to_the_reference(qtype):
    rng = np.random.default_rng(0)
    x = np.concatenate([adversarial_rows(256), (rng.standard_normal((16, 256)) * 0.05).astype(np.float32)])
    ours = quantize_blocks(x, qtype)
    ref = gg_quantize(x, T[qtype])
    assert ours.shape == ref.shape
    bad = np.nonzero((ours != ref).any(axis=1))[0]
    assert not len(bad), f"{qtype}: rows {bad.tolist()} differ from gguf-py's reference"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_half_conversions_match_ieee_round_to_nearest_even():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    vals = bits.view(np.float32)
    specials = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                         2.0**-14, 2.0**-14 - 2.0**-25, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, np.inf, -np.inf],
                        dtype=np.float32)
    vals = np.concatenate([vals, specials, -specials])
    finite = ~np.isnan(vals)
    ours = np.array([f32_to_f16(v) for v in vals[finite]], dtype=np.uint16)
    ref = vals[finite].astype(np.float16).view(np.uint16)
    assert np.array_equal(ours, ref)
    assert f32_to_f16(np.float32(np.nan)) & 0x7C00 == 0x7C00
    halves = np.arange(2**16, dtype=np.uint16)
    back = np.array([f16_to_f32(h) for h in halves], dtype=np.float32)
    ref_back = halves.view(np.float16).astype(np.float32)
    same = (back.view(np.uint32) == ref_back.view(np.uint32)) | (np.isnan(back) & np.isnan(ref_back))
    assert same.all()
    assert np.array_equal(to_bf16(vals[finite]), gg_quantize(vals[finite], T.BF16).view(np.uint16))


@pytest.mark.parametrize("qtype", CLASSIC + KQUANTS + ("F16", "BF16"))
def test_every_type_dequantizes_close_to_the_source(qtype):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((32, 512)) * 0.02).astype(np.float32)
    q = quantize_blocks(x, qtype)
    y = gg_dequantize(q, T[qtype]).reshape(x.shape)
    rel = float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x ** 2)))
    assert rel <= REL_RMS[qtype], f"{qtype}: relative RMS error {rel:.4f} > {REL_RMS[qtype]}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", KQUANTS)
def test_kquants_survive_adversarial_blocks(qtype):
    x = adversarial_rows(256)
    y = gg_dequantize(quantize_blocks(x, qtype), T[qtype]).reshape(x.shape)
    ok = np.abs(x).max(axis=1) < 6e4  # rows whose scales fit in float16
    assert np.isfinite(y[ok]).all()
    assert (y[0] == 0).all(), "an all-zero block must dequantize to zeros"
    for i in np.nonzero(ok)[0]:
        amax = np.abs(x[i]).max()
        assert np.abs(y[i] - x[i]).max() <= 0.75 * amax + 1e-30, f"{qtype} row {i}"


def _shape(n_layer=32, n_head=32, n_kv=8, n_expert=0, has_output=True):
    return mixes.ModelShape("llama", n_layer, n_head, n_kv, n_expert, has_output)


def test_mixes_follow_llama_cpp_rules():
    m = _shape()
    t = lambda ft, name, shape=(4096, 4096): mixes.tensor_type(ft, name, shape, m)  # noqa: E731
    more = [i for i in range(32) if mixes.use_more_bits(i, 32)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    for ft in ("Q4_K_M", "Q5_K_M"):
        assert [i for i in range(32) if t(ft, f"blk.{i}.attn_v.weight") == "Q6_K"] == more
        assert [i for i in range(32) if t(ft, f"blk.{i}.ffn_down.weight", (4096, 14336)) == "Q6_K"] == more
    assert t("Q4_K_M", "blk.4.attn_q.weight") == "Q4_K"
    assert t("Q4_K_M", "output.weight", (128256, 4096)) == "Q6_K"
    assert t("Q8_0", "output.weight", (128256, 4096)) == "Q8_0"
    assert t("Q4_0", "output.weight", (128256, 4096)) == "Q6_K"
    assert t("Q4_K_M", "token_embd.weight", (128256, 4096)) == "Q4_K"
    assert mixes.tensor_type("Q4_K_M", "token_embd.weight", (128256, 4096), _shape(has_output=False)) == "Q6_K"
    assert [t("Q3_K_M", f"blk.{i}.attn_v.weight") for i in (0, 1, 2)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert [t("Q3_K_M", f"blk.{i}.ffn_down.weight") for i in (0, 1, 2)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert t("Q3_K_M", "blk.7.attn_output.weight") == "Q4_K" and t("Q3_K_S", "blk.7.attn_output.weight") == "Q3_K"
    assert t("Q3_K_L", "blk.7.ffn_down.weight") == "Q5_K" and t("Q3_K_L", "blk.7.attn_v.weight") == "Q5_K"
    assert t("Q2_K", "blk.7.attn_v.weight") == "Q4_K"  # n_head / n_kv = 4
    assert mixes.tensor_type("Q2_K", "blk.7.attn_v.weight", (4096, 4096), _shape(n_kv=32)) == "Q3_K"
    assert t("Q2_K", "blk.7.ffn_down.weight") == "Q3_K" and t("Q2_K", "blk.7.ffn_up.weight") == "Q2_K"
    assert [t("Q4_K_S", f"blk.{i}.attn_v.weight") for i in (3, 4)] == ["Q5_K", "Q4_K"]
    assert [t("Q4_K_S", f"blk.{i}.ffn_down.weight") for i in (3, 4)] == ["Q5_K", "Q4_K"]
    assert t("Q5_K_S", "blk.0.attn_v.weight") == "Q5_K"
    assert t("Q6_K", "blk.0.attn_norm.weight", (4096,)) == "F32"
    moe = _shape(n_expert=8)
    assert mixes.tensor_type("Q4_K_M", "blk.0.attn_v.weight", (1024, 4096), moe) == "Q8_0"
    assert mixes.tensor_type("Q4_K_M", "blk.0.attn_k.weight", (1024, 4096), moe) == "Q8_0"
    assert mixes.tensor_type("Q4_K_M", "blk.0.attn_output.weight", (4096, 4096), moe) == "Q5_K"
    assert mixes.tensor_type("Q4_K_M", "blk.0.ffn_gate_inp.weight", (8, 4096), moe) == "F32"
    # fallbacks for row lengths the block does not divide
    assert t("Q4_K_M", "blk.9.attn_q.weight", (96, 96)) == "Q5_0"
    assert t("Q5_K_S", "blk.9.attn_q.weight", (96, 96)) == "Q5_1"
    assert t("Q6_K", "blk.9.attn_q.weight", (96, 96)) == "Q8_0"
    assert t("Q4_K_M", "blk.9.attn_q.weight", (96, 100)) == "F16"


def test_unknown_gguf_type_is_one_line():
    with pytest.raises(MergeQuantError, match=r"^--gguf-type Q4_K_XL: unknown GGUF type \(choose from F32, "):
        mixes.check_file_types(["Q4_K_XL"])
    with pytest.raises(MergeQuantError, match="at least one --gguf-type"):
        mixes.check_file_types([])
    assert mixes.check_file_types(["q4_k_m", "Q4_K_M", "f16"]) == ["Q4_K_M", "F16"]


# ---- whole files ----------------------------------------------------------------------------------


ALL_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
             "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]


@pytest.fixture(scope="module")
def all_files(dense_model, tmp_path_factory) -> Path:
    from mergequant.quant.quantize import QuantizeOptions, run_quantize

    out = tmp_path_factory.mktemp("ggout") / "gguf"
    run_quantize(dense_model, QuantizeOptions(out=out, method="gguf", gguf_types=ALL_TYPES, quiet=True, fsync=False),
                 log=lambda m: None)
    return out


def _source(model: Path) -> dict[str, np.ndarray]:
    """Source tensors under GGUF names, q/k rows in llama.cpp's rotary order (the documented permutation)."""
    from mergequant.io.checkpoint import Checkpoint

    ck = Checkpoint.open(model)
    cfg = ck.config
    nmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    out = {}
    for name in ck.tensors:
        w = ck.get(name).float().numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            n = cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"]
            r, c = w.shape
            w = w.reshape(n, 2, r // n // 2, c).swapaxes(1, 2).reshape(r, c)
        out[nmap.get_name(name, try_suffixes=(".weight",))] = w
    return out


@pytest.mark.slow
def test_one_pass_writes_every_type_and_reads_back(all_files, dense_model):
    src = _source(dense_model)
    cfg = json.loads((dense_model / "config.json").read_text())
    shape = mixes.ModelShape("llama", cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"])
    card = (all_files / "README.md").read_text()
    for ft in ALL_TYPES:
        path = all_files / f"{dense_model.resolve().name}-{ft}.gguf"
        assert f"`{path.name}`" in card
        r = gguf.GGUFReader(path)
        f = r.fields
        assert f["general.architecture"].contents() == "llama"
        assert f["general.file_type"].contents() == mixes.FTYPE[ft]
        assert f["llama.block_count"].contents() == cfg["num_hidden_layers"]
        assert f["llama.attention.head_count_kv"].contents() == cfg["num_key_value_heads"]
        assert f["llama.embedding_length"].contents() == cfg["hidden_size"]
        assert f["tokenizer.ggml.model"].contents() == "gpt2"
        assert f["tokenizer.ggml.pre"].contents() == "gpt-2"
        assert len(f["tokenizer.ggml.tokens"].contents()) == cfg["vocab_size"]
        assert {t.name for t in r.tensors} == set(src)
        for t in r.tensors:
            want = mixes.tensor_type(ft, t.name, src[t.name].shape, shape)
            assert t.tensor_type.name == want, (ft, t.name)
            x = src[t.name]
            y = gg_dequantize(t.data, t.tensor_type).reshape(x.shape)
            rel = float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x ** 2)))
            bound = 1.5 * REL_RMS[t.tensor_type.name] + 1e-7  # trained weights are heavier-tailed than Gaussian
            assert rel <= bound, f"{ft} {t.name} ({t.tensor_type.name}): relative RMS error {rel:.4f} > {bound:.4f}"


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def test_unknown_pre_tokenizer_is_one_line(dense_model, tmp_path):
    m = _copy_model(dense_model, tmp_path / "m")
    tj = json.loads((m / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{N}{1,7}|[^\p{N}]+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (m / "tokenizer.json").write_text(json.dumps(tj))
    r = cli("quantize", m, "-o", tmp_path / "out", "--method", "gguf", "--gguf-type", "Q8_0")
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "is not one llama.cpp implements (known: gpt-2, llama-bpe, qwen2)" in err[0], r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type,expect", [
    ("starcoder2", "GGUF defines this architecture but mergequant's GGUF export does not convert it yet"),
    ("made_up_arch", "GGUF (llama.cpp) defines no architecture for it"),
])
def test_architecture_gguf_cannot_take_is_one_line(dense_model, tmp_path, model_type, expect):
    from mergequant.gguf.writer import gguf_architecture

    with pytest.raises(MergeQuantError, match=re.escape(expect)):
        gguf_architecture({"model_type": model_type})
    m = _copy_model(dense_model, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_type"] = model_type
    (m / "config.json").write_text(json.dumps(cfg))
    r = cli("quantize", m, "-o", tmp_path / "out", "--method", "gguf", "--gguf-type", "Q8_0")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_unknown_type_and_missing_type_are_one_line(dense_model, tmp_path):
    r = cli("quantize", dense_model, "-o", tmp_path / "o", "--method", "gguf", "--gguf-type", "Q4_K_XL")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "unknown GGUF type" in r.stderr
    r = cli("quantize", dense_model, "-o", tmp_path / "o", "--method", "gguf")
    assert r.returncode != 0 and "at least one --gguf-type" in r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_writes_the_files_and_a_card(dense_model, tmp_path):
    out = tmp_path / "o"
    r = cli("quantize", dense_model, "-o", out, "--method", "gguf", "--gguf-type", "Q4_K_M", "--gguf-type", "q8_0", "-q")
    assert r.returncode == 0, r.stderr
    name = dense_model.resolve().name
    assert sorted(p.name for p in out.iterdir()) == ["README.md", f"{name}-Q4_K_M.gguf", f"{name}-Q8_0.gguf"]
    from mergequant.card import validate_card

    meta = validate_card((out / "README.md").read_text())
    assert meta["library_name"] == "gguf" and "gguf" in meta["tags"]
    r = cli("quantize", dense_model, "-o", tmp_path / "dry", "--method", "gguf", "--gguf-type", "Q5_K_M", "--dry-run")
    assert r.returncode == 0 and f"{name}-Q5_K_M.gguf" in r.stdout and not (tmp_path / "dry").exists()


@pytest.mark.parametrize("qtype", KQUANTS + ("Q4_0", "Q4_1", "Q5_0", "Q5_1"))
def test_importance_weighting_lowers_the_weighted_error(qtype):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((32, 512)) * 0.02).astype(np.float32)
    im = rng.gamma(0.5, size=512).astype(np.float32)
    err = {}
    for label, imatrix in (("plain", None), ("weighted", im)):
        y = gg_dequantize(quantize_blocks(x, qtype, imatrix), T[qtype]).reshape(x.shape)
        err[label] = float((((y - x) ** 2) * im).mean())
    assert err["weighted"] < 0.95 * err["plain"], err


@pytest.mark.slow
def test_cli_calib_writes_importance_weighted_files(dense_model, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune "
                     "must be in want of a wife. " * 200)
    out = tmp_path / "o"
    r = cli("quantize", dense_model, "-o", out, "--method", "gguf", "--gguf-type", "Q3_K_M", "--calib", calib,
            "--samples", "4", "--seqlen", "64", "-q")
    assert r.returncode == 0, r.stderr
    assert "importance-weighted" in (out / "README.md").read_text()
    plain = tmp_path / "p"
    assert cli("quantize", dense_model, "-o", plain, "--method", "gguf", "--gguf-type", "Q3_K_M", "-q").returncode == 0
    name = f"{dense_model.resolve().name}-Q3_K_M.gguf"
    a = {t.name: bytes(t.data) for t in gguf.GGUFReader(out / name).tensors}
    b = {t.name: bytes(t.data) for t in gguf.GGUFReader(plain / name).tensors}
    assert a["blk.0.ffn_down.weight"] != b["blk.0.ffn_down.weight"]  # weighted by the importance matrix
    assert a["output.weight"] == b["output.weight"]  # no importance for the output: reference rounding


@pytest.mark.slow
def test_cli_calib_on_a_mixture_of_experts_logs_routing_and_weights_experts(tmp_path):
    """--calib on a MoE model (once refused): per-layer routed-token counts in the log and the card, and the
    expert tensors weighted by their importance (per-expert semantics: tests/test_gguf_moe_calib.py)."""
    moe = Path("/work/shared/models/moe-mixtral/base")
    if not (moe / "config.json").is_file():
        pytest.skip("the shared tiny Mixtral is not here")
    calib = tmp_path / "c.txt"
    calib.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune "
                     "must be in want of a wife. " * 200)
    out, plain = tmp_path / "o", tmp_path / "p"
    r = cli("quantize", moe, "-o", out, "--method", "gguf", "--gguf-type", "Q4_K_M", "--calib", calib,
            "--samples", "4", "--seqlen", "64", "-q")
    assert r.returncode == 0, r.stderr
    lines = [x for x in (r.stdout + r.stderr).splitlines() if "routed tokens per expert (256 tokens, top-2)" in x]
    assert [x.split(":")[0] for x in lines] == [f"layer {i}" for i in range(4)], lines
    assert "## Mixture of experts" in (out / "README.md").read_text()
    assert cli("quantize", moe, "-o", plain, "--method", "gguf", "--gguf-type", "Q4_K_M", "-q").returncode == 0
    a = {t.name: bytes(t.data) for t in gguf.GGUFReader(out / "base-Q4_K_M.gguf").tensors}
    b = {t.name: bytes(t.data) for t in gguf.GGUFReader(plain / "base-Q4_K_M.gguf").tensors}
    assert a["blk.0.ffn_gate_exps.weight"] != b["blk.0.ffn_gate_exps.weight"]
    assert a["blk.0.ffn_gate_inp.weight"] == b["blk.0.ffn_gate_inp.weight"]  # the router: not quantized
