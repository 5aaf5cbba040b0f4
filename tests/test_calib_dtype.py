"""``--calib-dtype bfloat16``: GPTQ's calibration forward in bfloat16 (what the model runs in).

- the layers really compute in bfloat16 (the runner's dtype, and the activations the Hessians see);
- the result is still a GPTQ result: closer to the full-precision model than round-to-nearest, and
  close to the float32-calibrated checkpoint;
- nothing else is rounded: norms of a float32 checkpoint are written as float32 -> float16, exactly as
  with a float32 calibration (they are not passed through bfloat16 copies);
- the card says so; a bad value is one line; methods that do not read it say it is ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mergequant.evaluate import load_dequantized
from mergequant.io.checkpoint import Checkpoint
from mergequant.quant.gptq import HessianAccumulator
from mergequant.quant.quantize import QuantizeOptions, run_quantize
from mergequant.quant.runner import LayerRunner

from helpers import cli, load_dir

TEXT = "\n".join(f"Line {i}: It is a truth universally acknowledged, that a single man in possession of a good "
                 "fortune must be in want of a wife; to be or not to be." for i in range(400))


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("c") / "calib.txt"
    f.write_text(TEXT)
    return f


def _run(model, out, calib, monkeypatch=None, **kw):
    opts = QuantizeOptions(out=out, calib=str(calib), quiet=True, fsync=False, bits=3, group_size=32, samples=16,
                           seqlen=64, **kw)
    return run_quantize(model, opts, log=lambda m: None)


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_dequantized(Checkpoint.open(model_dir)).float().eval()(ids).logits


def test_bfloat16_calibration_computes_in_bfloat16_and_stays_gptq(tiny_models, calib, tmp_path, monkeypatch):
    model = tiny_models["a"]  # float32, norms not representable in bfloat16 (a perturbed fine-tune)
    seen = {"runner": set(), "hessian_inputs": set()}
    init, add = LayerRunner.__init__, HessianAccumulator.add

    def spy_init(self, *a, **k):
        init(self, *a, **k)
        seen["runner"].add(self.dtype)

    def spy_add(self, x):
        seen["hessian_inputs"].add(x.dtype)
        return add(self, x)

    monkeypatch.setattr(LayerRunner, "__init__", spy_init)
    monkeypatch.setattr(HessianAccumulator, "add", spy_add)
    _run(model, tmp_path / "b16", calib, calib_dtype="bfloat16")
    assert seen == {"runner": {torch.bfloat16}, "hessian_inputs": {torch.bfloat16}}
    monkeypatch.undo()
    _run(model, tmp_path / "f32", calib)
    _run(model, tmp_path / "rtn", calib, method="rtn")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids = torch.tensor([tok(TEXT[:3000], add_special_tokens=False)["input_ids"][:192]])  # text like the calibration's
    with torch.no_grad():

        full = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()(ids).logits
    err = {k: float((_logits(tmp_path / k, ids) - full).pow(2).mean()) for k in ("b16", "f32", "rtn")}
    assert err["b16"] < 0.8 * err["rtn"], err  # a real GPTQ solve, not a rounding
    assert err["b16"] < 1.25 * err["f32"], err  # and about as good as the float32 calibration

    b16, f32, src = load_dir(tmp_path / "b16"), load_dir(tmp_path / "f32"), load_dir(model)
    norms = [k for k in src if k.endswith("norm.weight")]
    assert norms and any(not torch.equal(src[k].bfloat16().float(), src[k]) for k in norms)  # the test can fail
    for k in norms:
        assert torch.equal(b16[k], src[k].to(torch.float16)), k
        assert torch.equal(b16[k], f32[k]), k
    assert sum(not torch.equal(b16[k], f32[k]) for k in b16 if k.endswith("qweight")) > 0  # the codes did change
    card = (tmp_path / "b16" / "README.md").read_text()
    assert "| calibration forward dtype | bfloat16 |" in card
    assert "calibration forward dtype" not in (tmp_path / "f32" / "README.md").read_text()


def test_calib_dtype_bad_values_and_ignored(tiny_models, calib, tmp_path):
    r = cli("quantize", str(tiny_models["base"]), "-o", str(tmp_path / "x"), "--calib", str(calib),
            "--calib-dtype", "float16", "--dry-run")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == "error: --calib-dtype must be one of float32, bfloat16, got 'float16'"
    assert not (tmp_path / "x").exists()
    r = cli("quantize", str(tiny_models["base"]), "-o", str(tmp_path / "y"), "--method", "rtn", "--group-size", "32", "--calib-dtype",
            "bfloat16", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "--calib-dtype does not apply to --method rtn; it is ignored" in r.stdout + r.stderr
    r = cli("quantize", str(tiny_models["base"]), "-o", str(tmp_path / "z"), "--calib", str(calib), "--group-size", "32",
            "--calib-dtype", "bfloat16", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert re.search(r"calibration: [0-9,]+ tokens, forward passes in bfloat16\n", r.stdout), r.stdout
