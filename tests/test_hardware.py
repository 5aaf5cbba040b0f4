"""Which 16-bit products run fast (mergequant.hardware), and the choices made from it: the experts'
statistics dtype (GPTQ on MoE), the full-precision evaluation dtype, the --calib-dtype warning."""

from __future__ import annotations

import math
import types

import pytest
import torch

from mergequant import hardware


@pytest.fixture
def cpu(monkeypatch):
    """A fake CPU: set its flags, torch's own checks and the machine name."""
    state = {"flags": frozenset(), "torch": {}, "machine": "x86_64"}
    monkeypatch.setattr(hardware, "_cpu_flags", lambda *a: state["flags"])
    monkeypatch.setattr(hardware, "_torch_cpu_check", lambda name: state["torch"].get(name))
    monkeypatch.setattr(hardware.platform, "machine", lambda: state["machine"])
    return state


def test_cpu_flags_parsed_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimdhp bf16 sve\nCPU implementer\t: 0x41\n")
    assert hardware._cpu_flags(str(x86)) == {"fpu", "sse2", "avx2", "avx512_bf16"}
    assert {"bf16", "asimdhp"} <= hardware._cpu_flags(str(arm))
    assert hardware._cpu_flags(str(tmp_path / "none")) == frozenset()


@pytest.mark.parametrize("flags, checks, machine, bf16, fp16", [
    ({"avx2", "fma", "f16c"}, {}, "x86_64", None, None),  # the AVX2 CPU measured: both emulated
    ({"avx512f", "avx512_bf16"}, {}, "x86_64", "AVX-512 BF16", None),
    (set(), {"_is_avx512_bf16_supported": True}, "x86_64", "AVX-512 BF16", None),  # torch's check alone
    ({"avx512_bf16", "amx_bf16", "amx_fp16"}, {}, "x86_64", "AMX", "AMX-FP16"),
    ({"avx512_fp16"}, {}, "x86_64", None, "AVX-512 FP16"),
    ({"bf16", "asimdhp"}, {}, "aarch64", "Arm BF16", "Arm FP16"),
    ({"bf16"}, {}, "x86_64", None, None),  # an Arm feature name means nothing on x86
])
def test_instruction_sets(cpu, flags, checks, machine, bf16, fp16):
    cpu.update(flags=frozenset(flags), torch=checks, machine=machine)
    assert hardware.cpu_bfloat16_instructions() == bf16
    assert hardware.cpu_float16_instructions() == fp16
    assert hardware.fast_bfloat16("cpu") is (bf16 is not None)
    assert hardware.fast_16bit(torch.bfloat16, "cpu") is (bf16 is not None)
    assert hardware.fast_16bit(torch.float16, "cpu") is (fp16 is not None)
    assert hardware.fast_16bit(torch.float32, "cpu") is True


def test_this_machine_agrees_with_its_cpuinfo():
    """The real check on this machine: bfloat16 is fast exactly when /proc/cpuinfo lists an instruction set."""
    flags = hardware._cpu_flags()
    listed = bool({"avx512_bf16", "amx_bf16"} & flags) or (hardware.platform.machine() == "aarch64" and "bf16" in flags)
    torch_says = bool(hardware._torch_cpu_check("_is_avx512_bf16_supported") or hardware._torch_cpu_check("_is_amx_tile_supported"))
    assert hardware.fast_bfloat16("cpu") is (listed or torch_says)


# ---- the experts' statistics dtype ------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
def test_expert_statistics_in_bfloat16_only_where_it_is_fast(monkeypatch, fast):
    from mergequant.quant.gptq_method import _expert_stats_dtype

    monkeypatch.setattr(hardware, "fast_bfloat16", lambda device="cpu": fast)
    bf16 = types.SimpleNamespace(hidden=[torch.zeros(2, 3, dtype=torch.bfloat16)])
    f32 = types.SimpleNamespace(hidden=[torch.zeros(2, 3)])
    assert _expert_stats_dtype(bf16) == (torch.bfloat16 if fast else None)
    assert _expert_stats_dtype(f32) is None  # a float32 checkpoint: always its own dtype
    assert _expert_stats_dtype(types.SimpleNamespace(hidden=[])) is None


# ---- --calib-dtype bfloat16 -----------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
def test_calib_dtype_bfloat16_warns_where_it_is_slow(monkeypatch, fast):
    from mergequant.quant.quantize import QuantizeOptions, calib_dtype_notes

    monkeypatch.setattr(hardware, "fast_bfloat16", lambda device="cpu": fast)
    opts = QuantizeOptions(out="unused", method="gptq", calib_dtype="bfloat16", device="cpu")
    notes = calib_dtype_notes(opts)
    assert (notes == []) is fast
    if not fast:
        assert notes[0].startswith("warning: --calib-dtype bfloat16: this CPU has no bfloat16 instructions")
    assert calib_dtype_notes(QuantizeOptions(out="unused", method="gptq", device="cpu")) == []  # float32


# ---- evaluation ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    from mergequant.demo import build_tiny_llama

    path = tmp_path_factory.mktemp("bf16") / "llama"
    build_tiny_llama(path, dtype=torch.bfloat16, shards=1)
    return path


def _reference_ppl(path, ids, dtype) -> float:
    """Perplexity of ``ids`` [1, T] under transformers' own model in ``dtype`` (one window)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        logits = model(ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(nll.item())


@pytest.mark.parametrize("fast", [True, False])
def test_full_precision_eval_computes_in_float32_where_16bit_is_slow(monkeypatch, bf16_llama, tmp_path, fast):
    """A bfloat16 checkpoint is evaluated in bfloat16 where the CPU computes it natively, in float32 (the
    same weights, exact) where it would be emulated; checked against transformers' own forward in each."""
    from mergequant.evaluate import evaluate_model
    from mergequant.quant.calib import load_tokenizer

    monkeypatch.setattr(hardware, "fast_16bit", lambda dtype, device="cpu": fast)
    data = tmp_path / "text.txt"
    data.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 3)
    log = []
    res = evaluate_model(str(bf16_llama), str(data), seqlen=256, device="cpu", progress=False, log=log.append)
    tok = load_tokenizer(bf16_llama, "eval")
    ids = torch.tensor([tok(data.read_text())["input_ids"]])
    assert res.windows == 1 and res.tokens == ids.shape[1] - 1  # every token but the first is scored
    want = _reference_ppl(bf16_llama, ids, torch.bfloat16 if fast else torch.float32)
    other = _reference_ppl(bf16_llama, ids, torch.float32 if fast else torch.bfloat16)
    assert res.perplexity == pytest.approx(want, rel=1e-5)
    assert abs(res.perplexity - other) > 1e-5 * other  # the two precisions are told apart
    assert any("evaluated in float32, not bfloat16" in m for m in log) is (not fast)
