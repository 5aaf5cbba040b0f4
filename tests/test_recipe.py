"""Recipe parsing and parameter resolution: gradients, filters, scope precedence, layer positions, slices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergequant.errors import RecipeError
from mergequant.merge.params import evaluate_setting, interpolate, layer_position, resolve
from mergequant.merge.plan import build_plan, open_models
from mergequant.merge.run import MergeOptions, run_merge
from mergequant.recipe import load_recipe, parse_recipe

L = 4  # layers of the fixture models
UP = "mlp.up_proj.weight"


def plan_for(text: str, tmp_path: Path, **kw):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    recipe = load_recipe(path)
    return build_plan(recipe, open_models(recipe), **kw)


def by_name(plan):
    return {t.name: t for t in plan.tensors}


def per_model_of(tp, model_ref) -> dict:
    i = [m for m, _ in tp.inputs].index(str(model_ref))
    return tp.per_model[i]


# ---------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t, expected", [(0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.6, 0.9), (0.75, 0.75), (1.0, 0.5)])
def test_gradient_three_points(t, expected):
    # anchors at t = 0, 0.5, 1 with values 0, 1, 0.5; linear in between (computed by hand)
    assert evaluate_setting([0.0, 1.0, 0.5], "x", t) == pytest.approx(expected, abs=1e-12)
    assert interpolate([0.0, 1.0, 0.5], t) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("i, expected", [(0, 0.2), (1, 0.4), (2, 0.6), (3, 0.8)])
def test_gradient_over_layers(i, expected):
    assert evaluate_setting([0.2, 0.8], "x", layer_position(i, 4)) == pytest.approx(expected, abs=1e-12)


def test_gradient_five_points_and_scalars():
    vals = [1.0, 3.0, 2.0, 2.0, 0.0]  # anchors every 0.25
    assert evaluate_setting(vals, "x", 0.125) == pytest.approx(2.0)
    assert evaluate_setting(vals, "x", 0.3) == pytest.approx(3.0 - 0.2)
    assert evaluate_setting(vals, "x", 0.875) == pytest.approx(1.0)
    assert evaluate_setting(0.7, "x", 0.3) == 0.7
    assert evaluate_setting(True, "x", 0.3) is True


def test_layer_position():
    assert [layer_position(i, 4) for i in range(4)] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert layer_position(0, 1) == 1.0


# ---------------------------------------------------------------------------------------------------
# filters
# ---------------------------------------------------------------------------------------------------
FILTERED = [{"filter": "mlp", "value": 0.1}, {"filter": "self_attn", "value": 0.2}, {"value": 0.3}]


@pytest.mark.parametrize("name, expected", [
    ("model.layers.0.mlp.up_proj.weight", 0.1),
    ("model.layers.0.self_attn.q_proj.weight", 0.2),
    ("model.layers.0.input_layernorm.weight", 0.3),
    ("model.embed_tokens.weight", 0.3),
])
def test_filter_first_match_then_default(name, expected):
    assert evaluate_setting(FILTERED, name, 0.5) == expected


def test_filter_first_matching_entry_wins():
    name = "model.layers.0.mlp.up_proj.weight"
    assert evaluate_setting([{"filter": "mlp", "value": 0.1}, {"filter": "up_proj", "value": 0.2}], name, 0) == 0.1
    assert evaluate_setting([{"filter": "up_proj", "value": 0.2}, {"filter": "mlp", "value": 0.1}], name, 0) == 0.2
    assert evaluate_setting([{"filter": "*", "value": 0.9}, {"filter": "mlp", "value": 0.1}], name, 0) == 0.9
    assert evaluate_setting([{"value": 0.8}, {"filter": "mlp", "value": 0.1}], name, 0) == 0.8
    assert evaluate_setting({"filter": "mlp", "value": 0.4}, name, 0) == 0.4  # a single mapping


def test_filter_with_gradient_value_and_no_match():
    name = "model.layers.2.mlp.down_proj.weight"
    assert evaluate_setting([{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}], name, 0.25) == pytest.approx(0.25)
    assert evaluate_setting([{"filter": "self_attn", "value": 0.2}], name, 0.5) is None


def test_resolve_falls_through_scopes_when_no_filter_matches():
    name = "model.layers.0.mlp.up_proj.weight"
    source = {"weight": [{"filter": "self_attn", "value": 0.9}]}
    top = {"weight": 0.25}
    assert resolve("weight", [source, None, top], name, 0.0) == 0.25
    assert resolve("weight", [source, None, top], "model.layers.0.self_attn.q_proj.weight", 0.0) == 0.9
    assert resolve("density", [source, None, top], name, 0.0) is None


# ---------------------------------------------------------------------------------------------------
# precedence through build_plan: per-source > slice > top-level > default
# ---------------------------------------------------------------------------------------------------
def test_precedence_slices_form(f32_models, tmp_path):
    base, a, b = f32_models["base"], f32_models["a"], f32_models["b"]
    text = f"""\
merge_method: ties
base_model: {base}
parameters:
  weight: 0.1
  density: 0.3
  normalize: true
  lambda: 0.9
slices:
  - sources:
      - model: {base}
        layer_range: [0, {L}]
      - model: {a}
        layer_range: [0, {L}]
        parameters: {{weight: 0.7}}
      - model: {b}
        layer_range: [0, {L}]
    parameters:
      density: 0.5
      normalize: false
"""
    plan = plan_for(text, tmp_path)
    assert len(plan.tensors) == 3 + 9 * L
    for tp in plan.tensors:
        assert tp.inputs[tp.base_index][0] == str(base)
        assert tp.per_model[tp.base_index] == {}
        assert per_model_of(tp, a) == {"weight": 0.7, "density": 0.5}, tp.name  # source > slice
        assert per_model_of(tp, b) == {"weight": 0.1, "density": 0.5}, tp.name  # slice > top, top for weight
        assert tp.shared["normalize"] is False  # slice > top-level
        assert tp.shared["lambda"] == 0.9  # top-level > default
        assert tp.shared["rescale"] is False and tp.shared["int8_mask"] is False  # defaults


def test_precedence_models_form_with_filters(f32_models, tmp_path):
    base, a, b = f32_models["base"], f32_models["a"], f32_models["b"]
    text = f"""\
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters:
      weight: [{{filter: mlp, value: 0.9}}]
      density: 0.6
  - model: {b}
    parameters: {{weight: 0.4}}
parameters:
  weight: 0.2
  density: [{{filter: self_attn, value: 0.35}}, {{value: 0.45}}]
"""
    plan = plan_for(text, tmp_path)
    tps = by_name(plan)
    mlp, attn, norm = (tps[f"model.layers.1.{s}"] for s in (UP, "self_attn.q_proj.weight", "input_layernorm.weight"))
    assert per_model_of(mlp, a) == {"weight": 0.9, "density": 0.6}
    assert per_model_of(attn, a) == {"weight": 0.2, "density": 0.6}  # source filter missed -> top-level
    assert per_model_of(attn, b) == {"weight": 0.4, "density": 0.35}
    assert per_model_of(norm, b) == {"weight": 0.4, "density": 0.45}
    assert mlp.shared["normalize"] is True and mlp.shared["lambda"] == 1.0  # ties defaults
    assert [m for m, _ in mlp.inputs] == [str(a), str(b), str(base)]  # base appended when not listed


def test_default_density_is_one(f32_models, tmp_path):
    base, a, b = f32_models["base"], f32_models["a"], f32_models["b"]
    text = f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{weight: 0.5}}\n"
    plan = plan_for(text, tmp_path)
    tp = plan.tensors[0]
    assert per_model_of(tp, a) == {"weight": 0.5, "density": 1.0}
    assert tp.shared["normalize"] is False


# ---------------------------------------------------------------------------------------------------
# gradient position t: 0 for embeddings/norm/lm_head, i/(L-1) for layers
# ---------------------------------------------------------------------------------------------------
def test_t_for_embeddings_and_layers(f32_models, tmp_path):
    a, b = f32_models["a"], f32_models["b"]
    text = f"""\
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: [0.2, 0.8]}}
  - model: {b}
    parameters: {{weight: [1.0, 0.0, 0.5]}}
"""
    tps = by_name(plan_for(text, tmp_path))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert per_model_of(tps[name], a)["weight"] == pytest.approx(0.2)
        assert per_model_of(tps[name], b)["weight"] == pytest.approx(1.0)
    hand_b = {0: 1.0, 1: 1 / 3, 2: 1 / 6, 3: 0.5}  # [1, 0, .5] at t = 0, 1/3, 2/3, 1
    for i in range(L):
        for suffix in (UP, "self_attn.k_proj.weight", "post_attention_layernorm.weight"):
            tp = tps[f"model.layers.{i}.{suffix}"]
            assert per_model_of(tp, a)["weight"] == pytest.approx(0.2 + 0.6 * i / 3)
            assert per_model_of(tp, b)["weight"] == pytest.approx(hand_b[i])


def test_t_restarts_in_each_slice(f32_models, tmp_path):
    a, b = f32_models["a"], f32_models["b"]
    text = f"""\
merge_method: linear
parameters: {{weight: [0.2, 1.0]}}
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}, {{model: {b}, layer_range: [0, 3]}}]
  - sources: [{{model: {a}, layer_range: [3, 4]}}, {{model: {b}, layer_range: [3, 4]}}]
"""
    tps = by_name(plan_for(text, tmp_path))
    got = [tps[f"model.layers.{i}.{UP}"].per_model[0]["weight"] for i in range(4)]
    assert got == pytest.approx([0.2, 0.6, 1.0, 1.0])  # 3-layer slice: t = 0, .5, 1; 1-layer slice: t = 1
    assert tps["model.embed_tokens.weight"].per_model[0]["weight"] == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------------
# slices: output layers are renumbered
# ---------------------------------------------------------------------------------------------------
def test_slices_renumber_output_layers(f32_models, tmp_path):
    a, b = f32_models["a"], f32_models["b"]
    text = f"""\
merge_method: linear
parameters: {{weight: 1.0}}
slices:
  - sources: [{{model: {a}, layer_range: [2, 4]}}]
  - sources: [{{model: {b}, layer_range: [0, 3]}}]
"""
    plan = plan_for(text, tmp_path)
    expected_src = [(str(a), 2), (str(a), 3), (str(b), 0), (str(b), 1), (str(b), 2)]
    assert plan.num_layers_out == 5 and plan.layer_sources == expected_src
    tps = by_name(plan)
    layer_names = {n for n in tps if n.startswith("model.layers.")}
    assert layer_names == {f"model.layers.{i}.{s}" for i in range(5) for s in
                           ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                            "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                            "mlp.gate_proj.weight", UP, "mlp.down_proj.weight")}
    for out_i, (model, in_i) in enumerate(expected_src):
        assert tps[f"model.layers.{out_i}.{UP}"].inputs == [(model, f"model.layers.{in_i}.{UP}")]
    assert tps["model.embed_tokens.weight"].inputs == [(str(a), "model.embed_tokens.weight")]  # first slice
    assert tps["lm_head.weight"].inputs == [(str(b), "lm_head.weight")]  # last slice

    # and the written model really is that stack
    out = tmp_path / "out"
    run_merge(tmp_path / "recipe.yaml", MergeOptions(out=out, quiet=True, fsync=False), log=lambda m: None)
    merged = load_file(out / "model.safetensors")
    A = {k: v for f in a.glob("*.safetensors") for k, v in load_file(f).items()}
    B = {k: v for f in b.glob("*.safetensors") for k, v in load_file(f).items()}
    src = {str(a): A, str(b): B}
    assert len(merged) == 3 + 9 * 5
    for out_i, (model, in_i) in enumerate(expected_src):
        assert torch.equal(merged[f"model.layers.{out_i}.{UP}"], src[model][f"model.layers.{in_i}.{UP}"])
    assert torch.equal(merged["model.embed_tokens.weight"], A["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], B["lm_head.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5


# ---------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, needle", [
    ("merge_method: linear\n", "exactly one of 'models' or 'slices'"),
    ("merge_method: linear\nmodels: [{model: x}]\nslices: [{sources: [{model: x, layer_range: [0, 1]}]}]\n",
     "exactly one of"),
    ("models: [{model: x, parameters: {weight: 1}}]\n", "merge_method: missing"),
    ("merge_method: ties\nmodels: [{model: x, parameters: {weight: 1}}]\n", "needs a base_model"),
    ("merge_method: linear\nslices: [{sources: [{model: x, layer_range: [2, 1]}]}]\nparameters: {weight: 1}\n",
     "layer_range"),
    ("merge_method: linear\nslices: [{sources: [{model: x, layer_range: [0, 2]}, {model: y, layer_range: [0, 3]}]}]\n"
     "parameters: {weight: 1}\n", "same number of layers"),
    ("merge_method: slerp\nbase_model: x\nmodels: [{model: x}, {model: y}]\n", "missing required parameter 't'"),
    ("merge_method: slerp\nbase_model: x\nmodels: [{model: x}, {model: y}]\nparameters: {t: 1.5}\n", "t must be in [0, 1]"),
    ("merge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}]\ndtype: float8\n", "dtype"),
    ("merge_method: linear\nmodels: [{model: x, parameters: {weight: [{filter: mlp, valeu: 1}]}}]\n", "did you mean 'value'"),
    ("merge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}]\nparameters: {normalize: 3}\n", "true or false"),
    ("merge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}]\nmodules: {}\n", "not supported"),
    ("- just\n- a list\n", "expected a mapping"),
])
def test_recipe_validation_errors(text, needle):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, Path("bad.yaml"))
    msg = str(e.value)
    assert msg.startswith("bad.yaml: ") and needle in msg and "\n" not in msg, msg


def test_unknown_key_in_nested_scope_names_location():
    with pytest.raises(RecipeError) as e:
        parse_recipe("merge_method: linear\nmodels:\n  - model: x\n    paramters: {weight: 1}\n", Path("r.yaml"))
    assert "models[0].paramters" in str(e.value) and "did you mean 'parameters'" in str(e.value)


def test_valid_recipe_round_trip():
    text = "merge_method: ties\nbase_model: org/base\nmodels:\n  - model: org/a\n    parameters: {weight: 1, density: 0.5}\n"
    r = parse_recipe(text, Path("r.yaml"))
    assert r.text == text and r.merge_method == "ties" and r.model_refs() == ["org/base", "org/a"]
    assert r.warnings == []
