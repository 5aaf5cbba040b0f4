"""Differential tests of the methods added in issue 13 against mergekit 0.1.5, in float32, element by element.

Every recipe below is merged by mergequant (in-process ``run_merge``) and by mergekit (``mergekit-yaml``'s
entry point, all recipes in one Python process started once, concurrently with ours) on the shared float32
fixture models plus a third fine-tune. Outputs must have the same tensor names, shapes, dtypes and layer
count, and every element must agree within the method's tolerance:

- elementwise or selection methods (breadcrumbs, nearswap, arcee_fusion, ram, ramplus_tl, passthrough):
  identical bits, except, for breadcrumbs, at entries whose |delta| is tied with another at a kept/dropped
  boundary (mergekit's sort orders ties arbitrarily; ours by position), recomputed here independently;
- methods with whole-tensor norms and angles (model_stock, nuslerp, multislerp, karcher, sce): within
  1e-6 absolute (we accumulate the statistics in float64, mergekit in float32; measured up to ~5e-7).

della is randomized (mergekit draws from the global RNG and rescales differently, see della.py); it is
tested statistically in test_merge_methods_units.py.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from string import Template

import pytest
import torch
import yaml
from safetensors import safe_open

from mergequant.demo import finetune_of
from mergequant.merge.run import MergeOptions, run_merge

pytestmark = pytest.mark.slow  # runs mergekit as the oracle

pytest.importorskip("mergekit")

EXACT, CLOSE = 0.0, 1e-6

# name -> (recipe, tolerance); $base, $a, $b, $c are the fixture models
RECIPES: dict[str, tuple[str, float]] = {
    # per-model gamma and density (gradient), a weight filter list, lambda
    "breadcrumbs": ("""
        merge_method: breadcrumbs
        base_model: $base
        models:
          - model: $a
            parameters: {weight: 0.6, density: [0.9, 0.4], gamma: 0.05}
          - model: $b
            parameters: {weight: [{filter: mlp, value: 0.8}, {value: 0.3}], density: 0.5}
        parameters: {lambda: 1.2}
    """, EXACT),
    # gamma 0 (keeps exactly the top density), rescale and normalize on
    "breadcrumbs_ties": ("""
        merge_method: breadcrumbs_ties
        base_model: $base
        models:
          - model: $a
            parameters: {weight: 0.6, density: 0.7, gamma: 0.1}
          - model: $b
            parameters: {weight: 0.5, density: [0.3, 0.8], gamma: 0}
        parameters: {normalize: true, rescale: true}
    """, CLOSE),
    "model_stock": ("""
        merge_method: model_stock
        base_model: $base
        models: [{model: $a}, {model: $b}, {model: $c}]
    """, CLOSE),
    "model_stock_filter_wise": ("""
        merge_method: model_stock
        base_model: $base
        models: [{model: $a}, {model: $b}]
        parameters: {filter_wise: true}
    """, CLOSE),
    "nuslerp_base_gradient": ("""
        merge_method: nuslerp
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.3}}
          - {model: $b, parameters: {weight: [0.2, 0.9]}}
    """, CLOSE),
    "nuslerp_rows_no_base": ("""
        merge_method: nuslerp
        models:
          - {model: $a, parameters: {weight: 0.3}}
          - {model: $b, parameters: {weight: 0.6}}
        parameters: {nuslerp_flatten: false}
    """, CLOSE),
    "nuslerp_row_wise": ("""
        merge_method: nuslerp
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.7}}
          - {model: $b, parameters: {weight: 0.4}}
        parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
    """, CLOSE),
    # slices with the base in each, per-slice parameters overriding the top level, a filter
    "nuslerp_slices": ("""
        merge_method: nuslerp
        base_model: $base
        slices:
          - sources:
              - {model: $base, layer_range: [0, 2]}
              - {model: $a, layer_range: [0, 2], parameters: {weight: [0.1, 0.9]}}
              - {model: $b, layer_range: [0, 2]}
          - sources:
              - {model: $base, layer_range: [2, 4]}
              - {model: $a, layer_range: [2, 4]}
              - {model: $b, layer_range: [2, 4], parameters: {weight: [{filter: self_attn, value: 2.0}, {value: 0.5}]}}
            parameters: {weight: 0.8}
        parameters: {weight: 0.4}
    """, CLOSE),
    "multislerp_base": ("""
        merge_method: multislerp
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.3}}
          - {model: $b, parameters: {weight: 0.5}}
          - {model: $c, parameters: {weight: 0.2}}
    """, CLOSE),
    "multislerp_raw_weights": ("""
        merge_method: multislerp
        models:
          - {model: $a, parameters: {weight: 0.3}}
          - {model: $b, parameters: {weight: [0.5, 1.0]}}
        parameters: {normalize_weights: false}
    """, CLOSE),
    # the base (not listed in models) is one more input
    "karcher": ("""
        merge_method: karcher
        base_model: $base
        models: [{model: $a}, {model: $b}]
        parameters: {max_iter: 20, tol: 1.0e-7}
    """, CLOSE),
    "sce_select_topk": ("""
        merge_method: sce
        base_model: $base
        models: [{model: $a}, {model: $b}, {model: $c}]
        parameters: {select_topk: 0.4}
    """, CLOSE),
    "sce": ("""
        merge_method: sce
        base_model: $base
        models: [{model: $a}, {model: $b}]
    """, CLOSE),
    "nearswap": ("""
        merge_method: nearswap
        base_model: $base
        models: [{model: $base}, {model: $a}]
        parameters: {t: [0.0002, 0.001]}
    """, EXACT),
    "arcee_fusion": ("""
        merge_method: arcee_fusion
        base_model: $base
        models: [{model: $base}, {model: $a}]
    """, EXACT),
    "ram": ("""
        merge_method: ram
        base_model: $base
        models: [{model: $a}, {model: $b}, {model: $c}]
        parameters: {epsilon: 0.0003}
    """, EXACT),
    "ramplus_tl": ("""
        merge_method: ramplus_tl
        base_model: $base
        models: [{model: $a}, {model: $b}]
        parameters: {epsilon: 0.0003, r: 0.5, alpha: 0.9}
    """, EXACT),
    # depth up-scaling: layers reordered (2-3 first), repeated (layer 1 of a twice), 6 output layers,
    # scale 0 on o_proj and a gradient on down_proj in the duplicated block
    "passthrough_slices": ("""
        merge_method: passthrough
        slices:
          - sources: [{model: $a, layer_range: [2, 4]}]
          - sources: [{model: $a, layer_range: [0, 3]}]
            parameters:
              scale: [{filter: o_proj, value: 0.0}, {filter: down_proj, value: [0.5, 1.0]}, {value: 1.0}]
          - sources: [{model: $b, layer_range: [1, 2]}]
    """, EXACT),
    "passthrough_scale": ("""
        merge_method: passthrough
        models:
          - {model: $a, parameters: {scale: [{filter: embed, value: 2.0}, {value: 0.5}]}}
    """, EXACT),
}
EXPECTED_LAYERS = {"passthrough_slices": 6, "nuslerp_slices": 4}
# merged by us only: mergekit 0.1.5 keeps the input's 4-entry layer_types with 6 layers, and transformers then
# refuses to save the config ("num_hidden_layers (6) must be equal to the number of layer_types (4)")
OURS_ONLY = {"passthrough_layer_types": """
        merge_method: passthrough
        slices:
          - sources: [{model: $layered, layer_range: [2, 4]}]
          - sources: [{model: $layered, layer_range: [0, 3]}]
          - sources: [{model: $layered, layer_range: [1, 2]}]
    """}
LAYER_TYPES = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]  # one per input layer

MERGEKIT_BATCH = textwrap.dedent("""
    import json, sys, traceback
    from mergekit.scripts.run_yaml import main
    for cfg, out, log in json.loads(sys.argv[1]):
        try:
            main([cfg, out, "--allow-crimes", "--quiet", "--no-write-model-card"], standalone_mode=False)
        except BaseException:
            open(log, "w").write(traceback.format_exc())
""")


@functools.lru_cache(maxsize=None)
def load_input(path: str) -> dict[str, torch.Tensor]:
    """An input model's tensors (read once per test session)."""
    return load_dir(Path(path))


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k)
    assert tensors, f"no safetensors in {path}"
    return tensors


@pytest.fixture(scope="module")
def models(f32_models, tmp_path_factory) -> dict[str, Path]:
    """base, a, b (conftest) + c, a third fine-tune, + 'layered', a copy of a whose config has a per-layer list."""
    root = tmp_path_factory.mktemp("methods_models")
    out = dict(f32_models)
    out["c"] = finetune_of(f32_models["base"], root / "c", seed=3)
    layered = root / "layered"
    layered.mkdir()
    for f in f32_models["a"].iterdir():
        if f.name != "config.json":
            shutil.copy(f, layered / f.name)
    cfg = json.loads((f32_models["a"] / "config.json").read_text())
    cfg["layer_types"] = LAYER_TYPES
    (layered / "config.json").write_text(json.dumps(cfg))
    out["layered"] = layered
    return out


@pytest.fixture(scope="module")
def merged(models, tmp_path_factory):
    """{name: (ours_dir, mergekit_dir, mergekit_error_or_None)}: mergekit in one subprocess while ours run here."""
    root = tmp_path_factory.mktemp("methods_vs_mergekit")
    jobs, paths = [], {}
    for name, text in [(n, t) for n, (t, _) in RECIPES.items()] + list(OURS_ONLY.items()):
        recipe = root / f"{name}.yaml"
        body = textwrap.dedent(text).strip() + "\ndtype: float32\n"
        recipe.write_text(Template(body).substitute({k: str(v) for k, v in models.items()}))
        paths[name] = (recipe, root / f"{name}.ours", root / f"{name}.mk", root / f"{name}.mk.err")
        if name in RECIPES:
            jobs.append([str(recipe), str(root / f"{name}.mk"), str(root / f"{name}.mk.err")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    mk = subprocess.Popen([sys.executable, "-c", MERGEKIT_BATCH, json.dumps(jobs)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env)
    errors = {}
    for name, (recipe, ours, _, _) in paths.items():
        try:
            run_merge(recipe, MergeOptions(out=ours, quiet=True, fsync=False, workers=1), log=lambda m: None)
        except Exception as e:  # reported by the test of this recipe
            errors[name] = f"{type(e).__name__}: {e}"
    mk_out, _ = mk.communicate(timeout=600)
    out = {}
    for name, (recipe, ours, mkdir, err) in paths.items():
        mk_error = err.read_text() if err.exists() else None
        if mk_error is None and not mkdir.exists() and name in RECIPES:
            mk_error = f"mergekit wrote nothing (exit {mk.returncode}):\n{mk_out[-4000:]}"
        out[name] = (recipe, ours, mkdir, errors.get(name), mk_error)
    return out


def _tied_at_breadcrumbs_boundary(recipe_path: Path, name: str, ours_names) -> dict[str, torch.Tensor]:
    """For each output tensor, the entries whose |delta| in some input equals another entry's at the first
    kept or first dropped rank (sorted independently here): where tie order decides the selection."""
    recipe = yaml.safe_load(recipe_path.read_text())
    base = load_input(recipe["base_model"])
    out = {}
    for tname in ours_names:
        layer = int(tname.split(".")[2]) if tname.startswith("model.layers.") else 0
        t = layer / 3 if tname.startswith("model.layers.") else 0.0
        tied = torch.zeros(base[tname].numel(), dtype=torch.bool)
        for m in recipe["models"]:
            p = m.get("parameters") or {}
            density = p.get("density", 1.0)
            if isinstance(density, list):
                density = density[0] + (density[1] - density[0]) * t
            if density >= 1:
                continue
            mags = (load_input(m["model"])[tname].float() - base[tname].float()).abs().reshape(-1)
            n = mags.numel()
            target, top = int(density * n), int(p.get("gamma", 0.01) * n)
            lo = max(0, n - target - top)
            s = torch.sort(mags).values
            for r in (lo - 1, lo, lo + target - 1, lo + target):
                if 0 <= r < n and int((mags == s[r]).sum()) > 1:
                    tied |= mags == s[r]
        out[tname] = tied
    return out


def _compare(merged, name, ours_dir):
    recipe, _, mk_dir, _, mk_error = merged[name]
    assert mk_error is None, f"mergekit failed on {recipe}:\n{mk_error}"
    ours, ref = load_dir(ours_dir), load_dir(mk_dir)
    assert sorted(ours) == sorted(ref), f"tensor names differ: {sorted(set(ours) ^ set(ref))}"
    cfg_ours = json.loads((ours_dir / "config.json").read_text())
    cfg_ref = json.loads((mk_dir / "config.json").read_text())
    n_layers = len({k.split(".")[2] for k in ours if k.startswith("model.layers.")})
    assert cfg_ours["num_hidden_layers"] == cfg_ref["num_hidden_layers"] == n_layers == EXPECTED_LAYERS.get(name, 4)
    tol = RECIPES[name][1]
    tied = _tied_at_breadcrumbs_boundary(recipe, name, sorted(ref)) if name.startswith("breadcrumbs") else {}
    worst, unexplained_max, differing = 0.0, 0.0, 0
    for k in sorted(ref):
        assert ours[k].shape == ref[k].shape and ours[k].dtype == ref[k].dtype == torch.float32, k
        diff = (ours[k].double() - ref[k].double()).abs().reshape(-1)
        bad = diff > tol
        if k in tied:
            bad &= ~tied[k]
        differing += int(bad.sum())
        worst = max(worst, float(diff.max()))
        if bad.any():
            unexplained_max = max(unexplained_max, float(diff[bad].max()))
    assert differing == 0, f"{name}: {differing} elements differ from mergekit by more than {tol} " \
                           f"(up to {unexplained_max:.3g}) without a tie explaining it"
    return worst


@pytest.mark.parametrize("name", list(RECIPES))
def test_matches_mergekit(merged, name):
    _, ours_dir, _, our_error, _ = merged[name]
    assert our_error is None, f"mergequant failed on {name}: {our_error}"
    print(f"{name}: max |ours - mergekit| = {_compare(merged, name, ours_dir):.3g}")


@pytest.mark.parametrize("name", list(RECIPES))
def test_small_chunks_match_mergekit(merged, name, tmp_path, monkeypatch):
    """The same recipes with 4096-element chunks: every statistic (Gram matrices, order statistics,
    counts, L1 sums) is then accumulated over many chunks (the default chunk holds these whole tensors),
    and row-wise methods get several chunks of whole rows. Still mergekit's numbers."""
    from mergequant.merge import engine

    monkeypatch.setattr(engine, "CHUNK", 4096)
    recipe = merged[name][0]
    out = tmp_path / "out"
    run_merge(recipe, MergeOptions(out=out, quiet=True, fsync=False, workers=2), log=lambda m: None)
    _compare(merged, name, out)


def test_passthrough_reorders_per_layer_config(merged):
    """Output layers 0-5 come from input layers 2, 3, 0, 1, 2, 1: layer_types follows them."""
    _, ours_dir, _, our_error, _ = merged["passthrough_layer_types"]
    assert our_error is None
    cfg = json.loads((ours_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    assert cfg["layer_types"] == [LAYER_TYPES[i] for i in (2, 3, 0, 1, 2, 1)]
