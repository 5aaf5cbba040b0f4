"""Mixed input dtypes: a bf16 base with fp16 / fp32 fine-tunes (common on the Hub) must merge with every method.

Contract: inputs are cast once to the compute dtype (float32) and the result is rounded once to the output
dtype. So for every method (1) the output matches an independent float64 reference computed here (inputs
upcast to float64, the method's formula, one rounding) to within float32 arithmetic, and (2) it is
*byte-identical* to the same merge over float32 copies of the very same inputs (this is also how DARE,
whose random masks the reference cannot know, is checked). An integer tensor facing float tensors is one
clear error, before anything is written. ``--mergekit-dtype`` without a recipe ``dtype`` computes in the
inputs' promoted dtype, as mergekit does.

Models are tiny (2 layers, hidden 64) and built here; every merge the checks share runs once (in-process:
``helpers.cli``, the CLI's own code without an interpreter start-up per run); the one-line error is
also checked through the real CLI in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergequant.demo import build_tiny_llama, finetune_of, write_checkpoint
from mergequant.io.checkpoint import Checkpoint
from mergequant.merge.plan import mergekit_compute_dtype

from helpers import cli

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
NAMES = {BF16: "bfloat16", F16: "float16", F32: "float32"}
# (base, a, b) storage dtypes. bf16 base + fp16 + fp32 crashed linear; bf16 + bf16 + fp32 crashed the TIES
# family's kernel (bf16 bits next to float32 among the fine-tunes); an fp16 base writes fp16 through float32.
MIXES = [(BF16, F16, F32), (BF16, BF16, F32), (F16, F32, BF16)]
SEED = 7

RECIPES = {
    "linear": """
        merge_method: linear
        models:
          - {model: $base, parameters: {weight: 0.2}}
          - {model: $a, parameters: {weight: 0.5}}
          - {model: $b, parameters: {weight: 0.3}}
    """,
    "task_arithmetic": """
        merge_method: task_arithmetic
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.6}}
          - {model: $b, parameters: {weight: 0.3}}
        parameters: {lambda: 0.9}
    """,
    "ties": """
        merge_method: ties
        base_model: $base
        models:
          - {model: $base}
          - {model: $a, parameters: {weight: 0.6, density: 0.5}}
          - {model: $b, parameters: {weight: 0.4, density: 0.7}}
    """,
    "dare_linear": """
        merge_method: dare_linear
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.6, density: 0.5}}
          - {model: $b, parameters: {weight: 0.4, density: 0.6}}
    """,
    "dare_ties": """
        merge_method: dare_ties
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.5, density: 0.6}}
          - {model: $b, parameters: {weight: 0.5, density: 0.5}}
        parameters: {normalize: true}
    """,
    "slerp": """
        merge_method: slerp
        base_model: $base
        models:
          - {model: $base}
          - {model: $a}
        parameters: {t: 0.3}
    """,
}
METHODS = list(RECIPES)
WEIGHTS = {"linear": [0.2, 0.5, 0.3], "task_arithmetic": [0.6, 0.3], "ties": [0.6, 0.4]}
TIES_DENSITY = [0.5, 0.7]
MERGEKIT_METHODS = ["linear", "task_arithmetic", "ties", "slerp"]


# ---------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------
def mix_id(mix) -> str:
    return "-".join(NAMES[d].replace("bfloat", "bf").replace("float", "fp") for d in mix)


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    assert out, f"no tensors in {path}"
    return out


def resave(src: Path, dst: Path, convert) -> Path:
    """A copy of checkpoint ``src`` with every tensor passed through ``convert(name, tensor)``."""
    ck = Checkpoint.open(src)
    tensors = {n: convert(n, ck.get(n).clone()) for n in sorted(ck.tensors)}
    cfg = json.loads((src / "config.json").read_text())
    return write_checkpoint(dst, cfg, tensors, shards=2)


@pytest.fixture(scope="module")
def masters(tmp_path_factory) -> dict[str, Path]:
    """base + two fine-tunes in float32; every mix below is a rounding of these."""
    root = tmp_path_factory.mktemp("hostile_masters")
    base = build_tiny_llama(root / "base", seed=0, dtype=F32, hidden=64, intermediate=160, layers=2, vocab=512)
    return {"base": base, "a": finetune_of(base, root / "a", seed=1), "b": finetune_of(base, root / "b", seed=2)}


def mixed_models(masters, root: Path, mix) -> tuple[dict[str, Path], dict[str, Path]]:
    """(models stored in the dtypes of ``mix``, float32 copies of exactly those values)."""
    mixed, f32 = {}, {}
    for role, dtype in zip(("base", "a", "b"), mix):
        mixed[role] = resave(masters[role], root / mix_id(mix) / role, lambda n, t, d=dtype: t.to(d))
        f32[role] = resave(mixed[role], root / (mix_id(mix) + "-f32") / role, lambda n, t: t.to(F32))
    return mixed, f32


def write_recipe(path: Path, method: str, models: dict[str, Path], extra: str = "") -> Path:
    text = textwrap.dedent(RECIPES[method])
    for role, p in models.items():
        text = text.replace(f"${role}", str(p))
    path.write_text(text + extra)
    return path


def sha256_tree(path: Path) -> dict[str, str]:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.rglob("*")) if f.is_file()}


# ---------------------------------------------------------------------------------------------------
# every CLI run the checks share, once (in-process)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(masters, tmp_path_factory):
    """{(method, mix id, kind): (inputs, output dir, process)}; kind: "mixed", "f32" (float32 copies of the
    same values, --out-dtype of the base; every method on the first mix, DARE on all), "mk" (--mergekit-dtype,
    no recipe dtype, first mix). ~30 runs of `mergequant merge`, in-process (a subprocess each was mostly
    interpreter start-up)."""
    root = tmp_path_factory.mktemp("hostile_runs")
    jobs = {}
    for mix in MIXES:
        mixed, f32 = mixed_models(masters, root / "models", mix)
        for method in METHODS:
            key = f"{method}-{mix_id(mix)}"
            seed = ["--seed", str(SEED)]
            jobs[(method, mix_id(mix), "mixed")] = (mixed, root / f"{key}.out",
                                                    [write_recipe(root / f"{key}.yaml", method, mixed), *seed])
            if mix == MIXES[0] or method.startswith("dare"):
                jobs[(method, mix_id(mix), "f32")] = (f32, root / f"{key}-f32.out",
                                                      [write_recipe(root / f"{key}-f32.yaml", method, f32), *seed,
                                                       "--out-dtype", NAMES[mix[0]]])
            if mix == MIXES[0] and method in MERGEKIT_METHODS:
                jobs[(method, mix_id(mix), "mk")] = (mixed, root / f"{key}-mk.out",
                                                     [root / f"{key}.yaml", *seed, "--mergekit-dtype"])

    def go(job):
        _, out, (recipe, *flags) = job
        return cli("merge", recipe, "-o", out, "-q", "--workers", "1", *flags)

    procs = [go(job) for job in jobs.values()]
    return {k: (models, out, p) for (k, (models, out, _)), p in zip(jobs.items(), procs)}


def output_of(runs, key) -> dict[str, torch.Tensor]:
    _, out, proc = runs[key]
    assert proc.returncode == 0, f"{key}: mergequant failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return load_dir(out)


# ---------------------------------------------------------------------------------------------------
# independent float64 references (nothing from mergequant.merge)
# ---------------------------------------------------------------------------------------------------
def topk_keep(d32: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density * n)) largest |d|, ties broken by lowest flat index. Selection is on the
    float32 delta (the all-float32 computation's), a stable descending sort, no selection shortcut."""
    flat = d32.reshape(-1).abs()
    k = max(1, int(density * flat.numel()))
    order = torch.sort(flat, descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.reshape(d32.shape)


def reference(method: str, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The method's formula on float64 upcasts of ``inputs`` (base first), unrounded."""
    xs = [x.double() for x in inputs]
    if method == "linear":
        w = WEIGHTS["linear"]
        return sum(wi * x for wi, x in zip(w, xs)) / sum(w)
    base, others = xs[0], xs[1:]
    if method == "task_arithmetic":
        return base + 0.9 * sum(wi * (x - base) for wi, x in zip(WEIGHTS["task_arithmetic"], others))
    if method == "ties":
        weighted = []
        for wi, x, raw_x, dens in zip(WEIGHTS["ties"], others, inputs[1:], TIES_DENSITY):
            keep = topk_keep(raw_x.float() - inputs[0].float(), dens)
            weighted.append(torch.where(keep, wi * (x - base), 0.0))
        total = sum(weighted)
        elected = torch.where(total >= 0, 1.0, -1.0).double()
        agree = [(t.sign() == elected).double() for t in weighted]
        mixed = sum(t * a for t, a in zip(weighted, agree))
        div = sum(wi * a for wi, a in zip(WEIGHTS["ties"], agree))
        div = torch.where(div == 0, 1.0, div)
        return base + mixed / div
    if method == "slerp":
        v0, v1, t = base.reshape(-1), others[0].reshape(-1), 0.3
        n0, n1 = float(v0.norm()), float(v1.norm())
        cos = max(-1.0, min(1.0, float(v0 @ v1) / (n0 * n1)))
        if abs(cos) > 0.9995:
            c0, c1 = 1 - t, t
        else:
            theta = math.acos(cos)
            c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
        return c0 * base + c1 * others[0]
    raise AssertionError(method)


def magnitude(inputs: list[torch.Tensor]) -> torch.Tensor:
    """An elementwise bound on the terms' size, for the float32 rounding error of the computation."""
    return sum(x.double().abs() for x in inputs) * 2


def assert_matches_reference(method: str, ours: dict, models: dict[str, Path], out_dtype: torch.dtype, label: str):
    """Every element within one output ulp (plus float32 arithmetic error) of the float64 reference, and for
    16-bit outputs nearly every element exactly the reference rounded once (a double rounding, e.g. an fp32
    input first rounded to bf16, breaks both)."""
    roles = {"linear": ["base", "a", "b"], "slerp": ["base", "a"]}.get(method, ["base", "a", "b"])
    cks = [Checkpoint.open(models[r]) for r in roles]
    eps_out, eps32 = torch.finfo(out_dtype).eps, torch.finfo(F32).eps
    exact_misses = total = 0
    for name, got in ours.items():
        inputs = [ck.get(name) for ck in cks]
        assert got.dtype == out_dtype, f"{label}: {name} written as {got.dtype}, expected {out_dtype}"
        ref = reference(method, inputs)
        err = (got.double() - ref).abs()
        allowed = ref.abs() * eps_out + magnitude(inputs) * 8 * eps32 + torch.finfo(out_dtype).tiny
        worst = int(torch.argmax(err - allowed))
        assert bool((err <= allowed).all()), (
            f"{label}: {name}[{worst}] = {got.reshape(-1)[worst].item()!r}, float64 reference "
            f"{ref.reshape(-1)[worst].item()!r} (|diff| {err.reshape(-1)[worst].item():.3g} > {allowed.reshape(-1)[worst].item():.3g})")
        exact_misses += int((got != ref.to(out_dtype)).sum())
        total += got.numel()
    if out_dtype != F32:
        assert exact_misses <= max(3, total // 2000), f"{label}: {exact_misses} of {total} elements differ from the " \
                                                      "float64 reference rounded once"


# ---------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------
F32_CASES = [(m, MIXES[0]) for m in METHODS] + [(m, mix) for m in METHODS if m.startswith("dare") for mix in MIXES[1:]]


@pytest.mark.slow  # merges every dtype mix
@pytest.mark.parametrize("method,mix", F32_CASES, ids=[f"{m}-{mix_id(x)}" for m, x in F32_CASES])
def test_mixed_equals_float32_copies(runs, method, mix):
    """Cast once: the mixed-dtype merge writes the same bytes as the merge of float32 copies of the same values
    (DARE included: same seed, same masks)."""
    ours = output_of(runs, (method, mix_id(mix), "mixed"))
    f32 = output_of(runs, (method, mix_id(mix), "f32"))
    assert sorted(ours) == sorted(f32)
    for name in ours:
        assert ours[name].dtype == mix[0] == f32[name].dtype, name
        diff = int((ours[name] != f32[name]).sum())
        assert diff == 0, f"{method} {mix_id(mix)}: {name}: {diff} elements differ from the all-float32 merge"


@pytest.mark.parametrize("mix", MIXES, ids=mix_id)
@pytest.mark.parametrize("method", [m for m in METHODS if not m.startswith("dare")])
def test_mixed_matches_float64_reference(runs, method, mix):
    models, _, _ = runs[(method, mix_id(mix), "mixed")]
    ours = output_of(runs, (method, mix_id(mix), "mixed"))
    assert_matches_reference(method, ours, models, mix[0], f"{method} {mix_id(mix)}")


@pytest.mark.parametrize("method", MERGEKIT_METHODS)
def test_mergekit_dtype_without_recipe_dtype(runs, method):
    """--mergekit-dtype, no recipe dtype, bf16 + fp16 + fp32: mergekit computes in the promoted dtype (float32)
    here, so the result is the float32 computation rounded once to the (base's) output dtype."""
    mix = MIXES[0]
    models, _, _ = runs[(method, mix_id(mix), "mk")]
    ours = output_of(runs, (method, mix_id(mix), "mk"))
    assert_matches_reference(method, ours, models, mix[0], f"{method} --mergekit-dtype {mix_id(mix)}")


def test_mergekit_compute_dtype_rule():
    assert mergekit_compute_dtype(None, [BF16, F16, F32]) == F32
    assert mergekit_compute_dtype(None, [BF16, F16]) == F32
    assert mergekit_compute_dtype(None, [BF16, BF16]) == BF16
    assert mergekit_compute_dtype(None, [F16, F16]) == F16
    assert mergekit_compute_dtype(None, [BF16, torch.float64]) == torch.float64
    assert mergekit_compute_dtype(BF16, [F32, F16]) == BF16  # a recipe dtype wins: mergekit casts on load


def test_mergekit_dtype_all_bf16_without_recipe_dtype_computes_in_bf16(masters, tmp_path):
    """All-bf16 inputs and no recipe dtype: mergekit computes in bf16, so --mergekit-dtype must give the same
    bytes as with `dtype: bfloat16` in the recipe (and not the float32 result)."""
    models, _ = mixed_models(masters, tmp_path / "m", (BF16, BF16, BF16))
    plain = write_recipe(tmp_path / "plain.yaml", "task_arithmetic", models)
    typed = write_recipe(tmp_path / "typed.yaml", "task_arithmetic", models, "dtype: bfloat16\n")
    cli("merge", plain, "-o", tmp_path / "plain", "-q", "--mergekit-dtype", check=True)
    cli("merge", typed, "-o", tmp_path / "typed", "-q", "--mergekit-dtype", check=True)
    cli("merge", plain, "-o", tmp_path / "f32", "-q", check=True)
    a, b, c = load_dir(tmp_path / "plain"), load_dir(tmp_path / "typed"), load_dir(tmp_path / "f32")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a), "bf16 compute should differ from float32 compute somewhere"


@pytest.mark.parametrize("where", ["base", "a"])
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_int_tensor_against_float_is_one_clear_error(masters, tmp_path, method, where, case_cli):
    """An int32 tensor in one model facing bf16 in the others: exit 2, one line naming the tensor and both
    dtypes, no output and no partial directory, inputs untouched (first case: the real CLI in a subprocess)."""
    tensor = "model.layers.1.mlp.up_proj.weight"
    models, _ = mixed_models(masters, tmp_path / "m", (BF16, BF16, BF16))
    bad = resave(models[where], tmp_path / "bad" / where,
                 lambda n, t: (t.float() * 1000).to(torch.int32) if n == tensor else t)
    models = {**models, where: bad}
    recipe = write_recipe(tmp_path / "r.yaml", method, models)
    before = {r: sha256_tree(p) for r, p in models.items()}
    out = tmp_path / "out"
    proc = case_cli("merge", recipe, "-o", out, "-q")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in (tensor, "int32", "bfloat16"):
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert not out.exists()
    assert list(out.parent.glob(f".{out.name}.*")) == [] and list(out.parent.glob(".*partial*")) == []
    assert {r: sha256_tree(p) for r, p in models.items()} == before


@pytest.mark.slow
def test_mixed_dtypes_match_mergekit(masters, tmp_path):
    """Oracle check of the --mergekit-dtype rule: mergekit itself, no recipe dtype, bf16 + fp16 + fp32 (it
    computes and writes float32) gives the same bytes as ours with --mergekit-dtype --out-dtype float32."""
    pytest.importorskip("mergekit")
    models, _ = mixed_models(masters, tmp_path / "m", MIXES[0])
    recipe = write_recipe(tmp_path / "r.yaml", "task_arithmetic", models)
    code = ("from mergekit.scripts.run_yaml import main; import sys; "
            "main([sys.argv[1], sys.argv[2], '--allow-crimes', '--quiet', '--no-write-model-card'], standalone_mode=False)")
    mk = subprocess.Popen([sys.executable, "-c", code, str(recipe), str(tmp_path / "mk")], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:  # ours in-process while mergekit starts up
        cli("merge", recipe, "-o", tmp_path / "ours", "-q", "--mergekit-dtype", "--out-dtype", "float32", check=True)
    finally:
        _, mk_err = mk.communicate()
    assert mk.returncode == 0, mk_err[-3000:]
    ref, ours = load_dir(tmp_path / "mk"), load_dir(tmp_path / "ours")
    assert sorted(ref) == sorted(ours)
    for k in ref:
        assert ref[k].dtype == F32 and torch.equal(ours[k], ref[k]), k
