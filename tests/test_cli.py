"""The command line: help, inspect, merge --dry-run, shard sizes, what the output directory holds (the demo: test_demo.py)."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergequant.cli import app
from mergequant.merge.run import MergeOptions, run_merge

from helpers import run_cli

TIES_PAPER = "https://arxiv.org/abs/2306.01708"
LINEAR_PAPER = "https://arxiv.org/abs/2203.05482"
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def headers(model: Path) -> dict[str, dict]:
    """file name -> {tensor: entry}, read straight from the safetensors headers (independent of mergequant)."""
    out = {}
    for f in sorted(model.glob("*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        h = json.loads(raw[8:8 + n])
        h.pop("__metadata__", None)
        out[f.name] = h
    return out


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def model_bytes(model: Path) -> int:
    return sum(math.prod(e["shape"]) * ITEMSIZE[e["dtype"]] for h in headers(model).values() for e in h.values())


def mib(n: int) -> str:
    """Binary units with two decimals, as the CLI prints sizes (independent implementation)."""
    if n < 2**10:
        return f"{n} B"
    if n < 2**20:
        return f"{n / 2**10:.2f} KiB"
    return f"{n / 2**20:.2f} MiB"


def ties_text(m: dict, extra: str = "") -> str:
    return (f"# a comment that must survive verbatim\nmerge_method: ties\nbase_model: {m['base']}\nmodels:\n"
            f"  - model: {m['a']}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
            f"  - model: {m['b']}\n    parameters: {{weight: 0.4, density: [0.8, 0.4]}}\n" + extra)


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n", 2)[1])


# ---------------------------------------------------------------------------------------------------
# help
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_top_level_help_subprocess():
    proc = run_cli("--help", check=True)
    for cmd in ("merge", "inspect", "demo", "version"):
        assert re.search(rf"\b{cmd}\b", proc.stdout), cmd
    assert "Traceback" not in proc.stderr


def test_merge_help_mentions_options():
    res = invoke("merge", "--help")
    assert res.exit_code == 0
    for opt in ("--out", "-o", "--shard-size", "--out-dtype", "--dry-run", "--force", "--device", "--seed", "--quiet",
                "--workers", "--allow-vocab-mismatch", "--mergekit-dtype", "500MB"):
        assert opt in res.stdout, opt


def test_inspect_help_and_version():
    res = invoke("inspect", "--help")
    assert res.exit_code == 0 and "--json" in res.stdout
    from mergequant import __version__

    res = invoke("version")
    assert res.exit_code == 0 and res.stdout.strip() == __version__


# ---------------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------------
def _expected_inspection(model: Path) -> dict:
    hs = headers(model)
    entries = {k: e for h in hs.values() for k, e in h.items()}
    dtypes: dict[str, int] = {}
    for e in entries.values():
        name = {"F32": "float32", "BF16": "bfloat16"}[e["dtype"]]
        dtypes[name] = dtypes.get(name, 0) + 1
    return {
        "tensors": len(entries),
        "parameters": sum(math.prod(e["shape"]) for e in entries.values()),
        "bytes": model_bytes(model),
        "dtypes": dtypes,
        "shards": {f: {"tensors": len(h), "bytes": sum(math.prod(e["shape"]) * ITEMSIZE[e["dtype"]] for e in h.values())}
                   for f, h in hs.items()},
    }


def _hand_param_count(h=64, i=160, v=2048, layers=4, kv=32) -> int:
    per_layer = 2 * h + h * h + 2 * kv * h + h * h + 3 * i * h
    return 2 * v * h + h + layers * per_layer


@pytest.mark.parametrize("fixture, dtype", [("f32_models", "float32"), ("bf16_models", "bfloat16")])
def test_inspect_json(request, fixture, dtype):
    model = request.getfixturevalue(fixture)["a"]
    exp = _expected_inspection(model)
    assert exp["tensors"] == 3 + 9 * 4 and exp["parameters"] == _hand_param_count()
    res = invoke("inspect", model, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["architecture"] == "LlamaForCausalLM" and info["model_type"] == "llama"
    assert info["layers"] == 4 and info["hidden_size"] == 64 and info["vocab_size"] == 2048
    for key in ("tensors", "parameters", "bytes", "dtypes", "shards"):
        assert info[key] == exp[key], key
    assert exp["dtypes"] == {dtype: 39} and len(exp["shards"]) == len(list(model.glob("*.safetensors"))) > 1


def test_inspect_table(f32_models):
    model = f32_models["a"]
    exp = _expected_inspection(model)
    res = invoke("inspect", model)
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert re.search(r"^architecture:\s+LlamaForCausalLM \(llama\)$", out, re.M)
    assert re.search(rf"^tensors:\s+{exp['tensors']}$", out, re.M)
    assert re.search(rf"^parameters:\s+{exp['parameters']:,} ", out, re.M)
    assert re.search(r"^dtypes:\s+float32 x39$", out, re.M)
    assert re.search(rf"^shards:\s+{len(exp['shards'])}$", out, re.M)
    assert re.search(rf"^size:\s+{re.escape(mib(exp['bytes']))}$", out, re.M)
    for f, s in exp["shards"].items():
        assert re.search(rf"^\s+{re.escape(f)}: {s['tensors']} tensors, {re.escape(mib(s['bytes']))}$", out, re.M), f


def test_inspect_missing_path(tmp_path):
    res = invoke("inspect", tmp_path / "nope")
    assert res.exit_code == 2
    assert res.stderr.strip() == f"error: {tmp_path / 'nope'}: model path does not exist"


# ---------------------------------------------------------------------------------------------------
# merge --dry-run
# ---------------------------------------------------------------------------------------------------
def test_dry_run_prints_plan_and_writes_nothing(f32_models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ties_text(f32_models))
    out = tmp_path / "out"
    res = invoke("merge", recipe, "-o", out, "--dry-run")
    assert res.exit_code == 0, res.output
    size = model_bytes(f32_models["base"])
    text = res.stdout
    assert re.search(r"^tensors:\s+39$", text, re.M)
    assert re.search(rf"^read:\s+{re.escape(mib(3 * size))}$", text, re.M)  # every tensor of all three models
    assert re.search(rf"^write:\s+{re.escape(mib(size))} in 1 shard\(s\)$", text, re.M)
    assert re.search(r"^peak memory:\s+~\d+\.\d\d [KMG]iB", text, re.M)
    assert "ties" in text and "4 output layers" in text
    assert sorted(tmp_path.iterdir()) == [recipe]


def test_dry_run_counts_shards_and_out_dtype(f32_models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ties_text(f32_models))
    res = invoke("merge", recipe, "-o", tmp_path / "out", "--dry-run", "--shard-size", "200KB", "--out-dtype", "bfloat16")
    assert res.exit_code == 0, res.output
    size = model_bytes(f32_models["base"])
    n_shards = len(re.findall(r"^\s+model-\d{5}-of-\d{5}\.safetensors: ", res.stdout, re.M))
    assert n_shards >= 3
    assert re.search(rf"^write:\s+{re.escape(mib(size // 2))} in {n_shards} shard\(s\)$", res.stdout, re.M)
    assert sorted(tmp_path.iterdir()) == [recipe]


# ---------------------------------------------------------------------------------------------------
# sharded output equals single-shard output
# ---------------------------------------------------------------------------------------------------
def test_small_shard_size_same_tensors(f32_models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ties_text(f32_models))
    res = invoke("merge", recipe, "-o", tmp_path / "many", "--shard-size", "300KB", "--quiet")
    assert res.exit_code == 0, res.output
    run_merge(recipe, MergeOptions(out=tmp_path / "one", quiet=True, fsync=False), log=lambda m: None)
    many, one = tmp_path / "many", tmp_path / "one"
    files = sorted(p.name for p in many.glob("*.safetensors"))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert [p.name for p in one.glob("*.safetensors")] == ["model.safetensors"]
    assert not (one / "model.safetensors.index.json").exists()
    index = json.loads((many / "model.safetensors.index.json").read_text())
    for f in files:
        shard = load_file(many / f)
        data = sum(t.numel() * t.element_size() for t in shard.values())
        assert data <= 300_000 or len(shard) == 1, f  # within the limit, or one tensor bigger than it
        for name in shard:
            assert index["weight_map"][name] == f
    single = load_file(one / "model.safetensors")
    union = load_dir(many)
    assert set(union) == set(single) and len(union) == 39 and set(index["weight_map"]) == set(single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    for k in single:
        assert torch.equal(union[k], single[k]), k
    base = load_dir(f32_models["base"])
    assert not torch.equal(single["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


# ---------------------------------------------------------------------------------------------------
# what the output directory holds
# ---------------------------------------------------------------------------------------------------
def test_output_directory_contents(f32_models, tmp_path):
    base, a = f32_models["base"], f32_models["a"]
    text = (f"# stack: 3 layers of a on 2 of base\nmerge_method: linear\nparameters: {{weight: 1.0}}\n"
            f"dtype: bfloat16\nslices:\n  - sources: [{{model: {base}, layer_range: [0, 2]}}]\n"
            f"  - sources: [{{model: {a}, layer_range: [1, 4]}}]\n")
    recipe = tmp_path / "stack.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    res = invoke("merge", recipe, "-o", out)
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "mergequant_recipe.yaml",
        "README.md", "model.safetensors"])
    cfg, base_cfg = json.loads((out / "config.json").read_text()), json.loads((base / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5 and base_cfg["num_hidden_layers"] == 4
    assert cfg["torch_dtype"] == "bfloat16" and base_cfg["torch_dtype"] == "float32"
    assert {k: v for k, v in cfg.items() if k not in ("num_hidden_layers", "torch_dtype")} == \
           {k: v for k, v in base_cfg.items() if k not in ("num_hidden_layers", "torch_dtype")}
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (base / f).read_bytes(), f
    assert (out / "mergequant_recipe.yaml").read_text() == text
    merged = load_file(out / "model.safetensors")
    assert len(merged) == 3 + 9 * 5 and {t.dtype for t in merged.values()} == {torch.bfloat16}
    A = load_dir(a)
    assert torch.equal(merged["model.layers.4.mlp.up_proj.weight"], A["model.layers.3.mlp.up_proj.weight"].bfloat16())

    readme = (out / "README.md").read_text()
    meta = front_matter(readme)
    assert "base_model" not in meta and "base_model_relation" not in meta  # local parents only
    assert meta["library_name"] == "transformers"
    assert "merge" in meta["tags"] and "linear" in meta["tags"]
    assert LINEAR_PAPER in readme
    assert "```yaml\n" + text.rstrip("\n") + "\n```" in readme


def _fake_hub_model(cache: Path, repo: str, src: Path) -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(sha)
    shutil.copytree(src, folder / "snapshots" / sha)


def test_readme_lists_hub_parents(f32_models, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    _fake_hub_model(cache, "org/tiny-base", f32_models["base"])
    _fake_hub_model(cache, "org/tiny-a", f32_models["a"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = (f"merge_method: ties\nbase_model: org/tiny-base\nmodels:\n"
            f"  - model: org/tiny-a\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            f"  - model: {f32_models['b']}\n    parameters: {{weight: 0.5, density: 0.5}}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    run_merge(recipe, MergeOptions(out=out, quiet=True, fsync=False), log=lambda m: None)
    readme = (out / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["base_model"] == ["org/tiny-base", "org/tiny-a"]  # the local path is not a Hub parent
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers" and "merge" in meta["tags"] and "ties" in meta["tags"]
    assert TIES_PAPER in readme and text.rstrip("\n") in readme


def test_readme_local_path_relative_to_recipe_is_not_a_hub_id(f32_models, tmp_path, monkeypatch):
    """`zoo/a` looks like a Hub id but is a folder next to the recipe: it must not be listed as a Hub parent."""
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "a").symlink_to(f32_models["a"], target_is_directory=True)
    (tmp_path / "zoo" / "b").symlink_to(f32_models["b"], target_is_directory=True)
    text = "merge_method: linear\nmodels:\n  - model: zoo/a\n    parameters: {weight: 1}\n" \
           "  - model: zoo/b\n    parameters: {weight: 1}\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the references resolve relative to the recipe, not the working directory
    out = tmp_path / "out"
    run_merge(recipe, MergeOptions(out=out, quiet=True, fsync=False), log=lambda m: None)
    meta = front_matter((out / "README.md").read_text())
    assert "base_model" not in meta and "base_model_relation" not in meta


def test_out_dtype_float16(f32_models, tmp_path):
    text = (f"merge_method: linear\nmodels:\n  - model: {f32_models['a']}\n    parameters: {{weight: 0.25}}\n"
            f"  - model: {f32_models['b']}\n    parameters: {{weight: 0.75}}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    res = invoke("merge", recipe, "-o", tmp_path / "h", "--out-dtype", "float16", "--quiet")
    assert res.exit_code == 0, res.output
    merged = load_dir(tmp_path / "h")
    A, B = load_dir(f32_models["a"]), load_dir(f32_models["b"])
    assert {t.dtype for t in merged.values()} == {torch.float16}
    for k in ("model.embed_tokens.weight", "model.layers.2.self_attn.o_proj.weight", "model.norm.weight"):
        ref = (0.25 * A[k] + 0.75 * B[k]).half()
        assert (merged[k].float() - ref.float()).abs().max() <= 1e-3 * ref.float().abs().max(), k
    assert json.loads((tmp_path / "h" / "config.json").read_text())["torch_dtype"] == "float16"
    assert (tmp_path / "h" / "model.safetensors").stat().st_size < model_bytes(f32_models["a"]) * 0.51 + 8192


def test_bad_out_dtype(f32_models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ties_text(f32_models))
    res = invoke("merge", recipe, "-o", tmp_path / "out", "--out-dtype", "float13")
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "float13" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
