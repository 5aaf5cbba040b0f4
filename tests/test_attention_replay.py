"""GPTQ replays a layer's attention output once the attention's Linears are quantized
(``mergequant.quant.replay``): the checkpoint must be byte-identical to the one computed without the
replay (which recomputes the attention in every pass), and the replay must really be used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mergequant.quant import replay as replay_mod
from mergequant.quant.quantize import QuantizeOptions, run_quantize
from mergequant.quant.replay import AttentionReplay

from helpers import load_dir

TEXT = "\n".join(f"Line {i}: It is a truth universally acknowledged, that a single man in possession of a good "
                 "fortune must be in want of a wife." for i in range(400))
MIXTRAL = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "models" / "moe-mixtral" / "base",
                            Path("/work/shared/models/moe-mixtral/base")) if (p / "config.json").exists()), None)


class _Attention(nn.Module):
    """Stands in for an attention module: (output, weights) from a Linear, counting its calls."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x, *args, **kwargs):
        self.calls += 1
        return self.proj(x) * 2, None


def test_replay_records_one_pass_then_returns_the_recording():
    torch.manual_seed(0)
    attn = _Attention()
    chunks = [torch.randn(2, 3, 4) for _ in range(3)]
    rep = AttentionReplay.install(attn, len(chunks), tokens=18, width=4, dtype=torch.float32)
    assert rep is not None and attn.forward is rep
    first = [attn(x)[0] for x in chunks]  # the recording pass computes
    assert attn.calls == 3
    for _ in range(2):  # later passes: the recorded outputs, nothing computed
        again = [attn(x)[0] for x in chunks]
        assert all(a is b for a, b in zip(again, first))
    assert attn.calls == 3 and rep.replayed == 6
    # an input that is not the recorded chunk's: computed, never a wrong recording
    other = torch.randn(2, 3, 4)
    out = attn(other)[0]
    assert attn.calls == 4 and rep.recomputed == 1
    torch.testing.assert_close(out, attn.proj(other) * 2)


def test_replay_installed_with_a_recording_never_computes_it():
    from mergequant.quant.replay import checksum

    torch.manual_seed(1)
    attn = _Attention()
    chunks = [torch.randn(2, 3, 4) for _ in range(2)]
    made = [(torch.randn(2, 3, 4), None) for _ in chunks]
    rep = AttentionReplay.install_recorded(attn, [checksum(x) for x in chunks], made)
    assert rep is not None and attn.forward is rep
    for _ in range(2):
        assert all(attn(x)[0] is m[0] for x, m in zip(chunks, made))
    assert attn.calls == 0 and rep.replayed == 4
    # a chunk that differs from the recorded one in a single element is computed, not replayed
    changed = chunks[0].clone()
    changed[1, 2, 3] += 1
    attn(changed)
    attn(chunks[1])
    assert attn.calls == 1 and rep.recomputed == 1
    assert AttentionReplay.install_recorded(attn, [], []) is None  # already installed / nothing recorded


def test_replay_is_not_installed_beyond_its_budget(monkeypatch):
    attn = _Attention()
    monkeypatch.setattr(replay_mod, "REPLAY_BYTES", 100)
    assert AttentionReplay.install(attn, 2, tokens=10, width=4, dtype=torch.float32) is None  # 160 bytes
    assert "forward" not in attn.__dict__
    assert AttentionReplay.install(attn, 2, tokens=10, width=4, dtype=torch.bfloat16) is not None  # 80 bytes


def _quantize_counting(model: Path, out: Path, calib: Path, monkeypatch, budget: int, **kw) -> list[AttentionReplay]:
    """Run GPTQ with the replay budget ``budget``; the replays installed (one per layer if it fits)."""
    installed = []

    def counting(name):
        orig = getattr(AttentionReplay, name).__func__

        def install(cls, *a, **k):
            r = orig(cls, *a, **k)
            if r is not None:
                r.kind = name
                installed.append(r)
            return r
        return classmethod(install)

    monkeypatch.setattr(replay_mod, "REPLAY_BYTES", budget)
    monkeypatch.setattr(AttentionReplay, "install", counting("install"))
    monkeypatch.setattr(AttentionReplay, "install_recorded", counting("install_recorded"))
    opts = QuantizeOptions(out=out, method="gptq", calib=str(calib), quiet=True, fsync=False, **kw)
    run_quantize(model, opts, log=lambda m: None)
    monkeypatch.undo()
    return installed


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = load_dir(a), load_dir(b)
    assert set(ta) == set(tb)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("desc_act", [False, True])
def test_dense_gptq_with_replay_equals_without(tiny_models, tmp_path, monkeypatch, desc_act):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    kw = dict(bits=4, group_size=32, desc_act=desc_act, samples=8, seqlen=64, batch_size=2)  # 4 chunks
    used = _quantize_counting(tiny_models["base"], tmp_path / "replay", calib, monkeypatch, 1 << 30, **kw)
    none = _quantize_counting(tiny_models["base"], tmp_path / "plain", calib, monkeypatch, 0, **kw)
    assert len(used) == 2 and not none  # one per layer
    # per layer: built from the o_proj pass (the attention is computed once per chunk, there), then
    # replayed in the gate/up pass, the down pass and the output pass
    assert all(r.kind == "install_recorded" for r in used)
    assert all(len(r.outputs) == 4 and r.replayed == 12 and r.recomputed == 0 for r in used)
    _assert_same_checkpoint(tmp_path / "replay", tmp_path / "plain")


@pytest.mark.slow
@pytest.mark.skipif(MIXTRAL is None, reason="shared tiny Mixtral missing")
@pytest.mark.parametrize("mode", ["all", "routed"])
def test_moe_gptq_with_replay_equals_without(tmp_path, monkeypatch, mode):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    kw = dict(bits=4, group_size=128, samples=8, seqlen=64, batch_size=4, moe_calibration=mode)  # 2 chunks
    used = _quantize_counting(MIXTRAL, tmp_path / "replay", calib, monkeypatch, 1 << 30, **kw)
    none = _quantize_counting(MIXTRAL, tmp_path / "plain", calib, monkeypatch, 0, **kw)
    assert len(used) == 4 and not none
    assert all(r.replayed >= 4 and r.recomputed == 0 for r in used)  # expert down pass(es) and output pass
    _assert_same_checkpoint(tmp_path / "replay", tmp_path / "plain")


# ---- the experts' gate/up products, kept for the output pass (moe.ExpertActivationReplay) --------------------

def test_routed_from_kept_activations_equals_the_routed_forward():
    from mergequant.quant.moe import MoECalibration, UnfusedExperts

    torch.manual_seed(3)
    mod = UnfusedExperts(4, 8, 12, nn.SiLU(), 0, MoECalibration("routed"), device="cpu")
    x = torch.randn(40, 8)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(40)])
    idx[idx == 3] = 0  # expert 3 gets no token
    w = torch.rand(40, 2)
    ref = mod(x, idx, w)
    acts = {e: mod.routed_activations(x, idx, e) for e in (0, 1, 3)}  # expert 2 left to compute
    assert acts[3].shape[0] == 0
    assert torch.equal(mod.routed_from(acts, x, idx, w), ref)


def _fp32_mixtral(tmp_path: Path) -> Path:
    from test_architectures import _model, _save

    return _save(_model("mixtral", seed=7), tmp_path / "mixtral")


@pytest.mark.slow
def test_routed_gptq_with_kept_expert_activations_equals_without(tmp_path, monkeypatch):
    """Float32 model, routed calibration: keeping the experts' routed gate/up products for the output pass
    gives the very checkpoint computed without keeping them, and the kept products are really used."""
    from mergequant.quant import gptq_method
    from mergequant.quant.moe import ExpertActivationReplay

    model = _fp32_mixtral(tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    kw = dict(bits=4, group_size=32, samples=8, seqlen=32, batch_size=4, moe_calibration="routed", moe_min_share=0.0)
    installed = []
    orig = ExpertActivationReplay.install.__func__

    def install(cls, *a, **k):
        r = orig(cls, *a, **k)
        installed.append(r)
        return r

    def run(out: Path, budget: int):
        monkeypatch.setattr(gptq_method, "EXPERT_REPLAY_BYTES", budget)
        monkeypatch.setattr(ExpertActivationReplay, "install", classmethod(install))
        run_quantize(model, QuantizeOptions(out=out, method="gptq", calib=str(calib), quiet=True, fsync=False, **kw),
                     log=lambda m: None)
        monkeypatch.undo()

    run(tmp_path / "kept", 1 << 30)
    assert len(installed) == 2 and all(r is not None and r.replayed == 2 and r.recomputed == 0 for r in installed)
    installed.clear()
    run(tmp_path / "plain", 0)
    assert not installed
    _assert_same_checkpoint(tmp_path / "kept", tmp_path / "plain")


# ---- the experts' input, kept from the gate/up pass for the down projections' pass ---------------------------

def test_gate_up_into_a_float32_buffer_rounds_like_converting_afterwards():
    from mergequant.quant.moe import MoECalibration, UnfusedExperts

    torch.manual_seed(4)
    mod = UnfusedExperts(2, 16, 24, nn.SiLU(), 0, MoECalibration(), device="cpu").to(torch.bfloat16)
    x = torch.randn(50, 16).to(torch.bfloat16)
    buf = torch.full((50, 24), float("nan"))
    with torch.no_grad():  # (as every statistics pass runs)
        got = mod.gate_up(1, x, out=buf)
        assert got.data_ptr() == buf.data_ptr() and got.dtype == torch.float32
        assert torch.equal(got, mod.gate_up(1, x).float())


def _count_expert_passes(monkeypatch) -> list[str]:
    """Spy on GPTQ's runs of a layer up to its experts: one entry per pass that ran the layer."""
    from mergequant.quant.gptq_method import GPTQMethod

    passes = []
    orig = GPTQMethod._expert_inputs

    def spy(layer, inputs):
        passes.append("run")
        yield from orig(layer, inputs)

    monkeypatch.setattr(GPTQMethod, "_expert_inputs", staticmethod(spy))
    return passes


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["all", "routed"])
def test_moe_gptq_with_kept_expert_inputs_equals_without(tmp_path, monkeypatch, mode):
    """The down projections' statistics read the experts' input kept by the gate/up pass (all-token: in
    the statistics dtype: bfloat16 for the shared bfloat16 Mixtral on a CPU with bfloat16 instructions)
    instead of running the layer again; the checkpoint is the one computed with the layer run again."""
    from mergequant.quant import gptq_method

    model = MIXTRAL if mode == "all" else _fp32_mixtral(tmp_path)
    if model is None:
        pytest.skip("shared tiny Mixtral missing")
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    kw = dict(bits=4, group_size=32, samples=8, seqlen=32, batch_size=4, moe_calibration=mode, moe_min_share=0.0)
    layers = 0
    for name, budget in (("kept", 1 << 30), ("plain", 0)):
        passes = _count_expert_passes(monkeypatch)
        monkeypatch.setattr(gptq_method, "EXPERT_INPUT_BYTES", budget)
        run_quantize(model, QuantizeOptions(out=tmp_path / name, method="gptq", calib=str(calib), quiet=True,
                                            fsync=False, **kw), log=lambda m: None)
        monkeypatch.undo()
        if name == "kept":
            layers = len(passes)  # only the gate/up pass of each layer ran it
        else:
            assert len(passes) == 2 * layers > 0  # and the down pass too
    _assert_same_checkpoint(tmp_path / "kept", tmp_path / "plain")
