"""Merging mixture-of-experts checkpoints in either on-disk layout (see docs/merge.md, *Mixture-of-experts models*).

Per-expert checkpoints (the Hub's layout: one 2-D weight per expert) and fused ones (mergekit 0.1.5's and
``save_pretrained(save_original_format=False)``'s: ``mlp.experts.gate_up_proj`` [E, 2I, H] and
``mlp.experts.down_proj`` [E, H, I]) must give the same merge, byte for byte, alone or mixed in one recipe;
``--moe-layout fused`` must write exactly the per-expert result fused; element-wise methods must equal
mergekit 0.1.5 in float32; the merge must load in transformers and compute what a float64 merge computes.

The fused copies are made here with this file's own stacking code (and by transformers for Qwen-MoE), never
with mergequant's, so a wrong slice in mergequant cannot hide behind the same wrong slice in the test.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import run_cli
from mergequant.errors import MergeQuantError
from mergequant.merge.run import MergeOptions, run_merge

# the read-only shared folder sits beside the repository (also in CI's fresh clone); /work/shared here
MIXTRAL = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "models" / "moe-mixtral",
                            Path("/work/shared/models/moe-mixtral")) if (p / "base" / "config.json").exists()),
               Path("/work/shared/models/moe-mixtral"))
NEEDS_MIXTRAL = pytest.mark.skipif(not (MIXTRAL / "base" / "config.json").exists(), reason="shared tiny Mixtral missing")
EXTRA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
# (per-expert module, gate, up, down, router in the per-expert layout) per family; the fused router is mlp.gate
NAMES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2", "block_sparse_moe.gate"),
         "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj", "mlp.gate"),
         "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj", "mlp.gate")}


# ---- checkpoints written by the test ------------------------------------------------------------------------

def read_all(model: Path) -> dict[str, torch.Tensor]:
    out = {}
    for fn in sorted(model.glob("*.safetensors")):
        with safe_open(fn, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def write_model(dst: Path, tensors: dict[str, torch.Tensor], like: Path, config: dict | None = None) -> Path:
    """``tensors`` as two safetensors shards with an index, beside ``like``'s config and tokenizer."""
    dst.mkdir(parents=True)
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in EXTRA_FILES:
        if (like / f).exists():
            shutil.copy(like / f, dst / f)
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def fuse(sd: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Per-expert tensors stacked into the fused layout (gate_up = cat(gate, up) rows per expert)."""
    block, g, u, d, router = NAMES[family]
    expert = re.compile(rf"model\.layers\.(\d+)\.{re.escape(block)}\.experts\.(\d+)\.(\w+)\.weight$")
    out, groups = {}, {}
    for name, t in sd.items():
        if hit := expert.match(name):
            groups.setdefault(int(hit.group(1)), {})[(int(hit.group(2)), hit.group(3))] = t
        elif name.endswith(f".{router}.weight"):
            out[name.replace(f".{router}.", ".mlp.gate.")] = t
        else:
            out[name] = t
    for layer, m in groups.items():
        n = 1 + max(e for e, _ in m)
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([m[e, g], m[e, u]]) for e in range(n)])
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([m[e, d] for e in range(n)])
    return out


def unfuse(sd: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`fuse` (for mergekit's fused output)."""
    block, g, u, d, router = NAMES[family]
    out = {}
    for name, t in sd.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            pre, inter = name[: -len(".mlp.experts.gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{pre}.{block}.experts.{e}.{g}.weight"] = t[e, :inter]
                out[f"{pre}.{block}.experts.{e}.{u}.weight"] = t[e, inter:]
        elif name.endswith(".mlp.experts.down_proj"):
            pre = name[: -len(".mlp.experts.down_proj")]
            for e in range(t.shape[0]):
                out[f"{pre}.{block}.experts.{e}.{d}.weight"] = t[e]
        elif name.endswith(".mlp.gate.weight"):
            out[name.replace(".mlp.gate.", f".{router}.")] = t
        else:
            out[name] = t
    return out


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> dict[str, Path]:
    """The shared tiny Mixtral (per-expert, bf16) and fused copies of it: base, poet, coder, *_fused."""
    if not (MIXTRAL / "base" / "config.json").exists():
        pytest.skip("shared tiny Mixtral missing")
    root = tmp_path_factory.mktemp("mixtral")
    models = {n: MIXTRAL / n for n in ("base", "poet", "coder")}
    for n in ("base", "poet", "coder"):
        models[f"{n}_fused"] = write_model(root / f"{n}_fused", fuse(read_all(MIXTRAL / n), "mixtral"), MIXTRAL / n)
    return models


def _tiny_qwen(family: str, root: Path, **over):
    """A tiny random Qwen-MoE base and a perturbed fine-tune, each saved per-expert and fused by transformers."""
    import transformers

    cls, cfg_cls = {"qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig"),
                    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig")}[family]
    cfg = dict(hidden_size=64, moe_intermediate_size=32, intermediate_size=48, shared_expert_intermediate_size=48,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
               num_experts_per_tok=2, vocab_size=128, tie_word_embeddings=False)
    cfg.update(over)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**cfg))
    out = {}
    for name, seed in (("base", None), ("ft", 1)):
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name)
        model.save_pretrained(root / f"{name}_fused", save_original_format=False)
        out[name], out[f"{name}_fused"] = root / name, root / f"{name}_fused"
    return out


def recipe(tmp: Path, text: str, **models: Path) -> Path:
    body = textwrap.dedent(text)
    for k, v in models.items():
        body = body.replace(f"${k}", str(v))
    path = tmp / f"recipe-{len(list(tmp.glob('recipe-*.yaml')))}.yaml"
    path.write_text(body)
    return path


def merge(recipe_path: Path, out: Path, **kw) -> Path:
    run_merge(recipe_path, MergeOptions(out=out, quiet=True, fsync=False, **kw), log=lambda m: None)
    return out


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


TIES = """
    merge_method: ties
    base_model: $base
    models:
      - model: $a
        parameters: {weight: [0.3, 0.8], density: 0.5}
      - model: $b
        parameters: {weight: [{filter: experts, value: 0.7}, {value: 0.4}], density: 0.6}
"""
DARE = """
    merge_method: dare_ties
    base_model: $base
    models:
      - model: $a
        parameters: {weight: 0.6, density: 0.5}
"""


# ---- layouts --------------------------------------------------------------------------------------------------

@NEEDS_MIXTRAL
def test_mixtral_fused_and_mixed_inputs_give_identical_bytes(mixtral, tmp_path):
    """Per-expert inputs, fused inputs and two mixes (fused base, per-expert base) merge to the same bytes."""
    m = mixtral
    outs = {}
    for label, (base, a, b) in {"per-expert": ("base", "poet", "coder"),
                                "fused": ("base_fused", "poet_fused", "coder_fused"),
                                "mixed-fused-base": ("base_fused", "poet", "coder_fused"),
                                "mixed-per-expert-base": ("base", "poet_fused", "coder")}.items():
        outs[label] = shard_bytes(merge(recipe(tmp_path, TIES, base=m[base], a=m[a], b=m[b]), tmp_path / label))
    ref = outs.pop("per-expert")
    assert ref and all(o == ref for o in outs.values()), [k for k, o in outs.items() if o != ref]
    # and the merge really is not a copy of an input
    merged = read_all(tmp_path / "per-expert")
    base = read_all(MIXTRAL / "base")
    name = "model.layers.2.block_sparse_moe.experts.5.w3.weight"
    assert not torch.equal(merged[name], base[name])


@pytest.mark.slow  # builds MoE models in transformers
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_qwen_moe_fused_as_transformers_writes_it(family, tmp_path):
    """transformers' own fused save (save_original_format=False) merges like its per-expert save."""
    q = _tiny_qwen(family, tmp_path / "models")
    with safe_open(next((q["base_fused"]).glob("*.safetensors")), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()  # the test really feeds the fused layout
    per = shard_bytes(merge(recipe(tmp_path, DARE, base=q["base"], a=q["ft"]), tmp_path / "per"))
    fused = shard_bytes(merge(recipe(tmp_path, DARE, base=q["base_fused"], a=q["ft_fused"]), tmp_path / "fused"))
    mixed = shard_bytes(merge(recipe(tmp_path, DARE, base=q["base_fused"], a=q["ft"]), tmp_path / "mixed"))
    assert per == fused == mixed


@pytest.mark.slow  # merges the tiny Mixtral twice
@NEEDS_MIXTRAL
def test_fused_output_is_the_per_expert_output_fused(mixtral, tmp_path):
    """--moe-layout fused (real CLI, mixed inputs) writes exactly fuse(per-expert output); config unchanged."""
    m = mixtral
    r = recipe(tmp_path, TIES, base=m["base"], a=m["poet_fused"], b=m["coder"])
    per = merge(r, tmp_path / "per")
    proc = run_cli("merge", r, "-o", tmp_path / "fused", "--moe-layout", "fused", "-q", "--shard-size", "8MB")
    assert proc.returncode == 0, proc.stderr
    got = read_all(tmp_path / "fused")
    want = fuse(read_all(per), "mixtral")
    assert sorted(got) == sorted(want)
    assert "model.layers.0.mlp.gate.weight" in got and got["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 768, 256)
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    assert json.loads((tmp_path / "fused" / "config.json").read_text()) == json.loads((per / "config.json").read_text())
    index = json.loads((tmp_path / "fused" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want)


# ---- against mergekit 0.1.5 -------------------------------------------------------------------------------------

MK_RECIPES = {
    "linear": """
        merge_method: linear
        models:
          - model: $base
            parameters: {weight: [0.2, 1.0]}
          - model: $a
            parameters:
              weight: [{filter: experts, value: [0.5, 1.5]}, {filter: gate, value: 0.9}, {value: 1.2}]
          - model: $b
            parameters: {weight: 0.4}
        parameters: {normalize: true}
        dtype: float32
    """,
    # `filter: mlp` is mergekit's name for Mixtral's experts and router (fused layout), ours on disk is block_sparse_moe
    "task_arithmetic": """
        merge_method: task_arithmetic
        base_model: $base
        models:
          - model: $a
            parameters:
              weight: [{filter: mlp, value: [1.2, 0.1]}, {filter: self_attn, value: 0.7}, {value: 0.3}]
          - model: $b
            parameters: {weight: [0.2, 0.9]}
        parameters: {lambda: 1.3}
        dtype: float32
    """,
}

MERGEKIT_RUNNER = textwrap.dedent("""
    import json, sys
    from mergekit.scripts.run_yaml import main
    for cfg, out in json.loads(sys.argv[1]):
        main([cfg, out, "--allow-crimes", "--quiet", "--no-write-model-card"], standalone_mode=False)
""")


@pytest.mark.slow  # runs mergekit
@NEEDS_MIXTRAL
def test_elementwise_methods_match_mergekit_float32(tmp_path):
    """linear and task_arithmetic (gradients, filters) over float32 copies of the tiny Mixtral fine-tunes equal
    mergekit 0.1.5's merge (which fuses the experts first) mapped back to per-expert names."""
    pytest.importorskip("mergekit")
    f32 = {n: write_model(tmp_path / f"{n}32", {k: v.float() for k, v in read_all(MIXTRAL / src).items()}, MIXTRAL / src)
           for n, src in (("base", "base"), ("a", "poet"), ("b", "coder"))}
    jobs = [(str(recipe(tmp_path, text, **f32)), str(tmp_path / f"mk-{name}")) for name, text in MK_RECIPES.items()]
    proc = subprocess.Popen([sys.executable, "-c", MERGEKIT_RUNNER, json.dumps(jobs)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ours = {name: read_all(merge(Path(cfg), tmp_path / f"mq-{name}")) for name, (cfg, _) in zip(MK_RECIPES, jobs)}
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    for name, (_, mk_out) in zip(MK_RECIPES, jobs):
        theirs = unfuse(read_all(Path(mk_out)), "mixtral")
        assert sorted(theirs) == sorted(ours[name])
        worst = max(float((ours[name][k] - theirs[k]).abs().max()) for k in theirs)
        assert all(ours[name][k].dtype == torch.float32 for k in theirs)
        print(f"{name}: {len(theirs)} tensors, max |mergequant - mergekit| = {worst:.3g}")
        assert worst <= 1e-6, (name, worst)


# ---- transformers ------------------------------------------------------------------------------------------------

@NEEDS_MIXTRAL
def test_merged_mixtral_loads_and_matches_float64_merge(mixtral, tmp_path):
    """A bf16 linear merge (fused inputs, both output layouts) loads in transformers with no missing or unexpected
    weight, and its logits equal a float64 merge of the three models' weights within bf16 tolerance."""
    from transformers import AutoModelForCausalLM

    m = mixtral
    text = """
        merge_method: linear
        models:
          - {model: $base, parameters: {weight: 0.5}}
          - {model: $a, parameters: {weight: 0.3}}
          - {model: $b, parameters: {weight: 0.2}}
    """
    r = recipe(tmp_path, text, base=m["base_fused"], a=m["poet"], b=m["coder_fused"])
    outs = [merge(r, tmp_path / "per"), merge(r, tmp_path / "fused", moe_layout="fused")]

    def load(path):
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, output_loading_info=True,
                                                           experts_implementation="eager")  # grouped_mm: no float64
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        return model.eval()

    parents = [load(MIXTRAL / n).state_dict() for n in ("base", "poet", "coder")]
    reference = load(MIXTRAL / "base")
    reference.load_state_dict({k: 0.5 * parents[0][k] + 0.3 * parents[1][k] + 0.2 * parents[2][k] for k in parents[0]})
    ids = torch.tensor([[5, 17, 200, 33, 1021, 64, 7, 999, 12, 301, 45, 2000]])
    with torch.no_grad():
        want = reference(ids).logits
        got = [load(o)(ids).logits for o in outs]
    assert torch.equal(got[0], got[1])
    err = float((got[0] - want).abs().max())
    print(f"max |logit - float64 merge| = {err:.4g} (max |logit| {float(want.abs().max()):.3g})")
    assert err < 0.005 * float(want.abs().max()), err  # bf16 weights: ~2^-8 relative


# ---- refusals ----------------------------------------------------------------------------------------------------

@pytest.mark.slow  # builds MoE models per case
@pytest.mark.parametrize("key,value", [("num_experts", 2), ("num_experts_per_tok", 1)])
def test_different_experts_or_top_k_refused_in_one_line(key, value, tmp_path):
    q = _tiny_qwen("qwen3_moe", tmp_path / "a")
    other = _tiny_qwen("qwen3_moe", tmp_path / "b", **{key: value})
    r = recipe(tmp_path, DARE, base=q["base"], a=other["ft_fused"])
    proc = run_cli("merge", r, "-o", tmp_path / "out", "-q")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert str(other["ft_fused"]) in lines[0] and str(q["base"]) in lines[0]
    shown = "num_local_experts" if key == "num_experts" else key  # transformers 5 saves num_experts under this name
    assert f"{shown} is {value} but" in lines[0] and f"has {shown} {2 if key == 'num_experts_per_tok' else 4}" in lines[0]
    assert not (tmp_path / "out").exists()


def test_moe_layout_option_checked(tmp_path, f32_models):
    r = recipe(tmp_path, "merge_method: linear\nmodels:\n  - {model: $a, parameters: {weight: 1}}\n", a=f32_models["a"])
    with pytest.raises(MergeQuantError, match="--moe-layout must be one of per-expert, fused"):
        merge(r, tmp_path / "x", moe_layout="stacked")
    with pytest.raises(MergeQuantError, match="not a mixture-of-experts model"):
        merge(r, tmp_path / "y", moe_layout="fused")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    from mergequant.release import load_release  # release files take the same option under merge

    (tmp_path / "release.yaml").write_text(f"workdir: ./wd\nmerge: {{recipe: {r}, moe_layout: fused}}\n")
    assert load_release(tmp_path / "release.yaml").merge.options["moe_layout"] == "fused"
    (tmp_path / "release.yaml").write_text(f"workdir: ./wd\nmerge: {{recipe: {r}, moe_layout: stacked}}\n")
    with pytest.raises(MergeQuantError, match="merge: --moe-layout must be one of"):
        load_release(tmp_path / "release.yaml")
