"""The example recipes in configs/ run as shipped (against the models `mergequant demo` builds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergequant.demo import build_demo_models
from mergequant.merge.run import MergeOptions, run_merge

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    shutil.copytree(CONFIGS, root / "configs")
    build_demo_models(root / "mergequant-demo" / "models")
    return root


@pytest.fixture(autouse=True)
def _inside_the_tree(demo_tree, monkeypatch):
    """Run from the copied configs/ folder: the recipes name models as ``../mergequant-demo/...``, and a path
    is looked up from the working directory first, so from the repository root they would reach a
    `mergequant demo` run in the checkout's parent folder instead of this tree's models."""
    monkeypatch.chdir(demo_tree / "configs")


def _load(d: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem != "release"))
def test_example_recipe_runs(demo_tree, name):
    out = demo_tree / "out" / name
    res = run_merge(demo_tree / "configs" / f"{name}.yaml", MergeOptions(out=out, quiet=True, fsync=False), log=lambda m: None)
    merged = _load(out)
    assert len(merged) == res.tensors
    assert all(torch.isfinite(t.float()).all() for t in merged.values())
    assert (out / "config.json").exists() and (out / "README.md").exists()


def test_linear_example_matches_float64_average(demo_tree):
    out = demo_tree / "out" / "linear_check"
    run_merge(demo_tree / "configs" / "linear.yaml", MergeOptions(out=out, quiet=True, fsync=False), log=lambda m: None)
    models = demo_tree / "mergequant-demo" / "models"
    parts = {k: _load(models / k) for k in ("base", "poet", "coder")}
    merged = _load(out)
    for name, got in merged.items():
        want = (0.2 * parts["base"][name].double() + 0.4 * parts["poet"][name].double()
                + 0.4 * parts["coder"][name].double()) / 1.0
        assert got.dtype == torch.bfloat16
        # one bf16 rounding of the exact value: within half an ulp (2^-8 relative) of it
        assert torch.allclose(got.double(), want, rtol=2 ** -8, atol=1e-6), name


def test_frankenmerge_maps_layers(demo_tree):
    out = demo_tree / "out" / "franken_check"
    run_merge(demo_tree / "configs" / "frankenmerge.yaml", MergeOptions(out=out, quiet=True, fsync=False), log=lambda m: None)
    models = demo_tree / "mergequant-demo" / "models"
    poet, coder, merged = _load(models / "poet"), _load(models / "coder"), _load(out)
    suffix = "mlp.up_proj.weight"
    for out_layer, (src, layer) in enumerate([(poet, 0), (poet, 1), (poet, 2), (coder, 1), (coder, 2), (coder, 3)]):
        assert torch.equal(merged[f"model.layers.{out_layer}.{suffix}"], src[f"model.layers.{layer}.{suffix}"])
    assert torch.equal(merged["model.embed_tokens.weight"], poet["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], coder["lm_head.weight"])
    import json
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
