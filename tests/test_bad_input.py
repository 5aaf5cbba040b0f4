"""Every bad input gets one clear `error: ...` line naming the file (and tensor/key), exit status 2,
no traceback, and no output directory (nor a leftover `.OUT.partial-*` sibling).

Tampered models are always copies under tmp_path; the session fixtures are never modified.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import mergequant.merge.run as run_mod
from mergequant.cli import app
from mergequant.demo import build_tiny_llama, write_checkpoint
from mergequant.merge.run import MergeOptions, run_merge

from helpers import run_cli

TENSOR = "model.layers.1.mlp.up_proj.weight"


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def invoke(*args) -> "object":
    return CliRunner().invoke(app, [str(a) for a in args])


def merge_cli(recipe: Path, out: Path, *extra):
    return invoke("merge", recipe, "-o", out, "--workers", 2, *extra)


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


def assert_clean_error(res, out: Path | None, *needles) -> str:
    """Exit 2, exactly one stderr line starting with 'error: ', no traceback, needles in it, no output."""
    assert res.exit_code == 2, f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{res.stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in res.output
    for n in needles:
        assert str(n) in line, f"{n!r} not in {line!r}"
    if out is not None:
        assert not out.exists(), f"{out} was created"
        assert leftovers(out) == []
    return line


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def linear_recipe(*models, weights=None, extra="") -> str:
    weights = weights or [1.0 / len(models)] * len(models)
    lines = ["merge_method: linear", "models:"]
    for m, w in zip(models, weights):
        lines += [f"  - model: {m}", f"    parameters: {{weight: {w}}}"]
    return "\n".join(lines) + "\n" + extra


def ties_recipe(base, a, b, a_params="{weight: 0.5, density: 0.5}", b_params="{weight: 0.5, density: 0.5}") -> str:
    return (f"merge_method: ties\nbase_model: {base}\nmodels:\n"
            f"  - model: {a}\n    parameters: {a_params}\n"
            f"  - model: {b}\n    parameters: {b_params}\n")


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def rewrite_model(src: Path, dst: Path, mutate=None, config=None, shards: int = 2) -> Path:
    """A copy of ``src`` at ``dst`` with tensors passed through ``mutate(dict)`` and config through ``config(dict)``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {k: v.clone() for k, v in load_dir(src).items()}
    if mutate:
        mutate(tensors)
    cfg = json.loads((src / "config.json").read_text())
    if config:
        config(cfg)
    return write_checkpoint(dst, cfg, tensors, shards=shards, tokenizer=False)


def shard_of(model: Path, tensor: str) -> Path:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return model / index["weight_map"][tensor]


def digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# recipe problems
# ---------------------------------------------------------------------------------------------------
def test_missing_model_path(f32_models, tmp_path):
    missing = tmp_path / "no-such-model"
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(f32_models["a"], missing))
    out = tmp_path / "out"
    line = assert_clean_error(merge_cli(recipe, out), out, missing, "does not exist")
    assert "r.yaml" in line  # where the reference came from


def test_recipe_file_missing(tmp_path):
    out = tmp_path / "out"
    assert_clean_error(merge_cli(tmp_path / "nope.yaml", out), out, tmp_path / "nope.yaml", "not found")


def test_invalid_yaml(tmp_path):
    recipe = write_recipe(tmp_path / "bad.yaml", "merge_method: linear\nmodels: [\n  - a\n")
    out = tmp_path / "out"
    line = assert_clean_error(merge_cli(recipe, out), out, recipe, "invalid YAML")
    assert "line 3" in line  # points at the problem


def test_unknown_top_level_key_suggests(f32_models, tmp_path):
    text = linear_recipe(f32_models["a"], f32_models["b"]).replace("merge_method:", "merge_methd:")
    recipe = write_recipe(tmp_path / "r.yaml", text)
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, recipe, "merge_methd", "did you mean 'merge_method'")


def test_unknown_method(f32_models, tmp_path):
    text = ties_recipe(f32_models["base"], f32_models["a"], f32_models["b"]).replace("ties", "tiez")
    recipe = write_recipe(tmp_path / "r.yaml", text)
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, recipe, "merge_method", "unknown method 'tiez'", "did you mean 'ties'")


def test_unknown_parameter_typo(f32_models, tmp_path):
    text = ties_recipe(f32_models["base"], f32_models["a"], f32_models["b"], a_params="{weight: 0.5, densty: 0.5}")
    recipe = write_recipe(tmp_path / "r.yaml", text)
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, recipe, "models[0].parameters.densty", "did you mean 'density'")


def test_known_but_unused_parameter_only_warns(f32_models, tmp_path):
    text = linear_recipe(f32_models["a"], f32_models["b"]).replace("{weight: 0.5}", "{weight: 0.5, density: 0.3}", 1)
    recipe = write_recipe(tmp_path / "r.yaml", text)
    out = tmp_path / "out"
    res = merge_cli(recipe, out)
    assert res.exit_code == 0, res.output
    warns = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1 and "density" in warns[0] and "linear" in warns[0] and "r.yaml" in warns[0]
    # and the merge itself is the plain average (density ignored)
    a, b, merged = load_dir(f32_models["a"]), load_dir(f32_models["b"]), load_dir(out)
    torch.testing.assert_close(merged[TENSOR], (a[TENSOR] + b[TENSOR]) / 2, rtol=0, atol=1e-6)


def test_missing_required_parameter(f32_models, tmp_path):
    text = ties_recipe(f32_models["base"], f32_models["a"], f32_models["b"], b_params="{density: 0.5}")
    recipe = write_recipe(tmp_path / "r.yaml", text)
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, recipe, "missing required parameter 'weight'", f32_models["b"])


@pytest.mark.parametrize("density", ["0", "1.5"])
def test_density_out_of_range(f32_models, tmp_path, density):
    text = ties_recipe(f32_models["base"], f32_models["a"], f32_models["b"], a_params=f"{{weight: 0.5, density: {density}}}")
    recipe = write_recipe(tmp_path / "r.yaml", text)
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, recipe, "models[0].parameters.density", "(0, 1]")


def test_weights_sum_to_zero_with_normalize(f32_models, tmp_path):
    text = linear_recipe(f32_models["a"], f32_models["b"], weights=[1.0, -1.0], extra="parameters: {normalize: true}\n")
    recipe = write_recipe(tmp_path / "r.yaml", text)
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, recipe, "sum to 0", "normalize")


# ---------------------------------------------------------------------------------------------------
# damaged checkpoints
# ---------------------------------------------------------------------------------------------------
def _damaged_copy(f32_models, tmp_path) -> tuple[Path, Path]:
    bad = tmp_path / "bad"
    shutil.copytree(f32_models["a"], bad)
    return bad, shard_of(bad, TENSOR)


def test_corrupt_safetensors_header(f32_models, tmp_path):
    bad, shard = _damaged_copy(f32_models, tmp_path)
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + n] = (b"{garbage, not json!!" * n)[:n]
    shard.write_bytes(bytes(data))
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(bad, f32_models["b"]))
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, shard, "invalid JSON")


def test_truncated_safetensors(f32_models, tmp_path):
    bad, shard = _damaged_copy(f32_models, tmp_path)
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])  # the tensor whose data is cut short
    shard.write_bytes(data[:-100])
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(bad, f32_models["b"]))
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, shard, "truncated", last, str(len(data) - 100))


def test_header_length_larger_than_file(f32_models, tmp_path):
    bad, shard = _damaged_copy(f32_models, tmp_path)
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 3)
    shard.write_bytes(bytes(data))
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(bad, f32_models["b"]))
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, shard, f"header length {len(data) * 3}", f"{len(data)} bytes")


def test_tensor_missing_from_a_shard(f32_models, tmp_path):
    """A shard rewritten without one tensor, and the index fixed accordingly."""
    bad, shard = _damaged_copy(f32_models, tmp_path)
    tensors = load_file(shard)
    del tensors[TENSOR]
    save_file(tensors, shard, metadata={"format": "pt"})
    idx_path = bad / "model.safetensors.index.json"
    index = json.loads(idx_path.read_text())
    del index["weight_map"][TENSOR]
    idx_path.write_text(json.dumps(index))
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(f32_models["a"], bad))
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, bad, TENSOR, "missing")


def test_tensor_listed_in_index_but_missing_from_shard(f32_models, tmp_path):
    bad, shard = _damaged_copy(f32_models, tmp_path)
    tensors = load_file(shard)
    del tensors[TENSOR]
    save_file(tensors, shard, metadata={"format": "pt"})  # index still lists it
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(f32_models["a"], bad))
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, shard, TENSOR, "missing")


def test_tensor_missing_from_single_file_model(f32_models, tmp_path):
    bad = rewrite_model(f32_models["b"], tmp_path / "single", mutate=lambda t: t.pop(TENSOR), shards=1)
    assert (bad / "model.safetensors").exists() and not (bad / "model.safetensors.index.json").exists()
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(f32_models["a"], bad))
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, bad, TENSOR, "missing")


def test_shape_mismatch_shows_both_shapes(f32_models, tmp_path):
    def transpose(t):
        t[TENSOR] = t[TENSOR].t().contiguous()

    bad = rewrite_model(f32_models["b"], tmp_path / "shape", mutate=transpose)
    shape = list(load_dir(f32_models["a"])[TENSOR].shape)
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(f32_models["a"], bad))
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, bad, TENSOR, str(shape), str(shape[::-1]))


def test_different_architectures(f32_models, tmp_path):
    bad = tmp_path / "mistral"
    shutil.copytree(f32_models["b"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(f32_models["a"], bad))
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, bad, "MistralForCausalLM", "LlamaForCausalLM")


def test_different_layer_counts(f32_models, tmp_path):
    short = build_tiny_llama(tmp_path / "short", seed=5, dtype=torch.float32, hidden=64, intermediate=160, layers=3,
                             vocab=2048)
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(f32_models["a"], short))
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, short, "3 layers", "has 4", "slices")


def _bigger_vocab(base: Path, dst: Path, extra: int = 16) -> Path:
    gen = torch.Generator().manual_seed(7)

    def grow(t):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            t[k] = torch.cat([t[k], torch.randn(extra, t[k].shape[1], generator=gen)])

    def cfg(c):
        c["vocab_size"] += extra

    return rewrite_model(base, dst, mutate=grow, config=cfg)


def test_vocab_mismatch_refused_by_default(f32_models, tmp_path):
    big = _bigger_vocab(f32_models["base"], tmp_path / "big")
    recipe = write_recipe(tmp_path / "r.yaml", f"base_model: {big}\n" + linear_recipe(big, f32_models["a"]))
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, f32_models["a"], "2048", "2064", "--allow-vocab-mismatch")


def test_vocab_mismatch_allowed(f32_models, tmp_path):
    big = _bigger_vocab(f32_models["base"], tmp_path / "big")
    recipe = write_recipe(tmp_path / "r.yaml", f"base_model: {big}\n" + linear_recipe(big, f32_models["a"], weights=[1, 1]))
    out = tmp_path / "out"
    res = merge_cli(recipe, out, "--allow-vocab-mismatch", "--quiet")
    assert res.exit_code == 0, res.output
    B, A, M = load_dir(big), load_dir(f32_models["a"]), load_dir(out)
    assert set(M) == set(B)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert M[k].shape == (2064, 64)
        torch.testing.assert_close(M[k][:2048], (B[k][:2048] + A[k]) / 2, rtol=0, atol=1e-6)  # shared rows merged
        assert torch.equal(M[k][2048:], B[k][2048:])  # extra rows are the base's
        assert not torch.allclose(M[k][:2048], B[k][:2048])
    torch.testing.assert_close(M[TENSOR], (B[TENSOR] + A[TENSOR]) / 2, rtol=0, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 2064


# ---------------------------------------------------------------------------------------------------
# output location
# ---------------------------------------------------------------------------------------------------
def _zoo(f32_models, tmp_path) -> tuple[Path, Path]:
    zoo = tmp_path / "zoo"
    a = zoo / "a"
    shutil.copytree(f32_models["a"], a)
    return zoo, a


def test_output_inside_input_refused(f32_models, tmp_path):
    zoo, a = _zoo(f32_models, tmp_path)
    before = digest(a)
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(a, f32_models["b"]))
    out = a / "merged"
    assert_clean_error(merge_cli(recipe, out), out, "refusing", out, a)
    assert digest(a) == before


def test_output_equal_to_input_refused_even_with_force(f32_models, tmp_path):
    zoo, a = _zoo(f32_models, tmp_path)
    before = digest(a)
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(a, f32_models["b"]))
    assert_clean_error(merge_cli(recipe, a, "--force"), None, "refusing", a)
    assert digest(a) == before and leftovers(a) == []


def test_output_containing_input_refused_even_with_force(f32_models, tmp_path):
    zoo, a = _zoo(f32_models, tmp_path)
    before = digest(a)
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(a, f32_models["b"]))
    assert_clean_error(merge_cli(recipe, zoo, "--force"), None, "refusing", zoo)
    assert digest(a) == before and leftovers(zoo) == []


def test_existing_output_refused_without_force(f32_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(f32_models["a"], f32_models["b"]))
    assert_clean_error(merge_cli(recipe, out), None, out, "already exists", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert leftovers(out) == []


def test_force_replaces_existing_output(f32_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(f32_models["a"], f32_models["b"]))
    res = merge_cli(recipe, out, "--force", "--quiet")
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists()
    a, b, m = load_dir(f32_models["a"]), load_dir(f32_models["b"]), load_dir(out)
    torch.testing.assert_close(m[TENSOR], (a[TENSOR] + b[TENSOR]) / 2, rtol=0, atol=1e-6)
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------------
# pickles
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_bin_checkpoint_loads_like_safetensors(f32_models, tmp_path, zipfile):
    abin = tmp_path / "abin"
    shutil.copytree(f32_models["a"], abin, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    torch.save(load_dir(f32_models["a"]), abin / "pytorch_model.bin", _use_new_zipfile_serialization=zipfile)
    r_bin = write_recipe(tmp_path / "bin.yaml", linear_recipe(abin, f32_models["b"], weights=[0.3, 0.7]))
    r_st = write_recipe(tmp_path / "st.yaml", linear_recipe(f32_models["a"], f32_models["b"], weights=[0.3, 0.7]))
    for r, o in ((r_bin, "out_bin"), (r_st, "out_st")):
        res = merge_cli(r, tmp_path / o, "--quiet")
        assert res.exit_code == 0, res.output
    m_bin, m_st = load_dir(tmp_path / "out_bin"), load_dir(tmp_path / "out_st")
    assert set(m_bin) == set(m_st) and len(m_bin) > 10
    for k in m_st:
        assert torch.equal(m_bin[k], m_st[k]), k


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: "Detected pickle protocol 4"
@pytest.mark.parametrize("kind", ["torch_save", "raw_pickle"])
def test_malicious_pickle_refused(f32_models, tmp_path, kind):
    evil = tmp_path / "evil"
    shutil.copytree(f32_models["a"], evil, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    marker = tmp_path / "PWNED"
    payload = {"model.embed_tokens.weight": _Evil(str(marker))}
    if kind == "torch_save":
        torch.save(payload, evil / "pytorch_model.bin")
    else:
        with open(evil / "pytorch_model.bin", "wb") as f:
            pickle.dump(payload, f)
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(f32_models["a"], evil))
    out = tmp_path / "out"
    line = assert_clean_error(merge_cli(recipe, out), out, evil / "pytorch_model.bin")
    assert not marker.exists(), "the pickle was executed"
    assert "weights_only=False" not in line  # never advise the unsafe way out


# ---------------------------------------------------------------------------------------------------
# problems found while merging
# ---------------------------------------------------------------------------------------------------
def test_nan_in_merged_tensor_warns(f32_models, tmp_path):
    def poison(t):
        t[TENSOR][3, 5] = float("nan")

    nan_model = rewrite_model(f32_models["a"], tmp_path / "nan", mutate=poison)
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(nan_model, f32_models["b"]))
    out = tmp_path / "out"
    res = merge_cli(recipe, out)
    assert res.exit_code == 0, res.output
    warns = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1 and TENSOR in warns[0] and "NaN" in warns[0], res.output
    m = load_dir(out)
    assert torch.isnan(m[TENSOR][3, 5]) and int(torch.isnan(m[TENSOR]).sum()) == 1


def _interrupting(after: int):
    real = run_mod.merge_tensor
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return fake, calls


def test_interrupted_merge_leaves_nothing(f32_models, tmp_path, monkeypatch):
    fake, calls = _interrupting(5)
    monkeypatch.setattr(run_mod, "merge_tensor", fake)
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(f32_models["a"], f32_models["b"]))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_merge(recipe, MergeOptions(out=out, quiet=True, fsync=False, workers=2), log=lambda m: None)
    assert calls["n"] > 5  # it really was interrupted midway
    assert not out.exists()
    assert leftovers(out) == []


def test_interrupted_forced_merge_keeps_old_output(f32_models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    fake, _ = _interrupting(3)
    monkeypatch.setattr(run_mod, "merge_tensor", fake)
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(f32_models["a"], f32_models["b"]))
    res = merge_cli(recipe, out, "--force", "--quiet")
    assert res.exit_code == 130, res.output
    assert [ln for ln in res.stderr.splitlines() if ln.strip()] == ["error: interrupted; no output was written"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------------
# the real CLI in a subprocess: the error path prints no traceback
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_subprocess_error_has_no_traceback(f32_models, tmp_path):
    text = ties_recipe(f32_models["base"], f32_models["a"], f32_models["b"], a_params="{weight: 0.5, densty: 0.5}")
    recipe = write_recipe(tmp_path / "r.yaml", text)
    out = tmp_path / "out"
    proc = run_cli("merge", recipe, "-o", out)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")
    assert "densty" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and leftovers(out) == []


def test_hub_id_offline_is_a_clear_error(f32_models, tmp_path, monkeypatch):
    """A model reference that is not a local path is a Hub id; offline and not cached, say so."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {f32_models['base']}\n    parameters: {{weight: 1}}\n"
                      "  - model: some-org/not-downloaded\n    parameters: {weight: 1}\n")
    out = tmp_path / "out"
    res = merge_cli(recipe, out)
    assert_clean_error(res, out, "some-org/not-downloaded", "HF_HUB_OFFLINE", "models[1].model", str(recipe))


def test_missing_local_path_that_is_not_a_hub_id(f32_models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {f32_models['base']}\n    parameters: {{weight: 1}}\n"
                      "  - model: ./no/such/dir\n    parameters: {weight: 1}\n")
    out = tmp_path / "out"
    assert_clean_error(merge_cli(recipe, out), out, "./no/such/dir", "does not exist")
