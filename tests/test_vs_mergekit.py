"""Differential tests: our real CLI against mergekit (the de-facto reference) on the same recipes.

Every recipe below is merged twice, by `mergequant merge` and by `mergekit-yaml --allow-crimes`, and the
outputs are compared tensor by tensor (names, shapes, dtypes, values within 1e-6 in float32). mergekit is
only an oracle here: nothing of it is imported by mergequant.

TIES is the one method where the two may legitimately differ: mergekit picks the top-k entries of |delta|
with an unstable argsort, so when several entries tie at the k-th largest magnitude the choice among them
is arbitrary. For TIES we therefore recompute, from the inputs and an independent evaluation of the recipe's
parameters, which entries sit exactly at the k-th largest |delta| of their (tensor, input) and require
every differing output element to be such a tied entry, and the count to stay within what tie choices
can explain.

bf16 recipes run with our --mergekit-dtype flag must give mergekit's exact bytes (linear, task arithmetic).

Starting mergekit costs ~6 s (imports), so all its merges run in one Python process that calls the
`mergekit-yaml` command (`mergekit.scripts.run_yaml.main`) once per recipe, concurrently with our CLI runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from string import Template

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import run_cli

pytestmark = pytest.mark.slow  # runs mergekit as the oracle (minutes of setup)

pytest.importorskip("mergekit")

# ------------------------------------------------------------------------------------------------------
# recipes ($base, $a, $b are replaced by the fixture's model directories)
# ------------------------------------------------------------------------------------------------------
F32_RECIPES: dict[str, str] = {
    # weight gradient on the base, a filter list (one entry itself a gradient) on a; b takes the top-level
    # weight (per-model beats top-level); normalize false (a weighted sum)
    "linear_gradients_filters_precedence": """
        merge_method: linear
        models:
          - model: $base
            parameters: {weight: [0.2, 1.0]}
          - model: $a
            parameters:
              weight: [{filter: mlp, value: 0.5}, {filter: self_attn, value: [1.0, 0.1, 0.6]}, {value: 1.5}]
          - model: $b
        parameters: {weight: 0.4, normalize: false}
        dtype: float32
    """,
    # base_model not listed in models; lambda != 1; filter-list and gradient weights; normalize true
    "task_arithmetic_lambda_unlisted_base": """
        merge_method: task_arithmetic
        base_model: $base
        models:
          - model: $a
            parameters:
              weight: [{filter: mlp, value: 1.2}, {value: 0.3}]
          - model: $b
            parameters: {weight: [0.2, 0.9]}
        parameters: {normalize: true, lambda: 1.5}
        dtype: float32
    """,
    # the classic published SLERP recipe shape (filtered t gradients), models form
    "slerp_filters": """
        merge_method: slerp
        base_model: $base
        models:
          - model: $base
          - model: $a
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float32
    """,
    # layer 1 of a dropped, layers 2-3 used twice (5 output layers); the second slice's sources come from
    # different input layers of a and b; per-source beats slice-level beats top-level parameters
    "linear_drop_duplicate_layers_precedence": """
        merge_method: linear
        slices:
          - sources:
              - model: $a
                layer_range: [0, 1]
              - model: $b
                layer_range: [0, 1]
                parameters: {weight: 2.0}
            parameters: {weight: 0.3}
          - sources:
              - model: $a
                layer_range: [2, 4]
                parameters: {weight: [0.1, 0.9]}
              - model: $b
                layer_range: [1, 3]
          - sources:
              - model: $a
                layer_range: [2, 4]
              - model: $b
                layer_range: [2, 4]
            parameters: {weight: [{filter: mlp, value: 0.2}, {value: [0.25, 0.75]}]}
        parameters: {weight: 1.0}
        dtype: float32
    """,
    # TIES in the slices form, a density gradient within each slice, slice-level lambda
    "ties_two_slices": """
        merge_method: ties
        base_model: $base
        slices:
          - sources:
              - model: $base
                layer_range: [0, 2]
              - model: $a
                layer_range: [0, 2]
                parameters: {weight: 1.0, density: [0.9, 0.3]}
              - model: $b
                layer_range: [0, 2]
                parameters: {weight: 0.5, density: 0.6}
          - sources:
              - model: $base
                layer_range: [2, 4]
              - model: $a
                layer_range: [2, 4]
                parameters: {weight: 0.7, density: 0.5}
              - model: $b
                layer_range: [2, 4]
                parameters: {weight: 0.5, density: [0.2, 0.8]}
            parameters: {lambda: 1.3}
        dtype: float32
    """,
}

BF16_RECIPES: dict[str, str] = {
    # bf16 checkpoints merged in float32 (common in practice): deltas of bf16 values are coarsely
    # quantized, so |delta| ties at the top-k threshold are frequent. Density gradient and filter list,
    # top-level density/weight vs per-model overrides, base not listed, normalize false, lambda 0.7, int8_mask.
    "ties_bf16_inputs_gradients_filters_precedence": """
        merge_method: ties
        base_model: $base
        models:
          - model: $a
            parameters: {density: [0.9, 0.3]}
          - model: $b
            parameters:
              weight: [0.3, 1.0]
              density: [{filter: mlp, value: 0.4}, {value: 0.7}]
        parameters: {density: 0.5, weight: 0.8, normalize: false, lambda: 0.7, int8_mask: true}
        dtype: float32
    """,
    # --mergekit-dtype: inputs rounded to bf16 and task arithmetic computed in bf16, as mergekit does
    "bf16_task_arithmetic_mergekit_dtype": """
        merge_method: task_arithmetic
        base_model: $base
        models:
          - model: $a
            parameters: {weight: 0.35}
          - model: $b
            parameters: {weight: [0.3, 0.8]}
        parameters: {lambda: 0.9}
        dtype: bfloat16
    """,
    "ties_bf16_mergekit_dtype": """
        merge_method: ties
        base_model: $base
        models:
          - model: $base
          - model: $a
            parameters: {weight: 0.35, density: 0.5}
          - model: $b
            parameters: {weight: [0.3, 0.8], density: [{filter: self_attn, value: 0.3}, {value: 0.7}]}
        dtype: bfloat16
    """,
    "bf16_linear_mergekit_dtype": """
        merge_method: linear
        models:
          - model: $a
            parameters: {weight: 0.35}
          - model: $b
            parameters: {weight: [0.3, 0.8]}
          - model: $base
            parameters: {weight: 0.2}
        dtype: bfloat16
    """,
}
OUR_FLAGS = {n: ["--mergekit-dtype"] for n in ("bf16_linear_mergekit_dtype", "bf16_task_arithmetic_mergekit_dtype",
                                                "ties_bf16_mergekit_dtype")}
# the dtype TIES selects its top-k in (mergekit: the recipe dtype; ours: float32 unless --mergekit-dtype)
DELTA_DTYPE = {"ties_bf16_mergekit_dtype": torch.bfloat16}
EXPECTED_LAYERS = {"linear_drop_duplicate_layers_precedence": 5, "ties_two_slices": 4}
ALL = {**F32_RECIPES, **BF16_RECIPES}

MERGEKIT_BATCH = textwrap.dedent("""
    import json, sys, traceback
    from mergekit.scripts.run_yaml import main
    for cfg, out, log in json.loads(sys.argv[1]):
        try:
            main([cfg, out, "--allow-crimes", "--quiet", "--no-write-model-card"], standalone_mode=False)
        except BaseException:
            open(log, "w").write(traceback.format_exc())
""")


@pytest.fixture(scope="module")
def merged(f32_models, bf16_models, tmp_path_factory):
    """Write every recipe, run mergekit (one process) and our CLI (a few at a time) concurrently.

    Returns {name: (recipe_path, ours_dir, mergekit_dir, our_process, mergekit_error_or_None)}."""
    root = tmp_path_factory.mktemp("vs_mergekit")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    jobs, paths = [], {}
    for name, text in ALL.items():
        models = bf16_models if name in BF16_RECIPES else f32_models
        recipe = root / f"{name}.yaml"
        recipe.write_text(Template(textwrap.dedent(text)).substitute({k: str(v) for k, v in models.items()}))
        paths[name] = (recipe, root / f"{name}.ours", root / f"{name}.mk", root / f"{name}.mk.err")
        jobs.append([str(recipe), str(root / f"{name}.mk"), str(root / f"{name}.mk.err")])

    mk = subprocess.Popen([sys.executable, "-c", MERGEKIT_BATCH, json.dumps(jobs)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env)
    with ThreadPoolExecutor(2) as pool:
        ours = dict(zip(ALL, pool.map(
            lambda n: run_cli("merge", paths[n][0], "-o", paths[n][1], "-q", "--workers", "1", *OUR_FLAGS.get(n, [])),
            ALL)))
    mk_out, _ = mk.communicate(timeout=600)
    out = {}
    for name, (recipe, o, m, err) in paths.items():
        error = err.read_text() if err.exists() else None
        if error is None and not m.exists():
            error = f"mergekit wrote nothing (exit {mk.returncode}):\n{mk_out[-4000:]}"
        out[name] = (recipe, o, m, ours[name], error)
    return out


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    files = sorted(path.glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                assert k not in tensors, f"{k} in two shards of {path}"
                tensors[k] = sf.get_tensor(k)
    return tensors


def _outputs(merged, name):
    recipe, ours_dir, mk_dir, proc, mk_error = merged[name]
    assert proc.returncode == 0, f"mergequant failed:\n{proc.stdout}\n{proc.stderr}"
    assert mk_error is None, f"mergekit failed on {recipe}:\n{mk_error}"
    ours, ref = load_dir(ours_dir), load_dir(mk_dir)
    assert sorted(ours) == sorted(ref), f"tensor names differ: only ours {sorted(set(ours) - set(ref))}, " \
                                        f"only mergekit {sorted(set(ref) - set(ours))}"
    for k in ref:
        assert ours[k].shape == ref[k].shape, f"{k}: shape {tuple(ours[k].shape)} vs mergekit {tuple(ref[k].shape)}"
        assert ours[k].dtype == ref[k].dtype, f"{k}: dtype {ours[k].dtype} vs mergekit {ref[k].dtype}"
    cfg_ours = json.loads((ours_dir / "config.json").read_text())
    cfg_ref = json.loads((mk_dir / "config.json").read_text())
    assert cfg_ours["num_hidden_layers"] == cfg_ref["num_hidden_layers"]
    n_layers = len({k.split(".")[2] for k in ours if k.startswith("model.layers.")})
    assert cfg_ours["num_hidden_layers"] == n_layers
    if name in EXPECTED_LAYERS:
        assert n_layers == EXPECTED_LAYERS[name]
    return recipe, ours, ref


# ------------------------------------------------------------------------------------------------------
# non-TIES: every element within 1e-6 (float32 recipes), identical bytes (bf16 with --mergekit-dtype)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in F32_RECIPES if not n.startswith("ties")])
def test_matches_mergekit_f32(merged, name):
    _, ours, ref = _outputs(merged, name)
    worst = 0.0
    for k in sorted(ref):
        diff = float((ours[k].double() - ref[k].double()).abs().max())
        worst = max(worst, diff)
        assert diff <= 1e-6, f"{name}: {k} differs from mergekit by {diff:.3g}"
    print(f"{name}: {len(ref)} tensors, max |ours - mergekit| = {worst:.3g}")


@pytest.mark.parametrize("name", ["bf16_linear_mergekit_dtype", "bf16_task_arithmetic_mergekit_dtype"])
def test_bf16_mergekit_dtype_is_identical(merged, name):
    """With --mergekit-dtype a bf16 recipe gives mergekit's bytes: same rounding of the inputs, the weights
    and the sums (linear: float32 accumulation; task arithmetic: bf16 compute)."""
    _, ours, ref = _outputs(merged, name)
    total = differ = 0
    for k in sorted(ref):
        assert ours[k].dtype == torch.bfloat16
        differ += int((ours[k] != ref[k]).sum())
        total += ref[k].numel()
    print(f"{name}: {differ} of {total} elements differ from mergekit")
    assert differ == 0


# ------------------------------------------------------------------------------------------------------
# TIES: differences only at entries tied at the top-k threshold
# ------------------------------------------------------------------------------------------------------
def _setting(value, name: str, t: float):
    """mergekit's parameter semantics, evaluated independently of mergequant.merge.params."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        for cond in value:
            if cond.get("filter") is None or cond["filter"] in name:
                return _setting(cond["value"], name, t)
        return None
    if isinstance(value, list):
        s = t * (len(value) - 1)
        i0 = math.floor(s)
        i1 = min(len(value) - 1, i0 + 1)
        f = s - i0
        return (1 - f) * value[i0] + f * value[i1]
    return value


def _param(pname, scopes, name, t, default):
    for sc in scopes:
        if sc and pname in sc:
            v = _setting(sc[pname], name, t)
            if v is not None:
                return v
    return default


def _ties_inputs(recipe: dict, n_layers: int, names: list[str]):
    """{output tensor: (base model, [(model, input tensor, density), ...])} for a TIES recipe."""
    top = recipe.get("parameters")
    base = recipe["base_model"]
    out = {}
    if "models" in recipe:
        for name in names:
            parts = name.split(".")
            t = int(parts[2]) / (n_layers - 1) if name.startswith("model.layers.") else 0.0
            srcs = [(m["model"], name, _param("density", [m.get("parameters"), top], name, t, 1.0))
                    for m in recipe["models"] if m["model"] != base]
            out[name] = (base, name, srcs)
        return out
    suffixes = sorted({name.split(".", 3)[3] for name in names if name.startswith("model.layers.")})
    out_layer = 0
    for sl in recipe["slices"]:
        srcs = sl["sources"]
        n = srcs[0]["layer_range"][1] - srcs[0]["layer_range"][0]
        base_src = next(s for s in srcs if s["model"] == base)
        for off in range(n):
            t = off / (n - 1) if n > 1 else 1.0
            for suf in suffixes:
                oname = f"model.layers.{out_layer}.{suf}"
                inputs = []
                for s in srcs:
                    if s["model"] == base:
                        continue
                    iname = f"model.layers.{s['layer_range'][0] + off}.{suf}"
                    inputs.append((s["model"], iname,
                                   _param("density", [s.get("parameters"), sl.get("parameters"), top], iname, t, 1.0)))
                out[oname] = (base, f"model.layers.{base_src['layer_range'][0] + off}.{suf}", inputs)
            out_layer += 1
    for name in names:
        if not name.startswith("model.layers."):
            sl = recipe["slices"][0 if "embed" in name else -1]
            inputs = [(s["model"], name, _param("density", [s.get("parameters"), sl.get("parameters"), top], name, 0.0, 1.0))
                      for s in sl["sources"] if s["model"] != base]
            out[name] = (base, name, inputs)
    return out


@pytest.mark.parametrize("name", [n for n in ALL if n.startswith("ties")])
def test_ties_matches_mergekit_up_to_ties(merged, name):
    recipe_path, ours, ref = _outputs(merged, name)
    recipe = yaml.safe_load(recipe_path.read_text())
    inputs_cache: dict[str, dict[str, torch.Tensor]] = {}

    def tensor(model: str, tname: str) -> torch.Tensor:
        if model not in inputs_cache:
            inputs_cache[model] = load_dir(Path(model))
        return inputs_cache[model][tname]

    base_layers = json.loads((Path(recipe["base_model"]) / "config.json").read_text())["num_hidden_layers"]
    plan = _ties_inputs(recipe, base_layers, sorted(ref))
    assert sorted(plan) == sorted(ref)
    differing = tied_total = bound = sparsified = 0
    for k in sorted(ref):
        diff = (ours[k].double() - ref[k].double()).abs()
        bad = diff > 1e-6
        base_model, base_name, srcs = plan[k]
        dt = DELTA_DTYPE.get(name, torch.float32)  # the dtype both tools compute the delta in
        b = tensor(base_model, base_name).to(dt)
        tied = torch.zeros(b.shape, dtype=torch.bool)
        for model, iname, density in srcs:
            if density >= 1:
                continue
            sparsified += 1
            mags = (tensor(model, iname).to(dt) - b).abs().float().reshape(-1)
            kk = max(1, int(density * mags.numel()))
            kth = torch.sort(mags, descending=True).values[kk - 1]
            at_kth = mags == kth
            n_eq = int(at_kth.sum())
            quota = kk - int((mags > kth).sum())  # how many of the n_eq tied entries are kept
            if n_eq > 1:  # a unique k-th value leaves no choice
                tied |= at_kth.reshape(b.shape)
                # two choices of `quota` among `n_eq` disagree on at most 2 * min(quota, n_eq - quota) entries
                bound += 2 * min(quota, n_eq - quota)
        tied_total += int(tied.sum())
        unexplained = bad & ~tied
        assert not bool(unexplained.any()), (
            f"{name}: {k}: {int(unexplained.sum())} elements differ from mergekit (max {float(diff[unexplained].max()):.3g}) "
            f"without being tied at the top-k threshold")
        differing += int(bad.sum())
    total = sum(t.numel() for t in ref.values())
    print(f"{name}: {differing} of {total} elements differ from mergekit, all at top-k ties "
          f"({tied_total} threshold-tied entries, at most {bound} can differ; {sparsified} sparsified tensor inputs)")
    assert sparsified > 0
    assert differing <= bound
    if name in BF16_RECIPES:
        assert differing <= total * 0.1  # bf16 inputs: coarse deltas, |delta| ties by the thousand
    else:
        assert differing <= max(10, total * 1e-4)  # float32 inputs: ties are rare
