"""Quantizing mixture-of-experts models (see docs/quantize.md, *Mixture-of-experts models*).

References are built here, independently of mergequant's MoE code: transformers' own fused experts
module and router, the source model run in float32 with its layer-0 attention replaced by our
dequantized weights (what the quantizer's experts see in true-sequential order), Hessians
``2/n XᵀX`` from those activations, and separate GPTQ solves per expert on them.

- ``UnfusedExperts`` computes what transformers' fused module computes, in both calibration modes,
  and all-token calibration hands every expert's gate/up one shared input holding every token.
- All-token GPTQ: one Hessian for every expert's gate/up, equal to the reference from all tokens;
  each expert's down Hessian from all tokens through its own quantized gate/up; codes equal separate
  per-expert solves on those Hessians.
- Routed GPTQ: Hessians from the routed tokens only; starved experts are round-to-nearest (their
  codes equal RTN's), named in the log and the card.
- ``--moe-names gptqmodel`` renames, never changes numbers; fused inputs quantize like per-expert ones.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli
from mergequant.architectures import ARCHITECTURES
from mergequant.evaluate import load_dequantized
from mergequant.hardware import fast_bfloat16
from mergequant.io.checkpoint import Checkpoint
from mergequant.quant import formats
from mergequant.quant.gptq import gptq_quantize
from mergequant.quant.gptq_method import GPTQMethod, RTNMethod
from mergequant.quant.moe import MoECalibration, UnfusedExperts
from mergequant.quant.quantize import QuantizeOptions, _calibration_ids, run_quantize

pytestmark = pytest.mark.slow  # quantizes tiny MoE models end to end

transformers = pytest.importorskip("transformers")

MIXTRAL = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "models" / "moe-mixtral" / "base",
                            Path("/work/shared/models/moe-mixtral/base")) if (p / "config.json").exists()), None)
needs_mixtral = pytest.mark.skipif(MIXTRAL is None, reason="shared tiny Mixtral missing")
ARCH = ARCHITECTURES["mixtral"]
SAMPLES, SEQLEN = 8, 64  # 512 calibration tokens: enough for a routed run to starve some experts


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    """Calibration text from the shared corpus (the tiny Mixtral was trained on it)."""
    corpus = (MIXTRAL or Path(".")).parents[2] / "corpus" / "shakespeare.txt" if MIXTRAL else None
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(corpus.read_text(encoding="utf-8")[:200_000] if corpus and corpus.exists() else
                 " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(4000)))
    return p


def _opts(out: Path, calib: Path, **kw) -> QuantizeOptions:
    base = dict(out=out, calib=str(calib), samples=SAMPLES, seqlen=SEQLEN, quiet=True, fsync=False, group_size=128)
    return QuantizeOptions(**(base | kw))


def _run_recording(model: Path, opts: QuantizeOptions, monkeypatch) -> tuple[list, list[str]]:
    """Run quantize in-process, recording every GPTQ solve: (layer, module names, Hessian), and the log."""
    solves, log = [], []
    orig = GPTQMethod._solve

    def spy(self, ctx, mods, lins, acc):
        solves.append((lins[0].layer, [lin.suffix for lin in lins], acc.hessian.clone()))
        return orig(self, ctx, mods, lins, acc)

    orig_batch = GPTQMethod._solve_batch

    def spy_batch(self, ctx, accs, mods, lins):  # experts' down projections (routed: also gate/up), one H each
        for group, acc in zip(lins, accs):
            solves.append((group[0].layer, [lin.suffix for lin in group], acc.hessian.clone()))
        batches.append([lin.suffix for group in lins for lin in group])
        return orig_batch(self, ctx, accs, mods, lins)

    batches: list = []
    monkeypatch.setattr(GPTQMethod, "_solve", spy)
    monkeypatch.setattr(GPTQMethod, "_solve_batch", spy_batch)
    run_quantize(model, opts, log=log.append)
    log.extend(f"(batch) {', '.join(b)}" for b in batches)
    monkeypatch.undo()
    return solves, log


def _reference_layer0(model: Path, quantized: Path, ids: torch.Tensor):
    """Layer 0 of the source model in float32 with our quantized attention: (the experts' input x
    [n, H], the router's top-k choices [n, k], the layer module)."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ck = Checkpoint.open(quantized)
    qcfg = ck.config["quantization_config"]
    layer = ref.model.layers[0]
    with torch.no_grad():
        for s in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, s).weight.copy_(
                RTNMethod.dequantize(ck.get, f"model.layers.0.self_attn.{s}", qcfg))
    seen = {}

    def hook(mod, args):
        seen.setdefault("x", []).append(args[0].reshape(-1, args[0].shape[-1]))
        raise StopIteration  # nothing after the MoE block's input is needed

    h = layer.mlp.register_forward_pre_hook(hook)
    with torch.no_grad():
        for chunk in ids.split(4):
            try:
                ref(chunk, use_cache=False)
            except StopIteration:
                pass
    h.remove()
    x = torch.cat(seen["x"])
    with torch.no_grad():
        _, _, top_k = layer.mlp.gate(x)
    return x, top_k, layer


def _hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (2.0 / x.shape[0] * x.T @ x).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# Our Hessians vs the reference: equal up to rounding (the runner's quantized attention computes with the
# solver's float32 scales, the reference with the float16 scales stored in the file: ~3e-4 apart); a
# Hessian from the wrong token set is more than ten times further off
CLOSE, FAR = 1e-3, 1e-2


def _codes(ck: Checkpoint, prefix: str, bits: int = 4) -> torch.Tensor:
    """Unpacked codes [K, N] of a GPTQ module in our output."""
    packed = ck.get(f"{prefix}.qweight")
    return formats.unpack_rows(packed, bits, packed.shape[0] * 32 // bits)


# ---- the un-fused experts module --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["all", "routed"])
def test_unfused_experts_compute_what_transformers_computes(mode):
    """Same output as transformers' fused MixtralExperts (whatever the calibration mode); with
    all-token calibration every expert's gate and up receive one shared tensor holding every token,
    routed calibration gives each expert exactly its routed tokens; routed counts are exact."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    calib = MoECalibration(mode)
    un = UnfusedExperts(4, 32, 48, block.experts.act_fn, layer=0, calib=calib, device="cpu")
    with torch.no_grad():
        for e, ex in enumerate(un):
            ex.gate_proj.weight.copy_(block.experts.gate_up_proj[e, :48])
            ex.up_proj.weight.copy_(block.experts.gate_up_proj[e, 48:])
            ex.down_proj.weight.copy_(block.experts.down_proj[e])
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        ref = block(x)
        _, weights, top_k = block.gate(x.reshape(-1, 32))
    seen = {}
    hooks = [getattr(ex, p).register_forward_pre_hook(lambda m, a, k=(e, p): seen.__setitem__(k, a[0]))
             for e, ex in enumerate(un) for p in ("gate_proj", "up_proj")]
    block.experts = un
    un.calibrating, un.counting = True, True
    with torch.no_grad():
        got = block(x)
    for hk in hooks:
        hk.remove()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    want_counts = [int((top_k == e).sum()) for e in range(4)]
    assert calib.tokens[0] == want_counts and sum(want_counts) == 80 * 2
    for e in range(4):
        assert seen[(e, "gate_proj")] is seen[(e, "up_proj")]
        if mode == "all":
            assert seen[(e, "gate_proj")] is seen[(0, "gate_proj")] and seen[(e, "gate_proj")].shape[0] == 80
        else:
            rows = (top_k == e).any(-1).nonzero().flatten()
            torch.testing.assert_close(seen[(e, "gate_proj")], x.reshape(-1, 32)[rows], rtol=0, atol=0)


# ---- GPTQ on the tiny Mixtral -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def all_token(tmp_path_factory, calib):
    """GPTQ with all-token calibration, recorded: (output, solves, log)."""
    mp = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("all") / "q"
    solves, log = _run_recording(MIXTRAL, _opts(out, calib), mp)
    return out, solves, log


@needs_mixtral
def test_all_token_hessians_and_codes(all_token, calib):
    out, solves, log = all_token
    opts = _opts(out, calib)
    ids = _calibration_ids(MIXTRAL, Checkpoint.open(MIXTRAL), opts)
    x, top_k, layer = _reference_layer0(MIXTRAL, out, ids)
    n_tok = SAMPLES * SEQLEN
    assert x.shape[0] == n_tok
    layer0 = [(names, H) for i, names, H in solves if i == 0]
    # one solve, one Hessian, for every expert's gate and up together
    gate_up = [(names, H) for names, H in layer0 if any(n.endswith("gate_proj") for n in names)]
    assert len(gate_up) == 1 and len(gate_up[0][0]) == 2 * 8
    H = _hessian(x)
    assert _rel(gate_up[0][1], H) < CLOSE
    assert _rel(gate_up[0][1], _hessian(x[(top_k == 0).any(-1)])) > FAR  # routed tokens would differ
    ck, src = Checkpoint.open(out), Checkpoint.open(MIXTRAL)
    # codes equal separate dense solves (gate alone, up alone) on that Hessian
    for e in (0, 5):
        for part in ("w1", "w3"):
            prefix = f"model.layers.0.block_sparse_moe.experts.{e}.{part}"
            res = gptq_quantize(src.get(f"{prefix}.weight").float(), gate_up[0][1], bits=4, group_size=128)
            assert torch.equal(_codes(ck, prefix), res.codes.to(torch.int32)), prefix
    # each down from all tokens, through the expert's own quantized gate/up
    downs = {names[0]: H for names, H in layer0 if names[0].endswith("down_proj")}
    assert len(downs) == 8
    qcfg = ck.config["quantization_config"]
    for e in (0, 5):
        g = RTNMethod.dequantize(ck.get, f"model.layers.0.block_sparse_moe.experts.{e}.w1", qcfg)
        u = RTNMethod.dequantize(ck.get, f"model.layers.0.block_sparse_moe.experts.{e}.w3", qcfg)
        # the experts' statistics products run in the checkpoint's bfloat16 where this CPU computes it
        # natively, else in float32 (see _expert_stats_dtype)
        sd = torch.bfloat16 if fast_bfloat16("cpu") else torch.float32
        xb, gb, ub = x.to(sd), g.to(sd), u.to(sd)
        h = torch.nn.functional.silu(xb @ gb.T) * (xb @ ub.T)
        Hd = _hessian(h.float())
        assert _rel(Hd, _hessian(torch.nn.functional.silu(x @ g.T) * (x @ u.T))) < 5e-3  # vs float32: close
        # (bfloat16 products round at the last bit differently for inputs that differ in float32's last bits)
        assert _rel(downs[f"mlp.experts.{e}.down_proj"], Hd) < 3 * CLOSE
        assert _rel(downs[f"mlp.experts.{e}.down_proj"], _hessian(h[(top_k == e).any(-1)])) > FAR
        # solved in one batch with the other experts' downs, the codes equal a separate solve's
        prefix = f"model.layers.0.block_sparse_moe.experts.{e}.w2"
        res = gptq_quantize(src.get(f"{prefix}.weight").float(), downs[f"mlp.experts.{e}.down_proj"], bits=4,
                            group_size=128)
        assert torch.equal(_codes(ck, prefix), res.codes.to(torch.int32)), prefix
    assert any(m.startswith("(batch) mlp.experts.0.down_proj, mlp.experts.1.down_proj") for m in log), \
        "the experts' down projections were not solved as one batch"
    # the log says how many tokens the router sent each expert: the reference routing's counts
    counts = [int((top_k == e).sum()) for e in range(8)]
    line = next(m for m in log if m.startswith("layer 0: routed tokens per expert"))
    assert line.endswith(", ".join(f"{e}:{c}" for e, c in enumerate(counts))), (line, counts)
    # the card and (where bfloat16 would be emulated) the log say which products the statistics came from
    name = str(sd).removeprefix("torch.")
    assert f"down-projection statistics come from {name} products" in (out / "README.md").read_text()
    assert any("statistics are computed in float32, not bfloat16" in m for m in log) == (sd == torch.float32)


@needs_mixtral
def test_routed_hessians_and_starved_fallback(tmp_path, calib, monkeypatch):
    """Routed calibration: an expert's Hessian comes from its routed tokens only; experts below the
    threshold are round-to-nearest (codes equal RTN's), said in the log and the card."""
    out = tmp_path / "routed"
    solves, log = _run_recording(MIXTRAL, _opts(out, calib, moe_calibration="routed", moe_min_share=0.3), monkeypatch)
    ids = _calibration_ids(MIXTRAL, Checkpoint.open(MIXTRAL), _opts(out, calib))
    x, top_k, _ = _reference_layer0(MIXTRAL, out, ids)
    counts = [int((top_k == e).sum()) for e in range(8)]
    need = int(0.3 * SAMPLES * SEQLEN * 2 / 8)
    starved = [e for e, c in enumerate(counts) if c < need]
    assert starved and len(starved) < 8, counts  # the threshold splits the experts (else pick another)
    layer0 = {tuple(names): H for i, names, H in solves if i == 0}
    fed = next(e for e in range(8) if e not in starved)
    H = layer0[(f"mlp.experts.{fed}.up_proj", f"mlp.experts.{fed}.gate_proj")]
    Href = _hessian(x[(top_k == fed).any(-1)])
    assert _rel(H, Href) < CLOSE and _rel(H, _hessian(x)) > FAR
    assert not any(f"mlp.experts.{e}." in n for e in starved for names in layer0 for n in names)
    line = next(m for m in log if m.startswith("layer 0: routed tokens per expert"))
    assert f"round-to-nearest for starved expert(s) {', '.join(map(str, starved))}" in line, line
    rtn = tmp_path / "rtn"
    run_quantize(MIXTRAL, QuantizeOptions(out=rtn, method="rtn", quiet=True, fsync=False), log=lambda m: None)
    ck, ckr = Checkpoint.open(out), Checkpoint.open(rtn)
    for e in starved:
        for part in ("w1", "w3", "w2"):
            name = f"model.layers.0.block_sparse_moe.experts.{e}.{part}.qweight"
            assert torch.equal(ck.get(name), ckr.get(name)), name
    name = f"model.layers.0.block_sparse_moe.experts.{fed}.w1.qweight"
    assert not torch.equal(ck.get(name), ckr.get(name))
    card = (out / "README.md").read_text()
    row = f"| 0 | {' '.join(map(str, counts))} | {', '.join(map(str, starved))} |"
    assert row in card.splitlines() and "Calibration: `routed`" in card, card


@pytest.fixture(scope="module")
def small(tmp_path_factory, calib) -> Path:
    """A quick GPTQ run (2 x 32 calibration tokens), original expert names."""
    out = tmp_path_factory.mktemp("small") / "q"
    run_quantize(MIXTRAL, _opts(out, calib, **SMALL), log=lambda m: None)
    return out


SMALL = {"samples": 2, "seqlen": 32}


@needs_mixtral
def test_gptqmodel_names_rename_only(small, tmp_path, calib):
    """--moe-names gptqmodel writes mlp.experts.E.gate_proj / mlp.gate and nothing under block_sparse_moe,
    with exactly the tensors of the original-named output."""
    renamed = tmp_path / "renamed"
    run_quantize(MIXTRAL, _opts(renamed, calib, moe_names="gptqmodel", **SMALL), log=lambda m: None)
    a, b = Checkpoint.open(small), Checkpoint.open(renamed)
    mapping = {n: "model.layers." + n.split(".", 3)[2] + "." + ARCH.to_memory(n.split(".", 3)[3])
               if n.startswith("model.layers.") else n for n in a.tensors}
    assert set(mapping.values()) == set(b.tensors)
    assert not any("block_sparse_moe" in n for n in b.tensors)
    assert "model.layers.0.mlp.experts.7.down_proj.qweight" in b.tensors and "model.layers.0.mlp.gate.weight" in b.tensors
    for n, m in mapping.items():
        assert torch.equal(a.get(n), b.get(m)), n
    ids = torch.randint(0, 2048, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_dequantized(a)(ids).logits, load_dequantized(b)(ids).logits, rtol=0, atol=0)


@needs_mixtral
def test_fused_input_quantizes_like_per_expert(small, tmp_path, calib):
    """A checkpoint in the fused layout (stacked here, as mergekit writes it) gives the same GPTQ output."""
    src = Checkpoint.open(MIXTRAL)
    fused: dict[str, torch.Tensor] = {}
    for name in src.tensors:
        m = re.match(r"(model\.layers\.\d+)\.block_sparse_moe\.(gate\.weight|experts\.(\d+)\.(w\d)\.weight)$", name)
        if not m:
            fused[name] = src.get(name).clone()
        elif m.group(2) == "gate.weight":
            fused[f"{m.group(1)}.mlp.gate.weight"] = src.get(name).clone()
        elif m.group(3) == "0" and m.group(4) == "w1":
            p = m.group(1) + ".block_sparse_moe.experts"
            fused[f"{m.group(1)}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([src.get(f"{p}.{e}.w1.weight"), src.get(f"{p}.{e}.w3.weight")]) for e in range(8)])
            fused[f"{m.group(1)}.mlp.experts.down_proj"] = torch.stack([src.get(f"{p}.{e}.w2.weight") for e in range(8)])
    d = tmp_path / "fused"
    d.mkdir()
    save_file(fused, d / "model.safetensors")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MIXTRAL / f, d / f)
    run_quantize(d, _opts(tmp_path / "q", calib, **SMALL), log=lambda m: None)
    a, b = Checkpoint.open(small), Checkpoint.open(tmp_path / "q")
    assert set(a.tensors) == set(b.tensors)
    for n in a.tensors:
        assert torch.equal(a.get(n), b.get(n)), n


@needs_mixtral
def test_moe_bad_inputs_one_line(tmp_path, calib):
    """Fewer experts on disk than config.json says, and unknown MoE options: one line, exit 2, no output."""
    d = tmp_path / "short"
    shutil.copytree(MIXTRAL, d)
    cfg = (d / "config.json").read_text().replace('"num_local_experts": 8', '"num_local_experts": 9')
    assert cfg != (d / "config.json").read_text()
    (d / "config.json").write_text(cfg)
    for args, want in ((["--method", "rtn"], "block_sparse_moe.experts.8.w3.weight is missing"),
                       (["--moe-calibration", "some"], "--moe-calibration must be one of all, routed"),
                       (["--moe-names", "vllm"], "--moe-names must be one of original, gptqmodel")):
        model = d if "rtn" in args else MIXTRAL
        proc = run_cli("quantize", model, "-o", tmp_path / "q", "--calib", calib, *args)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and want in lines[0], proc.stderr
        assert not (tmp_path / "q").exists()


@needs_mixtral
def test_dry_run_and_inspect(tmp_path, calib):
    """`quantize --dry-run` plans a MoE run (modules, experts, active parameters) and writes nothing;
    `inspect` reports experts, top-k, layout and active parameters, counted here from the shapes."""
    from mergequant.inspect_model import inspect_model

    src = Checkpoint.open(MIXTRAL)
    expert = sum(int(torch.Size(t.shape).numel()) for n, t in src.tensors.items() if ".experts." in n)
    total = sum(int(torch.Size(t.shape).numel()) for t in src.tensors.values())
    active = total - expert * 6 // 8  # top-2 of 8 experts run per token
    proc = run_cli("quantize", MIXTRAL, "-o", tmp_path / "q", "--calib", calib, "--dry-run", check=True)
    assert "112 Linear modules" in proc.stdout and f"{active:,} of {total:,} parameters active" in proc.stdout
    assert "GPTQModel.load refuses them" in proc.stdout and not (tmp_path / "q").exists()
    info = inspect_model(str(MIXTRAL))["experts"]
    assert info == {"experts": 8, "top_k": 2, "sparse_layers": 4, "layout": "per-expert",
                    "total_parameters": total, "active_parameters": active}


@needs_mixtral
def test_eval_never_trusts_transformers_with_quantized_experts(small, tmp_path):
    """`eval --backend transformers` of a quantized MoE is refused in one line (transformers would leave
    the experts random); the default scores it through the dequantizing loader."""
    data = tmp_path / "held.txt"
    data.write_text("To be, or not to be, that is the question. " * 40)
    proc = run_cli("eval", small, "--data", data, "--seqlen", 32, "--max-tokens", 64, "--backend", "transformers")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "cannot load quantized experts" in lines[0], proc.stderr
    proc = run_cli("eval", small, "--data", data, "--seqlen", 32, "--max-tokens", 64, "-q", check=True)
    assert "(stride 32; dequant)" in proc.stdout


@needs_mixtral
def test_release_file_plans_moe_quantizations(tmp_path, calib):
    """A release file quantizing a MoE model takes the MoE options and plans each step (names, memory);
    a bad one is refused in one line naming the step."""
    rel = tmp_path / "rel.yaml"
    body = (f"workdir: work\nmerge:\n  model: {MIXTRAL}\nquantize:\n"
            f"  - {{name: g, method: gptq, calib: {calib}, samples: 8, seqlen: 64, moe_calibration: routed, "
            "moe_names: NAMES}\n")
    rel.write_text(body.replace("NAMES", "gptqmodel"))
    proc = run_cli("run", rel, "--dry-run", check=True)
    assert re.search(r"run\s+quantize/g .*writes ~7\.\d+ MiB, peak memory ~", proc.stdout), proc.stdout
    rel.write_text(body.replace("NAMES", "vllm"))
    proc = run_cli("run", rel, "--dry-run")
    assert proc.returncode == 2 and "quantize g: --moe-names must be one of original, gptqmodel" in proc.stderr
    assert not (tmp_path / "work").exists()
