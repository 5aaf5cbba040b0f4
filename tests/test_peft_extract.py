"""extract-lora and merges written as an adapter (issue 12, items 3 and 4).

Oracles: a float64 ``torch.linalg.svd`` computed here (Eckart-Young optimum), peft itself
(``PeftModel.from_pretrained`` on the base in transformers), and ``mergekit-extract-lora`` 0.1.5 on the same
inputs (compared as ``B @ A``: singular vectors' signs are arbitrary). Tiny float32 models built in code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import cli, tiny_family
from mergequant.errors import MergeQuantError
from mergequant.io.checkpoint import Checkpoint
from mergequant.peft.factor import factor_delta, relative_error
from mergequant.peft.write import ADAPTER_CONFIG, ADAPTER_WEIGHTS

RANKS_TO_TRY = (1, 3, 8)


def _svd_optimum(d: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(d.double())
    return float((s[k:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())


def _low_rank(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) / r


def _decaying(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A full-rank delta with a decaying spectrum (like real fine-tune deltas)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64)).Q
    s = torch.exp(-torch.arange(min(m, n), dtype=torch.float64) / 12)
    return ((u * s) @ v.T).float()


# ---------------------------------------------------------------------------------------------------
# the factoring core
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_known_rank_is_reconstructed_exactly(method):
    d = _low_rank(600, 520, 5)
    f = factor_delta(d, rank=64, method=method)
    assert f.rank == 5  # numerical rank, not the cap
    err = relative_error(d, f.A, f.B)
    assert err < 5e-6 and abs(f.error - err) < 5e-6
    f = factor_delta(d, rank=5, method=method)
    assert f.rank == 5 and relative_error(d, f.A, f.B) < 5e-6


def test_truncated_error_is_the_svd_optimum():
    d = _decaying(96, 80)
    for k in RANKS_TO_TRY:
        f = factor_delta(d, rank=k, method="exact")
        opt = _svd_optimum(d, k)
        assert f.rank == k
        assert abs(relative_error(d, f.A, f.B) - opt) < 1e-5 * max(opt, 1e-3)
        assert abs(f.error - opt) < 1e-5 * max(opt, 1e-3)


def test_randomized_is_near_the_optimum_and_reports_its_true_error():
    d = _decaying(700, 900)
    f = factor_delta(d, rank=16, method="randomized")
    opt = _svd_optimum(d, 16)
    true = relative_error(d, f.A, f.B)
    assert f.method == "randomized" and abs(f.error - true) < 1e-5
    assert opt <= true + 1e-6 and true < opt * 1.02


def test_energy_picks_the_smallest_rank_holding_the_fraction():
    d = _decaying(96, 80)
    s2 = torch.linalg.svdvals(d.double()) ** 2
    frac = torch.cumsum(s2, 0) / s2.sum()
    for energy in (0.5, 0.9, 0.99, 0.999):
        want = int(torch.nonzero(frac >= energy)[0]) + 1
        f = factor_delta(d, energy=energy)
        assert f.rank == want, energy
        assert f.energy >= energy - 1e-9 and (want == 1 or float(frac[want - 2]) < energy)
    assert factor_delta(d, energy=0.999, rank=4).rank == 4  # the cap still binds
    assert factor_delta(d, energy=1.0).rank == 80


def test_zero_delta_and_embedding_transpose():
    f = factor_delta(torch.zeros(8, 5), rank=4)
    assert f.rank == 0 and f.error == 0.0


@pytest.mark.parametrize("rank,energy,msg", [(0, None, "rank must be a positive integer"),
                                             (-3, None, "rank must be a positive integer"),
                                             (None, 0.0, "energy must be in (0, 1]"),
                                             (None, 1.5, "energy must be in (0, 1]"),
                                             (None, None, "give a rank, an energy, or both")])
def test_bad_rank_or_energy(rank, energy, msg):
    with pytest.raises(MergeQuantError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        factor_delta(torch.ones(3, 3), rank=rank, energy=energy)


# ---------------------------------------------------------------------------------------------------
# extract-lora end to end
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny_family(tmp_path_factory.mktemp("peft_x"), torch.float32, layers=2)


def _extract(family, out, *args):
    res = cli("extract-lora", family["a"], "--base", family["base"], "-o", out, "--quiet", *args)
    assert res.returncode == 0, res.stderr
    return out


def _reconstructed(adapter: Path) -> dict[str, torch.Tensor]:
    """module -> scale * B @ A (embeddings transposed back) from a written adapter."""
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    t = load_file(adapter / ADAPTER_WEIGHTS)
    out = {}
    for k in t:
        for a_suf, b_suf, emb in ((".lora_A.weight", ".lora_B.weight", False), (".lora_embedding_A", ".lora_embedding_B", True)):
            if k.endswith(a_suf):
                mod = k[len("base_model.model."):-len(a_suf)]
                r = cfg["rank_pattern"].get(mod, cfg["r"])
                alpha = cfg["alpha_pattern"].get(mod, cfg["lora_alpha"])
                ba = t[k[:-len(a_suf)] + b_suf].double() @ t[k].double() * (alpha / r)
                out[mod] = ba.T if emb else ba
    return out


def _deltas(family, name="a") -> dict[str, torch.Tensor]:
    ft, base = Checkpoint.open(family[name]), Checkpoint.open(family["base"])
    return {n.removesuffix(".weight"): ft.get(n).double() - base.get(n).double()
            for n in ft.tensors if len(ft.tensors[n].shape) == 2}


def test_extract_full_rank_reconstructs_every_module(family, tmp_path):
    out = _extract(family, tmp_path / "ad", "--rank", "2048")
    rec, deltas = _reconstructed(out), _deltas(family)
    assert set(rec) == set(deltas)
    for mod, d in deltas.items():
        assert float((rec[mod] - d).norm() / d.norm()) < 1e-5, mod
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == cfg["r"]
    assert cfg["alpha_pattern"] == cfg["rank_pattern"] and cfg["rank_pattern"]  # k_proj/v_proj: rank 32 < r
    assert "model.norm" in cfg["modules_to_save"]
    card = (out / "README.md").read_text()
    assert "base_model_relation" not in card.split("---")[1]  # a local base: no Hub relation in the front matter
    assert '"relation": "adapter"' in card and "| q_proj | 2 |" in card


def test_extract_rank_k_matches_truncated_svd_per_module(family, tmp_path):
    out = _extract(family, tmp_path / "ad", "--rank", "6", "--svd", "exact")
    rec, deltas = _reconstructed(out), _deltas(family)
    for mod, d in deltas.items():
        opt = _svd_optimum(d, 6)
        got = float((rec[mod] - d).norm() / d.norm())
        assert abs(got - opt) < 1e-5, mod
    card = (out / "README.md").read_text()
    q = [line for line in card.splitlines() if line.startswith("| q_proj |")][0]
    assert q.split("|")[3].strip() == "6"


def test_energy_ranks_land_in_rank_pattern(family, tmp_path):
    out = _extract(family, tmp_path / "ad", "--energy", "0.6")
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    deltas = _deltas(family)
    for mod, d in deltas.items():
        s2 = torch.linalg.svdvals(d) ** 2
        want = int(torch.nonzero(torch.cumsum(s2, 0) / s2.sum() >= 0.6 * (1 - 1e-12))[0]) + 1
        assert cfg["rank_pattern"].get(mod, cfg["r"]) == want, mod


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.slow
@pytest.mark.parametrize("embeddings", ["lora", "save"])
def test_peft_loads_the_adapter_and_logits_match(family, tmp_path, embeddings):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    out = _extract(family, tmp_path / "ad", "--rank", "2048", "--embeddings", embeddings)
    ids = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(0))
    ft = AutoModelForCausalLM.from_pretrained(family["a"], dtype=torch.float32)
    want = _logits(ft, ids)
    base = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32)
    base_logits = _logits(base, ids)
    model = peft.PeftModel.from_pretrained(base, out)
    got = _logits(model, ids)
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    assert float((base_logits - want).abs().max()) > 1e-2  # the fine-tune really differs

    # a low rank: the logits move toward the fine-tune, by about the reconstruction error
    low = _extract(family, tmp_path / "low", "--rank", "8")
    base2 = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32)
    got_low = _logits(peft.PeftModel.from_pretrained(base2, low), ids)
    assert float((got_low - want).norm()) < float((base_logits - want).norm())


def _mergekit_cli() -> str | None:
    exe = Path(sys.executable).with_name("mergekit-extract-lora")
    return str(exe) if exe.exists() else shutil.which("mergekit-extract-lora")


@pytest.mark.slow
@pytest.mark.parametrize("embed_lora", [True, False])
def test_side_by_side_with_mergekit_extract_lora(family, tmp_path, embed_lora):
    exe = _mergekit_cli()
    if exe is None:
        pytest.skip("mergekit-extract-lora is not installed")
    mk = tmp_path / "mk"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([exe, "--model", str(family["a"]), "--base-model", str(family["base"]), "--out-path", str(mk),
                           "--max-rank", "8", "--embed-lora" if embed_lora else "--no-embed-lora"],
                          capture_output=True, text=True, env=env)
    if not (mk / ADAPTER_WEIGHTS).exists():
        pytest.fail(f"mergekit-extract-lora failed: {proc.stderr[-2000:]}")
    ours = _extract(family, tmp_path / "ours", "--rank", "8", "--svd", "exact",
                    "--embeddings", "lora" if embed_lora else "save")
    theirs_rec, ours_rec = _reconstructed(mk), _reconstructed(ours)
    assert set(theirs_rec) == set(ours_rec)
    for mod, d in theirs_rec.items():
        assert float((ours_rec[mod] - d).norm() / d.norm()) < 1e-4, mod
    t_mk, t_ours = load_file(mk / ADAPTER_WEIGHTS), load_file(ours / ADAPTER_WEIGHTS)
    whole_mk = {k for k in t_mk if "lora_" not in k}
    whole_ours = {k for k in t_ours if "lora_" not in k}
    assert whole_ours <= whole_mk  # mergekit saves every norm; we save the ones that changed (all of them here)
    for k in whole_ours:
        assert torch.equal(t_ours[k], t_mk[k]), k
    c_mk, c_ours = (json.loads((p / ADAPTER_CONFIG).read_text()) for p in (mk, ours))
    assert c_mk["r"] == c_ours["r"] == c_mk["lora_alpha"] == c_ours["lora_alpha"]


# ---------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------
def test_shape_mismatch_names_the_module(family, tmp_path):
    from mergequant.demo import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", seed=0, dtype=torch.float32, layers=2, hidden=64, intermediate=96,
                             vocab=2048)
    res = cli("extract-lora", family["a"], "--base", other, "-o", tmp_path / "ad")
    assert res.returncode == 2
    assert "model.layers.0.mlp.down_proj" in res.stderr and "does not fit this base" in res.stderr
    assert not (tmp_path / "ad").exists()


@pytest.mark.parametrize("args,msg", [(["--rank", "0"], "rank must be a positive integer"),
                                      (["--rank", "-2"], "rank must be a positive integer"),
                                      (["--energy", "0"], "energy must be in (0, 1]"),
                                      (["--energy", "1.01"], "energy must be in (0, 1]"),
                                      (["--embeddings", "both"], "--embeddings must be one of")])
def test_bad_options(family, tmp_path, args, msg):
    res = cli("extract-lora", family["a"], "--base", family["base"], "-o", tmp_path / "ad", *args)
    assert res.returncode == 2 and msg in res.stderr
    assert res.stderr.count("\n") == 1


def test_output_folder_that_is_not_ours(family, tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    res = cli("extract-lora", family["a"], "--base", family["base"], "-o", mine)
    assert res.returncode == 2 and "already exists" in res.stderr
    res = cli("extract-lora", family["a"], "--base", family["base"], "-o", mine, "--force")
    assert res.returncode == 2 and "not a PEFT adapter folder" in res.stderr
    assert (mine / "thesis.tex").read_text() == "precious"
    res = cli("extract-lora", family["a"], "--base", family["base"], "-o", family["a"] / "lora")
    assert res.returncode == 2 and "inside the input model" in res.stderr
    # an earlier adapter may be replaced with --force
    out = _extract(family, tmp_path / "ad", "--rank", "2")
    _extract(family, out, "--rank", "3", "--force")
    assert json.loads((out / ADAPTER_CONFIG).read_text())["r"] == 3


def test_identical_models_and_dry_run(family, tmp_path):
    res = cli("extract-lora", family["base"], "--base", family["base"], "-o", tmp_path / "ad")
    assert res.returncode == 2 and "same model" in res.stderr
    res = cli("extract-lora", family["a"], "--base", family["base"], "-o", tmp_path / "ad", "--dry-run", "--rank", "4")
    assert res.returncode == 0, res.stderr
    assert "LoRA modules:  16" in res.stdout and "adapter size" in res.stdout
    assert not (tmp_path / "ad").exists()


# ---------------------------------------------------------------------------------------------------
# merges written as an adapter (recipe ``output: adapter``)
# ---------------------------------------------------------------------------------------------------
def _recipe(tmp_path, method, models, base, extra="", name="r.yaml"):
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for m, w in models:
        lines += [f"  - model: {m}", f"    parameters: {{weight: {w}}}"]
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n" + extra)
    return p


def _merged_deltas(tmp_path, recipe_text_path, base) -> dict[str, torch.Tensor]:
    """The full merge (float32 output) minus the base, per 2-D module, from a normal ``merge``."""
    full = tmp_path / "full"
    res = cli("merge", recipe_text_path, "-o", full, "--out-dtype", "float32", "--quiet")
    assert res.returncode == 0, res.stderr
    m, b = Checkpoint.open(full), Checkpoint.open(base)
    return {n.removesuffix(".weight"): m.get(n).double() - b.get(n).double()
            for n in m.tensors if len(m.tensors[n].shape) == 2}


@pytest.mark.parametrize("method,extra", [("task_arithmetic", ""), ("linear", "parameters: {normalize: true}\n")])
def test_merge_to_adapter_full_rank_equals_the_merged_delta(family, tmp_path, method, extra):
    models = [(family["a"], 0.6), (family["b"], 0.4)] if method == "task_arithmetic" else \
        [(family["base"], 0.2), (family["a"], 0.5), (family["b"], 0.3)]
    plain = _recipe(tmp_path, method, models, family["base"], extra)
    adapter = _recipe(tmp_path, method, models, family["base"], extra + "output: adapter\nadapter: {rank: 4096}\n",
                      name="ra.yaml")
    want = _merged_deltas(tmp_path, plain, family["base"])
    res = cli("merge", adapter, "-o", tmp_path / "ad", "--quiet")
    assert res.returncode == 0, res.stderr
    got = _reconstructed(tmp_path / "ad")
    assert set(got) == set(want)
    for mod, d in want.items():
        assert float((got[mod] - d).norm() / d.norm()) < 1e-5, mod
    card = (tmp_path / "ad" / "README.md").read_text()
    assert "Merged LoRA adapter" in card and method in card and '"relation": "adapter"' in card
    assert (tmp_path / "ad" / "mergequant_recipe.yaml").exists()


def test_merge_to_adapter_low_rank_is_the_truncated_svd(family, tmp_path):
    models = [(family["a"], 0.7), (family["b"], 0.5)]
    plain = _recipe(tmp_path, "task_arithmetic", models, family["base"])
    adapter = _recipe(tmp_path, "task_arithmetic", models, family["base"],
                      "output: adapter\nadapter: {rank: 5, svd: exact}\n", name="ra.yaml")
    want = _merged_deltas(tmp_path, plain, family["base"])
    assert cli("merge", adapter, "-o", tmp_path / "ad", "--quiet").returncode == 0
    got = _reconstructed(tmp_path / "ad")
    for mod, d in want.items():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        best = (u[:, :5] * s[:5]) @ vh[:5]
        assert float((got[mod] - best).norm() / d.norm()) < 1e-4, mod
        assert abs(float((got[mod] - d).norm() / d.norm()) - _svd_optimum(d, 5)) < 1e-5, mod


def test_merge_to_adapter_ties_and_dry_run(family, tmp_path):
    text = (f"merge_method: ties\nbase_model: {family['base']}\nmodels:\n"
            f"  - model: {family['a']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            f"  - model: {family['b']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            "output: adapter\nadapter: {rank: 8, embeddings: save}\n")
    r = tmp_path / "ties.yaml"
    r.write_text(text)
    res = cli("merge", r, "-o", tmp_path / "ad", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "LoRA modules:  14" in res.stdout and not (tmp_path / "ad").exists()
    assert cli("merge", r, "-o", tmp_path / "ad", "--quiet").returncode == 0
    cfg = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 8 and {"lm_head", "model.embed_tokens"} <= set(cfg["modules_to_save"])


@pytest.mark.parametrize("extra,msg", [
    ("output: adapter\n", "give adapter.rank"),
    ("output: adapter\nadapter: {rank: 0}\n", "rank must be a positive integer"),
    ("output: adapter\nadapter: {energy: 2}\n", "energy must be in (0, 1]"),
    ("output: adapter\nadapter: {rank: 4, rnak: 3}\n", "did you mean 'rank'"),
    ("adapter: {rank: 4}\n", "only with 'output: adapter'"),
    ("output: lora\n", "output"),
])
def test_bad_adapter_recipes(family, tmp_path, extra, msg):
    r = _recipe(tmp_path, "task_arithmetic", [(family["a"], 1.0)], family["base"], extra)
    res = cli("merge", r, "-o", tmp_path / "ad")
    assert res.returncode == 2 and msg in res.stderr, res.stderr


def test_merge_to_adapter_needs_a_base(family, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n"
                 f"  - model: {family['b']}\n    parameters: {{weight: 1}}\noutput: adapter\nadapter: {{rank: 4}}\n")
    res = cli("merge", r, "-o", tmp_path / "ad")
    assert res.returncode == 2 and "needs a base_model" in res.stderr


@pytest.mark.slow
def test_merging_two_adapters_into_one_adapter(family, tmp_path):
    """Two LoRAs of one base (``BASE+ADAPTER`` inputs) -> one LoRA: task arithmetic of the adapters equals
    the same merge of the fine-tunes they were extracted from (full rank: exact up to float32)."""
    pytest.importorskip("mergequant.peft.adapted")
    ad_a = _extract(family, tmp_path / "ad_a", "--rank", "4096")
    res = cli("extract-lora", family["b"], "--base", family["base"], "-o", tmp_path / "ad_b", "--rank", "4096", "--quiet")
    assert res.returncode == 0, res.stderr
    models = [(f"{family['base']}+{ad_a}", 0.6), (f"{family['base']}+{tmp_path / 'ad_b'}", 0.4)]
    r = _recipe(tmp_path, "task_arithmetic", models, family["base"], "output: adapter\nadapter: {rank: 4096}\n")
    res = cli("merge", r, "-o", tmp_path / "merged_ad", "--quiet")
    assert res.returncode == 0, res.stderr
    want = _merged_deltas(tmp_path, _recipe(tmp_path, "task_arithmetic", [(family["a"], 0.6), (family["b"], 0.4)],
                                            family["base"], name="plain.yaml"), family["base"])
    got = _reconstructed(tmp_path / "merged_ad")
    for mod, d in want.items():
        assert float((got[mod] - d).norm() / d.norm()) < 1e-5, mod
    t = load_file(tmp_path / "merged_ad" / ADAPTER_WEIGHTS)
    assert all("lora_" in k or k.endswith("norm.weight") for k in t)


# ---------------------------------------------------------------------------------------------------
# push of an adapter folder
# ---------------------------------------------------------------------------------------------------
def test_push_dry_run_of_an_adapter_sets_relation_adapter(family, tmp_path, env, hub):
    out = _extract(family, tmp_path / "ad", "--rank", "4")
    res = cli("push", out, "--repo", "me/tiny-lora", "--endpoint", hub.url, "--dry-run",
              "--base-model-map", f"{family['base']}=me/tiny-base")
    assert res.returncode == 0, res.stderr
    assert "base_model:\n- me/tiny-base\nbase_model_relation: adapter" in res.stdout
    assert "adapter_model.safetensors" in res.stdout and "adapter_config.json" in res.stdout
    assert hub.requests == []
    (out / ADAPTER_WEIGHTS).unlink()
    res = cli("push", out, "--repo", "me/tiny-lora", "--endpoint", hub.url, "--dry-run")
    assert res.returncode == 2 and "no adapter weights" in res.stderr


@pytest.mark.slow
def test_push_of_an_adapter_arrives(family, tmp_path, env, hub):
    from helpers import TOKEN, run_cli

    out = _extract(family, tmp_path / "ad", "--rank", "4")
    res = run_cli("push", out, "--repo", "me/tiny-lora", "--endpoint", hub.url, "--token", TOKEN,
                  "--base-model-map", f"{family['base']}=me/tiny-base")
    assert res.returncode == 0, res.stderr
    files = hub.files("me/tiny-lora")
    assert set(files) == {"README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    card = files["README.md"].content.decode()
    assert "base_model_relation: adapter" in card and "me/tiny-base" in card and "mergequant-parents" not in card


def test_reextracting_an_adapter_at_a_lower_rank(family, tmp_path):
    """FINETUNE may be BASE+ADAPTER: a full-rank adapter re-extracted at rank 5 equals extracting rank 5 from
    the fine-tune itself."""
    pytest.importorskip("mergequant.peft.adapted")
    full = _extract(family, tmp_path / "full", "--rank", "4096")
    res = cli("extract-lora", f"{family['base']}+{full}", "--base", family["base"], "-o", tmp_path / "low",
              "--rank", "5", "--svd", "exact", "--quiet")
    assert res.returncode == 0, res.stderr
    direct = _reconstructed(_extract(family, tmp_path / "direct", "--rank", "5", "--svd", "exact"))
    again = _reconstructed(tmp_path / "low")
    for mod, d in direct.items():
        assert float((again[mod] - d).norm() / d.norm()) < 1e-4, mod
