"""`--method gguf` of ``BASE+ADAPTER`` and of an adapter-only folder: the LoRA adapter is applied tensor by tensor
as the writer reads the weights (nothing merged is written), the tokenizer comes from the adapter folder when it
has one, the files are named after the adapter (``<adapter>-<T>.gguf``), the card and the log name the base and
the adapter, and an output inside either input is refused.

Reference: the same adapter merged with peft's own ``merge_and_unload`` in float32 and saved as a model folder
(with the tokenizer), quantized the same way. Every F32 tensor is within 1e-6 relative of the reference file's;
the Q8_0 files are byte-identical in tensor data (checked: our float32 ``W + s * B @ A`` and peft's merge agree
to the last bit on this model, so no Q8_0 block differs; the test fails if one does); the metadata is equal except
``general.name``. ``--calib``: the importance matrix is collected through the adapted weights (it differs from the
base's own and equals the merged model's within float32 rounding). Tiny float32 Llama, random r=4 adapter.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("peft")

from helpers import TINY, cli, random_lora  # noqa: E402

TYPES = ("--gguf-type", "F32", "--gguf-type", "Q8_0", "-q")
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune must be " \
       "in want of a wife. " * 200


def _merged_by_peft(base: Path, adapter: Path, out: Path) -> Path:
    """peft's own merge_and_unload in float32, saved as a model folder with the base's tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from mergequant.demo import build_tiny_llama

    root = tmp_path_factory.mktemp("ggad")
    base = build_tiny_llama(root / "base", seed=0, dtype=torch.float32, layers=2, **TINY)
    lora = random_lora(base, root / "lora", seed=3)
    return {"root": root, "base": base, "lora": lora, "merged": _merged_by_peft(base, lora, root / "merged")}


@pytest.fixture(scope="module")
def written(models) -> dict[str, Path]:
    """``--gguf-type F32 --gguf-type Q8_0`` of BASE+ADAPTER and of peft's merged folder."""
    root = models["root"]
    out = {"adapted": root / "out-adapted", "merged": root / "out-merged"}
    r = cli("quantize", f"{models['base']}+{models['lora']}", "-o", out["adapted"], "--method", "gguf", *TYPES)
    assert r.returncode == 0, r.stderr
    out["adapted_log"] = r.stderr
    r = cli("quantize", models["merged"], "-o", out["merged"], "--method", "gguf", *TYPES)
    assert r.returncode == 0, r.stderr
    return out


def _tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _metadata(path: Path) -> dict:
    out = {}
    for name, f in gguf.GGUFReader(path).fields.items():
        if name.startswith("GGUF.") or name == "general.name":
            continue
        out[name] = [bytes(f.parts[i]) for i in f.data]
    return out


@pytest.mark.slow
def test_adapted_gguf_equals_peft_merged(models, written):
    a, m = written["adapted"], written["merged"]
    assert sorted(p.name for p in a.iterdir()) == ["README.md", "lora-F32.gguf", "lora-Q8_0.gguf"]
    assert gguf.GGUFReader(a / "lora-F32.gguf").fields["general.name"].contents() == "lora"
    # F32: every tensor within 1e-6 relative of peft's merge
    ours, ref = _tensors(a / "lora-F32.gguf"), _tensors(m / "merged-F32.gguf")
    assert sorted(ours) == sorted(ref)
    for name, t in ref.items():
        x, y = np.asarray(ours[name].data, np.float64), np.asarray(t.data, np.float64)
        assert x.shape == y.shape, name
        scale = max(float(np.abs(y).max()), 1e-30)
        assert float(np.abs(x - y).max()) <= 1e-6 * scale, name
    # Q8_0: byte-identical tensor data
    ours, ref = _tensors(a / "lora-Q8_0.gguf"), _tensors(m / "merged-Q8_0.gguf")
    assert sorted(ours) == sorted(ref)
    diff = [n for n in ref if bytes(ours[n].data) != bytes(ref[n].data)]
    assert not diff, f"Q8_0 tensors differ from peft's merge: {diff}"
    for ft in ("F32", "Q8_0"):
        assert _metadata(a / f"lora-{ft}.gguf") == _metadata(m / f"merged-{ft}.gguf"), ft


@pytest.mark.slow
def test_the_adapter_is_really_applied(models, written, tmp_path):
    """A control for the comparison above: the base's own files differ where the adapter touches it."""
    out = tmp_path / "o"
    assert cli("quantize", models["base"], "-o", out, "--method", "gguf", *TYPES).returncode == 0
    ours, base = _tensors(written["adapted"] / "lora-F32.gguf"), _tensors(out / "base-F32.gguf")
    changed = {n for n in base if not np.array_equal(np.asarray(ours[n].data), np.asarray(base[n].data))}
    assert changed == {f"blk.{i}.{t}.weight" for i in range(2) for t in ("attn_q", "attn_v", "ffn_down")}


@pytest.mark.slow
def test_card_and_log_name_the_base_and_the_adapter(models, written):
    from mergequant.card import validate_card

    text = (written["adapted"] / "README.md").read_text()
    validate_card(text)
    ref = f"{models['base']}+{models['lora']}"
    assert "# lora (GGUF)" in text and "## Adapters" in text
    assert f"- `{ref}`: LoRA r=4 alpha=8 adapter `{models['lora']}` on base `{models['base']}`" in text
    assert f"note: {ref}: LoRA r=4 alpha=8 adapter {models['lora']} on base {models['base']}" in written["adapted_log"]


@pytest.mark.slow
def test_adapter_only_folder_uses_the_base_its_config_names(models, written, tmp_path):
    import json

    cfg = json.loads((models["lora"] / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).resolve() == models["base"].resolve()
    out = tmp_path / "o"
    r = cli("quantize", models["lora"], "-o", out, "--method", "gguf", *TYPES)
    assert r.returncode == 0, r.stderr
    assert "base_model_name_or_path" in r.stderr
    for ft in ("F32", "Q8_0"):
        assert (out / f"lora-{ft}.gguf").read_bytes() == (written["adapted"] / f"lora-{ft}.gguf").read_bytes(), ft
    assert "(the base named by the adapter's `base_model_name_or_path`)" in (out / "README.md").read_text()


def test_tokenizer_comes_from_the_adapter_folder_when_it_has_one(models, tmp_path):
    """An adapter folder with its own tokenizer files: those are read (a broken one is refused, naming it)."""
    lora = shutil.copytree(models["lora"], tmp_path / "lora2")
    (lora / "tokenizer.json").write_text('{"model": {"type": "Unigram"}}')
    r = cli("quantize", f"{models['base']}+{lora}", "-o", tmp_path / "o", "--method", "gguf", "--gguf-type", "Q8_0",
            "--dry-run")
    assert r.returncode != 0 and str(lora / "tokenizer.json") in r.stderr, r.stderr


def test_dry_run(models, tmp_path):
    ref = f"{models['base']}+{models['lora']}"
    r = cli("quantize", ref, "-o", tmp_path / "dry", "--method", "gguf", "--gguf-type", "Q8_0", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "lora-Q8_0.gguf" in r.stdout and f"note: {ref}: LoRA r=4" in r.stdout
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize("inside", ["base", "lora"])
def test_output_inside_an_input_is_refused(models, inside):
    out = models[inside] / "gguf-out"
    r = cli("quantize", f"{models['base']}+{models['lora']}", "-o", out, "--method", "gguf", "--gguf-type", "Q8_0")
    assert r.returncode == 2 and "inside the input model" in r.stderr and not out.exists(), r.stderr


@pytest.mark.slow
def test_calib_collects_the_importance_matrix_through_the_adapter(models, tmp_path):
    from mergequant.gguf.driver import collect_imatrix
    from mergequant.io.checkpoint import Checkpoint
    from mergequant.peft.adapted import open_model
    from mergequant.quant.quantize import QuantizeOptions

    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    ref = f"{models['base']}+{models['lora']}"
    opts = QuantizeOptions(out=tmp_path / "x", method="gguf", gguf_types=["Q4_0"], calib=str(calib), samples=4,
                           seqlen=64)
    quiet = lambda m: None  # noqa: E731
    adapted, _ = collect_imatrix(Path(ref), open_model(ref, hub=False), opts, quiet)
    merged, _ = collect_imatrix(models["merged"], Checkpoint.open(models["merged"]), opts, quiet)
    base, _ = collect_imatrix(models["base"], Checkpoint.open(models["base"]), opts, quiet)
    assert sorted(adapted) == sorted(merged) == sorted(base)
    for k in adapted:
        np.testing.assert_allclose(adapted[k], merged[k], rtol=1e-4, atol=1e-7, err_msg=k)
    # v_proj (layer 0) changes o_proj's inputs; layer 1 sees layer 0's adapted outputs
    differ = {k for k in adapted if not np.allclose(adapted[k], base[k], rtol=1e-3, atol=0)}
    assert "model.layers.0.self_attn.o_proj" in differ and any(k.startswith("model.layers.1.") for k in differ), differ

    out = tmp_path / "o"
    r = cli("quantize", ref, "-o", out, "--method", "gguf", "--gguf-type", "Q4_0", "--calib", calib,
            "--samples", "4", "--seqlen", "64", "-q")
    assert r.returncode == 0, r.stderr
    text = (out / "README.md").read_text()
    assert "importance-weighted" in text and "## Adapters" in text
    plain = tmp_path / "p"
    assert cli("quantize", ref, "-o", plain, "--method", "gguf", "--gguf-type", "Q4_0", "-q").returncode == 0
    a, b = _tensors(out / "lora-Q4_0.gguf"), _tensors(plain / "lora-Q4_0.gguf")
    assert bytes(a["blk.0.ffn_down.weight"].data) != bytes(b["blk.0.ffn_down.weight"].data)
