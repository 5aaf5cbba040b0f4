"""PEFT LoRA adapters as inputs (issue 12 items 1, 2, 5): ``BASE+ADAPTER`` references and adapter-only folders.

The oracle is peft's own ``merge_and_unload`` in float32: tiny models and random adapters are built in code
with ``get_peft_model`` (every LoRA factor randomised, since peft initialises lora_B to zero), saved with
``save_pretrained``, and every tensor our adapted view returns must be within 1e-6 relative of peft's merged
model. Then the same adapters go through the CLI (merge, quantize, eval, inspect) and through bad inputs.
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from helpers import TINY, cli, load_dir
from mergequant.demo import build_tiny_llama
from mergequant.errors import MergeQuantError
from mergequant.io.checkpoint import Checkpoint
from mergequant.peft.adapted import AdaptedCheckpoint, open_model
from mergequant.peft.apply import adapted_weight
from mergequant.peft.config import read_adapter_config
from mergequant.peft.reference import parse_reference

peft = pytest.importorskip("peft")


# ---- builders ------------------------------------------------------------------------------------------------
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Give every adapter parameter random values (peft starts lora_B / lora_embedding_A at zero, which would
    make the adapter a no-op and the test unable to fail)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def make_adapter(base: Path, out: Path, *, seed: int = 0, **lora) -> dict[str, torch.Tensor]:
    """A random LoRA adapter of ``base`` saved at ``out``; returns peft's merged state dict (float32)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        pm = get_peft_model(model, LoraConfig(**lora))
        _randomise(pm, seed)
        pm.save_pretrained(out)
        merged = pm.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def build_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    """A random tiny GPT-2 (Conv1D layers: weights stored [in, out], peft's fan_in_fan_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=1)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def assert_matches(view, merged: dict[str, torch.Tensor], *, changed: int | None = None) -> int:
    """Every tensor of ``view`` within 1e-6 relative of peft's merged one; returns how many differ from the base."""
    diff = 0
    for name in view.tensors:
        ours = view.get(name).float()
        ref = merged[name].float()
        err = (ours - ref).abs().max().item()
        assert err <= 1e-6 * max(ref.abs().max().item(), 1e-12), f"{name}: max error {err}"
        if not torch.equal(view.base.get(name).float(), ours):
            diff += 1
    if changed is not None:
        assert diff == changed
    return diff


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny float32 Llama (2 layers, hidden 64), one shard."""
    return build_tiny_llama(tmp_path_factory.mktemp("peft") / "base", seed=0, dtype=torch.float32, layers=2, shards=1,
                            **TINY)


@pytest.fixture(scope="module")
def plain(llama, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("plain") / "lora"
    return out, make_adapter(llama, out, seed=1, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])


# ---- the oracle: peft's merge_and_unload -----------------------------------------------------------------------
VARIANTS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "gate_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                     rank_pattern={"layers.1.self_attn.q_proj": 2, "up_proj": 6},
                     alpha_pattern={"v_proj": 3, "model.layers.0.mlp.up_proj": 24}),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "embedding_dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens"]),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head", "norm"]),
    "regex": dict(r=4, lora_alpha=4, target_modules=r".*layers\.1\.(self_attn\.(q|o)_proj|mlp\.up_proj)"),
    "layers_to_transform": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
    "exclude": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
}
# base tensors each variant changes (2 layers)
CHANGED = {"plain": 6, "rslora": 6, "dora": 4, "patterns": 6, "embedding": 3, "embedding_dora": 1,
           "modules_to_save": 2 + 6,  # q_proj x2; lm_head, model.norm and (suffix match) both layer norms x2
           "regex": 3, "layers_to_transform": 2, "exclude": 3}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_adapted_view_matches_peft(variant, llama, tmp_path):
    merged = make_adapter(llama, tmp_path / variant, seed=7, **VARIANTS[variant])
    view = open_model(f"{llama}+{tmp_path / variant}")
    assert isinstance(view, AdaptedCheckpoint)
    assert_matches(view, merged, changed=CHANGED[variant])


def test_fan_in_fan_out_gpt2_conv1d_and_lora_bias(tmp_path):
    """GPT-2's Conv1D stores [in, out]: peft's fan_in_fan_out; lora_bias adds s * b_B to the layer's bias."""
    base = build_tiny_gpt2(tmp_path / "gpt2")
    merged = make_adapter(base, tmp_path / "lora", seed=3, r=4, lora_alpha=8, fan_in_fan_out=True, lora_bias=True,
                          target_modules=["c_attn", "c_proj"])
    view = open_model(f"{base}+{tmp_path / 'lora'}")
    assert view.adapter_config.fan_in_fan_out
    # 2 layers x (attn.c_attn, attn.c_proj, mlp.c_proj) x (weight, bias)
    assert_matches(view, merged, changed=12)


def test_gpt2_dora_fan_in_fan_out(tmp_path):
    base = build_tiny_gpt2(tmp_path / "gpt2")
    merged = make_adapter(base, tmp_path / "lora", seed=4, r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True,
                          target_modules=["c_fc"])
    assert_matches(open_model(f"{base}+{tmp_path / 'lora'}"), merged, changed=2)


def test_rounded_once_to_the_base_dtype(tmp_path, plain):
    """A bf16 base: the adapted tensor is the float32 sum rounded once to bf16 (not a bf16 sum)."""
    base = build_tiny_llama(tmp_path / "bf16", seed=0, dtype=torch.bfloat16, layers=2, shards=1, **TINY)
    view = open_model(f"{base}+{plain[0]}")
    name = "model.layers.0.self_attn.q_proj.weight"
    got = view.get(name)
    assert got.dtype == torch.bfloat16
    m = view._jobs[name].module
    want = adapted_weight(view.base.get(name), m.A, m.B, 2.0).to(torch.bfloat16)
    assert torch.equal(got, want)
    assert not torch.equal(got, view.base.get(name))


def test_scale_per_module(plain, llama, tmp_path):
    make_adapter(llama, tmp_path / "p", seed=1, **VARIANTS["patterns"])
    cfg = read_adapter_config(tmp_path / "p")
    assert cfg.rank_alpha("model.layers.1.self_attn.q_proj") == (2, 8)
    assert cfg.rank_alpha("model.layers.0.self_attn.q_proj") == (4, 8)
    assert cfg.rank_alpha("model.layers.0.self_attn.v_proj") == (4, 3)
    assert cfg.scale("model.layers.0.mlp.up_proj") == 24 / 6
    rs = read_adapter_config(plain[0])
    assert rs.scale("model.layers.0.self_attn.q_proj") == 2.0


# ---- references ----------------------------------------------------------------------------------------------
def test_parse_reference(tmp_path):
    assert parse_reference("org/base@v1+org/lora@main").base == "org/base@v1"
    assert parse_reference("org/base@v1+org/lora@main").adapter == "org/lora@main"
    assert parse_reference("org/base").adapter is None
    odd = tmp_path / "model+v2"
    odd.mkdir()
    assert parse_reference(str(odd)).adapter is None  # an existing path containing '+' is a path
    for bad in ("+org/lora", "org/base+", "a+b+c"):
        with pytest.raises(MergeQuantError, match="BASE\\+ADAPTER"):
            parse_reference(bad)


def test_adapter_only_folder_resolves_its_base(plain, llama):
    view = open_model(plain[0])
    assert isinstance(view, AdaptedCheckpoint)
    assert view.adapter.base_from_config and view.path == llama
    assert "base_model_name_or_path" in view.note
    assert_matches(view, plain[1])


def test_adapter_only_folder_with_a_moved_base(plain, llama, tmp_path):
    """base_model_name_or_path names a folder that is not there: the error says how to name the base."""
    moved = tmp_path / "lora"
    shutil.copytree(plain[0], moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeQuantError, match=r"BASE\+"):
        open_model(moved)
    assert isinstance(open_model(f"{llama}+{moved}"), AdaptedCheckpoint)  # the override


# ---- bad inputs --------------------------------------------------------------------------------------------------
def test_missing_adapter_config(plain, llama, tmp_path):
    broken = tmp_path / "lora"
    shutil.copytree(plain[0], broken)
    (broken / "adapter_config.json").unlink()
    with pytest.raises(MergeQuantError, match="no adapter_config.json"):
        open_model(f"{llama}+{broken}")
    with pytest.raises(MergeQuantError, match="is a full model"):
        open_model(f"{llama}+{llama}")


@pytest.mark.parametrize("ptype", ["IA3", "LOHA", "LOKR", "ADALORA"])
def test_unsupported_peft_type(plain, llama, tmp_path, ptype):
    other = tmp_path / "other"
    shutil.copytree(plain[0], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["peft_type"] = ptype
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeQuantError, match=f"peft_type {ptype} is not supported") as e:
        open_model(f"{llama}+{other}")
    assert "\n" not in str(e.value)


def test_wrong_base_names_the_module(plain, tmp_path):
    other = build_tiny_llama(tmp_path / "wide", seed=0, dtype=torch.float32, layers=2, shards=1,
                             **{**TINY, "intermediate": 96})
    with pytest.raises(MergeQuantError, match=r"module model\.layers\.0\.mlp\.(gate|down)_proj: lora_A .* do not fit"):
        open_model(f"{other}+{plain[0]}")
    shallow = build_tiny_llama(tmp_path / "shallow", seed=0, dtype=torch.float32, layers=1, shards=1, **TINY)
    with pytest.raises(MergeQuantError, match=r"module model\.layers\.1\.\S+ is not in the base model"):
        open_model(f"{shallow}+{plain[0]}")


def test_inconsistent_rank_is_refused(plain, llama, tmp_path):
    other = tmp_path / "lora"
    shutil.copytree(plain[0], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["r"] = 8
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeQuantError, match="do not have rank r=8"):
        open_model(f"{llama}+{other}")


class _Boom:
    """Unpickling this runs ``open(sentinel, 'w')``: what a malicious adapter_model.bin would do."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def test_malicious_pickled_adapter_bin_does_not_run(plain, llama, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copyfile(plain[0] / "adapter_config.json", evil / "adapter_config.json")
    sentinel = tmp_path / "pwned"
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _Boom(str(sentinel))},
               evil / "adapter_model.bin")
    with pytest.raises(MergeQuantError, match="weights_only=True"):
        open_model(f"{llama}+{evil}")
    assert not sentinel.exists()
    # the same pickle stream without torch's zip container
    with open(evil / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Boom(str(sentinel))}, f, protocol=2)
    with pytest.raises(MergeQuantError):
        open_model(f"{llama}+{evil}")
    assert not sentinel.exists()


def test_adapter_bin_with_tensors_is_read(plain, llama, tmp_path):
    from safetensors.torch import load_file

    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copyfile(plain[0] / "adapter_config.json", binary / "adapter_config.json")
    torch.save(load_file(plain[0] / "adapter_model.safetensors"), binary / "adapter_model.bin")
    assert_matches(open_model(f"{llama}+{binary}"), plain[1])


# ---- end to end through the CLI ------------------------------------------------------------------------------------
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
        "of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families.\n") * 12


def _write_model(path: Path, like: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A full model folder with ``like``'s config and tokenizer and ``tensors``: what peft's merged model (or our
    view materialized) would be on disk, for the side-by-side runs."""
    from mergequant.demo import write_checkpoint

    cfg = json.loads((like / "config.json").read_text())
    return write_checkpoint(path, cfg, tensors, shards=1)


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def family(llama, plain, tmp_path_factory) -> dict[str, Path]:
    """base, its adapter, a fine-tune of the base, and (for comparison only) peft's merged model written out."""
    from mergequant.demo import finetune_of

    root = tmp_path_factory.mktemp("fam")
    names = Checkpoint.open(llama).tensors
    return {"base": llama, "lora": plain[0], "ft": finetune_of(llama, root / "ft", seed=5, shards=1),
            "peft_merged": _write_model(root / "peft_merged", llama, {n: plain[1][n] for n in names})}


def _close(a: dict, b: dict, rel: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for n in a:
        err = (a[n].float() - b[n].float()).abs().max().item()
        assert err <= rel * max(b[n].float().abs().max().item(), 1e-12), f"{n}: {err}"


RECIPES = {
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {adapted}
    parameters: {{weight: 0.6, density: 0.7}}
  - model: {ft}
    parameters: {{weight: 0.4, density: 0.7}}
dtype: float32
""",
    "slices": """
merge_method: slerp
base_model: {base}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 2]}}
      - {{model: {adapted}, layer_range: [0, 2]}}
parameters: {{t: 0.3}}
dtype: float32
""",
}


@pytest.mark.parametrize("form", sorted(RECIPES))
def test_merge_recipe_with_base_plus_adapter_equals_merging_peft_merged(form, family, tmp_path):
    def run(adapted: str, name: str) -> Path:
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(RECIPES[form].format(base=family["base"], ft=family["ft"], adapted=adapted))
        proc = cli("merge", recipe, "-o", tmp_path / name, "--quiet", check=True)
        return tmp_path / name, proc

    before = _files(family["base"].parent) | _files(family["lora"])
    ours, proc = run(f"{family['base']}+{family['lora']}", "ours")
    assert "applied tensor by tensor" in proc.stderr + proc.stdout
    # nothing but the recipe and the output appeared in this test's folder
    assert {p.split("/")[0] for p in _files(tmp_path)} == {"ours.yaml", "ours"}
    ref, _ = run(str(family["peft_merged"]), "ref")
    _close(load_dir(ours), load_dir(ref))
    # no merged copy anywhere: the inputs' folders are unchanged and the output holds one model's weights
    assert _files(family["base"].parent) | _files(family["lora"]) == before
    assert sum(p.stat().st_size for p in ours.glob("*.safetensors")) == sum(
        p.stat().st_size for p in ref.glob("*.safetensors"))
    card = (ours / "README.md").read_text()
    assert "## Adapters" in card and f"on base `{family['base']}`" in card


def test_merge_recipe_refuses_bad_adapter_reference(family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES["ties"].format(base=family["base"], ft=family["ft"], adapted=f"{family['base']}+"))
    proc = cli("merge", recipe, "-o", tmp_path / "out")
    assert proc.returncode == 2 and "adapter is missing" in proc.stderr and "models[0].model" in proc.stderr
    recipe.write_text(RECIPES["ties"].format(base=family["base"], ft=family["ft"], adapted=f"{family['base']}+{family['ft']}"))
    proc = cli("merge", recipe, "-o", tmp_path / "out")
    assert proc.returncode == 2 and "no adapter_config.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def materialized(family, tmp_path_factory) -> Path:
    """Our adapted view written out (test-only): quantizing or evaluating the view must give the same bytes."""
    view = open_model(f"{family['base']}+{family['lora']}")
    return _write_model(tmp_path_factory.mktemp("mat") / "adapted", family["base"],
                        {n: view.get(n).clone() for n in view.tensors})


@pytest.mark.parametrize("how", ["base+adapter", "adapter-only"])
def test_quantize_reads_through_the_adapter(how, family, materialized, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    src = f"{family['base']}+{family['lora']}" if how == "base+adapter" else str(family["lora"])
    args = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--calib", calib, "--samples", 4, "--seqlen", 32,
            "--device", "cpu", "-q"]
    before = _files(family["base"].parent) | _files(family["lora"])
    proc = cli("quantize", src, "-o", tmp_path / "ours", *args, check=True)
    assert "applied tensor by tensor" in proc.stderr
    cli("quantize", materialized, "-o", tmp_path / "ref", *args, check=True)
    a, b = load_dir(tmp_path / "ours"), load_dir(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert _files(family["base"].parent) | _files(family["lora"]) == before
    card = (tmp_path / "ours" / "README.md").read_text()
    assert "## Adapters" in card and str(family["lora"]) in card
    assert "base_model_name_or_path" in card if how == "adapter-only" else "base_model_name_or_path" not in card
    # a tokenizer came along (the base's: the adapter folder has none)
    assert (tmp_path / "ours" / "tokenizer.json").is_file()


def test_quantize_rtn_dry_run_and_refusals(family, tmp_path):
    out = tmp_path / "q"
    cli("quantize", f"{family['base']}+{family['lora']}", "-o", out, "--method", "rtn", "--group-size", "32",
        "--dry-run", check=True)
    assert not out.exists()
    proc = cli("quantize", f"{family['base']}+{tmp_path / 'nope'}", "-o", out, "--method", "rtn")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    # the output may not replace the adapter folder (an input)
    proc = cli("quantize", f"{family['base']}+{family['lora']}", "-o", family["lora"], "--method", "rtn",
                "--group-size", "32", "--force")
    assert proc.returncode == 2 and "refusing" in proc.stderr


def test_eval_and_inspect_accept_adapters(family, materialized, tmp_path):
    data = tmp_path / "heldout.txt"
    data.write_text(TEXT)
    rows = []
    for model in (f"{family['base']}+{family['lora']}", family["lora"], materialized):
        proc = cli("eval", model, "--data", data, "--seqlen", 64, "--json", "-q", "--device", "cpu", check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1])["perplexity"])
    assert rows[0] == pytest.approx(rows[2], rel=1e-5) and rows[1] == pytest.approx(rows[2], rel=1e-5)
    base = json.loads(cli("eval", family["base"], "--data", data, "--seqlen", 64, "--json", "-q", "--device", "cpu",
                          check=True).stdout.strip().splitlines()[-1])["perplexity"]
    assert abs(base - rows[0]) > 1e-3  # the adapter changes the model
    for model in (f"{family['base']}+{family['lora']}", family["lora"]):
        info = json.loads(cli("inspect", model, "--json", check=True).stdout)
        assert info["adapter"]["modules"] == 10 and info["adapter"]["base_path"] == str(family["base"])
        assert info["parameters"] == Checkpoint.open(family["base"]).num_parameters
    assert "adapter:" in cli("inspect", family["lora"], check=True).stdout


def test_quantize_takes_the_adapters_tokenizer(family, tmp_path):
    """Fine-tunes often ship their tokenizer (a chat template) with the adapter: it wins over the base's."""
    lora = tmp_path / "lora"
    shutil.copytree(family["lora"], lora)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(family["base"] / f, lora / f)
    cfg = json.loads((lora / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (lora / "tokenizer_config.json").write_text(json.dumps(cfg))
    cli("quantize", f"{family['base']}+{lora}", "-o", tmp_path / "q", "--method", "rtn", "--group-size", "32", "-q",
        check=True)
    assert "chat_template" in json.loads((tmp_path / "q" / "tokenizer_config.json").read_text())
    assert len(load_dir(tmp_path / "q")) > 0


# ---- model cards ------------------------------------------------------------------------------------------------
def _adapter_input(reference: str, adapter: str, base: str, from_config: bool = False):
    from mergequant.peft.adapted import AdapterInput

    return AdapterInput(reference, adapter, Path(adapter), base, Path(base), from_config, "LoRA r=4 alpha=8", 10, 0)


def test_merge_card_lists_adapters_with_their_base():
    from mergequant.card import merge_card, validate_card

    a = _adapter_input("org/base+org/lora@v1", "org/lora@v1", "org/base")
    b = _adapter_input("org/lora2", "org/lora2", "org/base", from_config=True)
    card = merge_card(method="ties", pretty_name="TIES", paper="p", models=["org/base", a.reference, b.reference],
                      base_model="org/base", recipe_text="x: 1", out_dtype="bfloat16", num_parameters=10,
                      adapters=[a, b])
    meta = validate_card(card)
    assert meta["base_model"] == ["org/base", "org/lora", "org/lora2"] and meta["base_model_relation"] == "merge"
    assert "## Adapters" in card
    assert "- `org/base+org/lora@v1`: LoRA r=4 alpha=8 adapter `org/lora@v1` on base `org/base`" in card
    assert "`org/lora2`: LoRA r=4 alpha=8 adapter `org/lora2` on base `org/base` (the base named by" in card


def test_merge_card_records_local_adapter_sides_for_push(tmp_path):
    from mergequant.card import merge_card, rewrite_card

    (tmp_path / "lora").mkdir()
    a = _adapter_input(f"org/base+{tmp_path / 'lora'}", str(tmp_path / "lora"), "org/base")
    card = merge_card(method="linear", pretty_name="Linear", paper="p", models=[a.reference, "org/ft"],
                      base_model=None, recipe_text="x: 1", out_dtype=None, num_parameters=1, adapters=[a])
    pushed = rewrite_card(card, {str(tmp_path / "lora"): "me/lora"}, repo="me/merge")
    assert "base_model:\n- org/base\n- org/ft\n- me/lora" in pushed


def test_quant_card_of_an_adapted_model():
    from mergequant.card import quant_card, validate_card

    a = _adapter_input("org/base+org/lora", "org/lora", "org/base")
    card = quant_card(source=a.reference, adapter=a, method="gptq", bits=4, settings=[], tags=["gptq"], requirements="",
                      calib=None, calib_tokens=0, samples=0, fallbacks=[])
    meta = validate_card(card)
    assert meta["base_model"] == ["org/lora"] and meta["base_model_relation"] == "quantized"
    assert "adapter `org/lora` on base `org/base`" in card


# ---- target_parameters: LoRA on fused mixture-of-experts parameters ------------------------------------------------
def build_tiny_qwen3_moe(path: Path, *, fused: bool) -> Path:
    """A random tiny Qwen3-MoE saved by transformers per expert (the Hub's layout) or fused."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
                         vocab_size=64, tie_word_embeddings=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Qwen3MoeForCausalLM(cfg).save_pretrained(path, **({} if not fused else {"save_original_format": False}))
    return path


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
def test_target_parameters_on_fused_experts_match_peft(fused, tmp_path):
    from mergequant.merge.moe_layout import per_expert_view

    base = build_tiny_qwen3_moe(tmp_path / "base", fused=fused)
    merged = make_adapter(base, tmp_path / "lora", seed=9, r=2, lora_alpha=4, target_modules=["q_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    view = open_model(f"{base}+{tmp_path / 'lora'}")
    assert ("mlp.experts.gate_up_proj" in " ".join(view.tensors)) == fused
    changed = 0
    for name in view.tensors:
        ours = view.get(name).float()
        _check_moe_tensor(name, ours, merged, view.config)
        changed += not torch.equal(ours, view.base.get(name).float())
    # q_proj x2 layers + experts: fused 2 tensors x 2 layers, or 4 experts x 3 weights x 2 layers
    assert changed == 2 + (4 if fused else 24)
    # what merges and quantization read: per-expert names over either layout (one expert computed at a time)
    experts = per_expert_view(view)
    for name in experts.tensors:
        _check_moe_tensor(name, experts.get(name).float(), merged, view.config)


def _check_moe_tensor(name: str, ours: torch.Tensor, merged: dict, config: dict) -> None:
    """``ours`` within 1e-6 relative of peft's merged tensor (memory layout: per-expert names are slices)."""
    from mergequant.merge.moe_layout import moe_architecture, parse_expert_name

    parsed = parse_expert_name(moe_architecture(config), name)
    if parsed is None:
        ref = merged[name]
    else:  # a per-expert tensor: its slice of peft's fused parameter
        layer, e, part = parsed
        pre = f"model.layers.{layer}.mlp.experts."
        inter = merged[pre + "down_proj"].shape[2]
        ref = merged[pre + "down_proj"][e] if part == 2 else merged[pre + "gate_up_proj"][e, part * inter:(part + 1) * inter]
    err = (ours - ref.float()).abs().max().item()
    assert err <= 1e-6 * ref.float().abs().max().item(), f"{name}: {err}"


def test_merge_of_a_moe_base_plus_expert_adapter(tmp_path):
    """Through the CLI: a fused Qwen3-MoE base + a target_parameters adapter, merged (linear, one model) into the
    per-expert layout, is peft's merged model."""
    base = build_tiny_qwen3_moe(tmp_path / "base", fused=True)
    merged = make_adapter(base, tmp_path / "lora", seed=2, r=2, lora_alpha=4, target_modules=["o_proj"],
                          target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {base}+{tmp_path / 'lora'}\n"
                      "    parameters: {weight: 1.0}\ndtype: float32\n")
    cli("merge", recipe, "-o", tmp_path / "out", "-q", check=True)
    out = load_dir(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert any(".experts.3.gate_proj." in n for n in out)
    for name, t in out.items():
        _check_moe_tensor(name, t.float(), merged, config)


@pytest.mark.parametrize("key, value, says", [
    ("use_qalora", True, "QA-LoRA"),
    ("alora_invocation_tokens", [1, 2], "activated LoRA"),
    ("layer_replication", [[0, 2]], "layer_replication"),
    ("bias", "all", "bias 'all'"),
    ("target_parameters", ["self_attn.q_proj.weight"], "target_parameters model.layers.0.self_attn.q_proj.weight"),
    ("r", 0, "r must be a positive integer"),
    ("target_modules", 3, "target_modules must be a list"),
])
def test_options_with_other_arithmetic_are_refused(plain, llama, tmp_path, key, value, says):
    other = tmp_path / "lora"
    shutil.copytree(plain[0], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg[key] = value
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeQuantError) as e:
        open_model(f"{llama}+{other}")
    assert says in str(e.value) and "\n" not in str(e.value)


def test_adapter_only_hub_repo_and_hub_sides(family, materialized, monkeypatch, tmp_path):
    """mergekit's open issue #470: an adapter-only repo as a model. Hub ids resolve through
    ``huggingface_hub.snapshot_download`` (stubbed here with local folders: the loopback test Hub cannot serve
    revisions by commit id); the adapter's config names its base by Hub id. Quantize reads `user/lora` (base from
    its config) and a recipe reads `user/base@v1+user/lora`; both give what the adapted weights give."""
    import huggingface_hub

    lora = tmp_path / "lora-src"
    shutil.copytree(family["lora"], lora)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "user/base"
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    repos, calls = {"user/base": family["base"], "user/lora": lora}, []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kw):
        calls.append((repo_id, revision))
        assert "adapter_model.bin" in allow_patterns and "*.safetensors" in allow_patterns
        return str(repos[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    args = ["--method", "rtn", "--group-size", "32", "-q"]
    proc = cli("quantize", "user/lora", "-o", tmp_path / "q", *args, check=True)
    assert "on base user/base (base_model_name_or_path" in proc.stderr
    assert calls == [("user/lora", None), ("user/base", None)]
    cli("quantize", materialized, "-o", tmp_path / "ref", *args, check=True)
    a, b = load_dir(tmp_path / "q"), load_dir(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    card = (tmp_path / "q" / "README.md").read_text()
    assert "base_model:\n- user/lora\nbase_model_relation: quantized" in card
    assert "adapter `user/lora` on base `user/base` (the base named by" in card

    calls.clear()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: user/base@v1+user/lora\n"
                      "    parameters: {weight: 1.0}\ndtype: float32\n")
    cli("merge", recipe, "-o", tmp_path / "m", "-q", check=True)
    assert calls == [("user/base", "v1"), ("user/lora", None)]
    _close(load_dir(tmp_path / "m"), load_dir(materialized), rel=0)
    assert "base_model:\n- user/base\n- user/lora\nbase_model_relation: merge" in (tmp_path / "m" / "README.md").read_text()
