"""mergequant.merge.methods against independent float64 references written here, DARE statistics, and the
streaming engine's chunked path against the whole-tensor functions.

The references below deliberately use only torch/numpy primitives (no mergequant helpers).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import run_cli
from mergequant.merge import engine
from mergequant.merge import methods as M


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------------------
# float64 references
# ------------------------------------------------------------------------------------------------------
def ref_linear(xs, ws, normalize):
    acc = sum(w * x.double() for x, w in zip(xs, ws))
    return acc / sum(ws) if normalize else acc


def ref_task_arithmetic(base, xs, ws, lam, normalize):
    b = base.double()
    mixed = sum(w * (x.double() - b) for x, w in zip(xs, ws))
    if normalize:
        mixed = mixed / sum(ws)
    return b + lam * mixed


def ref_topk_mask(delta32: torch.Tensor, density: float) -> np.ndarray:
    """Keep the k = int(density * n) largest |d|; among equal magnitudes the earliest positions win."""
    mags = delta32.reshape(-1).abs().numpy().astype(np.float64)
    n = mags.size
    keep = np.zeros(n, dtype=bool)
    if density >= 1:
        keep[:] = True
        return keep
    k = max(1, int(density * n))
    order = np.argsort(-mags, kind="stable")  # stable: ties keep flat order
    keep[order[:k]] = True
    return keep


def ref_ties(base, xs, ws, densities, lam=1.0, normalize=True):
    b32 = base.float()
    b = base.double().reshape(-1).numpy()
    weighted = []
    for x, w, dens in zip(xs, ws, densities):
        keep = ref_topk_mask(x.float() - b32, dens)  # selection on the float32 delta (the compute dtype)
        d = x.double().reshape(-1).numpy() - b
        weighted.append(np.where(keep, d, 0.0) * w)
    total = np.sum(weighted, axis=0)
    elected = np.where(total >= 0, 1.0, -1.0)
    num = np.zeros_like(b)
    den = np.zeros_like(b)
    for d, w in zip(weighted, ws):
        agree = np.sign(d) == elected
        num += np.where(agree, d, 0.0)
        den += np.where(agree, w, 0.0)
    den[den == 0] = 1.0
    mixed = num / den if normalize else num
    return torch.from_numpy(b + lam * mixed).reshape(base.shape)


def ref_slerp(t, v0, v1):
    a = v0.double().reshape(-1)
    b = v1.double().reshape(-1)
    cos = float(torch.dot(a / a.norm(), b / b.norm()))
    if abs(cos) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        th = math.acos(cos)
        out = math.sin((1 - t) * th) / math.sin(th) * a + math.sin(t * th) / math.sin(th) * b
    return out.reshape(v0.shape)


def assert_close(actual, expected, atol=1e-6, rtol=1e-6, what=""):
    diff = (actual.double() - expected.double()).abs()
    lim = atol + rtol * expected.double().abs()
    assert bool((diff <= lim).all()), f"{what}: max diff {float(diff.max()):.3g}"


# ------------------------------------------------------------------------------------------------------
# linear / task arithmetic
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_float64(normalize):
    xs = [rand(33, 47, seed=s) for s in range(3)]
    ws = [0.3, 1.7, -0.2]
    out = M.linear([x.clone() for x in xs], ws, normalize)
    assert out.dtype == torch.float32
    assert_close(out, ref_linear(xs, ws, normalize), what="linear")
    # and not trivially: normalize must matter here (sum of weights 1.8)
    assert not torch.allclose(out, ref_linear(xs, ws, not normalize).float())


@pytest.mark.parametrize("lam,normalize", [(1.0, False), (0.6, False), (1.4, True)])
def test_task_arithmetic_matches_float64(lam, normalize):
    base = rand(40, 30, seed=10)
    xs = [base + 0.1 * rand(40, 30, seed=s) for s in (11, 12)]
    ws = [0.7, 0.45]
    out = M.task_arithmetic(base, xs, ws, lam=lam, normalize=normalize)
    assert_close(out, ref_task_arithmetic(base, xs, ws, lam, normalize), what="task_arithmetic")


# ------------------------------------------------------------------------------------------------------
# TIES
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.77])
def test_magnitude_prune_keeps_exactly_k_largest(density):
    d = rand(64, 50, seed=3)
    out = M.magnitude_prune(d, density)
    k = max(1, int(density * d.numel()))
    kept = out != 0
    assert int(kept.sum()) == k
    assert torch.equal(out[kept], d[kept])  # kept entries unchanged
    expected = torch.zeros(d.numel(), dtype=torch.bool)
    expected[torch.topk(d.abs().reshape(-1), k).indices] = True
    assert torch.equal(kept.reshape(-1), expected)


def test_magnitude_prune_density_one_keeps_all():
    d = rand(10, 10, seed=4)
    assert torch.equal(M.magnitude_prune(d, 1.0), d)


def test_magnitude_prune_ties_keep_exactly_k_in_position_order():
    g = torch.Generator().manual_seed(5)
    # magnitudes in {1, 2, 3}: thousands of ties at every threshold, no zeros
    d = (torch.randint(1, 4, (3000,), generator=g) * (torch.randint(0, 2, (3000,), generator=g) * 2 - 1)).float()
    for density in (0.1, 0.33, 0.5, 0.9):
        out = M.magnitude_prune(d, density)
        kept = out != 0
        k = int(density * d.numel())
        assert int(kept.sum()) == k, f"density {density}: kept {int(kept.sum())}, want exactly {k}"
        assert float(d[kept].abs().min()) >= float(d[~kept].abs().max())
        assert np.array_equal(kept.numpy(), ref_topk_mask(d, density))


@pytest.mark.parametrize("lam,normalize", [(1.0, True), (0.7, False), (1.3, True)])
def test_ties_matches_float64_reference(lam, normalize):
    base = rand(48, 40, seed=20)
    xs = [base + 0.05 * rand(48, 40, seed=s) for s in (21, 22, 23)]
    ws = [0.6, 0.5, 1.2]
    dens = [0.5, 0.2, 1.0]
    out = M.ties(base, xs, ws, dens, lam=lam, normalize=normalize)
    assert_close(out, ref_ties(base, xs, ws, dens, lam, normalize), what="ties")


def test_ties_with_tied_magnitudes_matches_reference():
    g = torch.Generator().manual_seed(30)
    base = torch.randint(-64, 64, (70, 30), generator=g).float() / 64
    xs = [base + torch.randint(-3, 4, base.shape, generator=g).float() / 16 for _ in range(2)]
    out = M.ties(base, xs, [0.7, 0.5], [0.3, 0.6])
    assert_close(out, ref_ties(base, xs, [0.7, 0.5], [0.3, 0.6]), atol=1e-7, what="ties with ties")


def test_ties_sign_election_by_hand():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -1.0, 2.0, 0.0])
    b = torch.tensor([-3.0, -1.0, 1.0, 0.0])
    out = M.ties(base, [a, b], [1.0, 1.0], [1.0, 1.0])
    # elem0: sum -2 -> keep b only (-3); elem1: both agree (-1); elem2: both (+1.5); elem3: nothing -> 0
    assert torch.equal(out, torch.tensor([-3.0, -1.0, 1.5, 0.0]))


# ------------------------------------------------------------------------------------------------------
# SLERP
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.0, 0.2, 0.5, 0.85, 1.0])
def test_slerp_matches_float64(t):
    v0, v1 = rand(37, 53, seed=40), rand(37, 53, seed=41) * 1.7 + 0.3 * rand(37, 53, seed=40)
    out = M.slerp(t, v0, v1)
    assert out.dtype == torch.float32
    assert_close(out, ref_slerp(t, v0, v1), what=f"slerp t={t}")
    if t == 0.0:
        assert_close(out, v0, atol=1e-6, what="t=0 gives base")
    if t == 1.0:
        assert_close(out, v1, atol=1e-6, what="t=1 gives other")
    if 0 < t < 1:  # really spherical: not a plain lerp
        lerp = (1 - t) * v0.double() + t * v1.double()
        assert float((out.double() - lerp).abs().max()) > 1e-2


@pytest.mark.parametrize("scale", [2.5, -1.0])
def test_slerp_parallel_falls_back_to_lerp(scale):
    v0 = rand(20, 20, seed=42)
    v1 = v0 * scale
    for t in (0.0, 0.3, 1.0):
        out = M.slerp(t, v0, v1)
        assert_close(out, (1 - t) * v0.double() + t * v1.double(), what=f"lerp fallback t={t}")


def test_slerp_nearly_parallel_below_threshold_is_spherical():
    v0 = rand(4000, seed=43)
    noise = rand(4000, seed=44)
    noise -= torch.dot(noise, v0) / torch.dot(v0, v0) * v0  # orthogonal to v0
    v1 = v0 + noise * (v0.norm() / noise.norm()) * math.tan(math.acos(0.999))  # cos = 0.999
    out = M.slerp(0.5, v0, v1)
    ref = ref_slerp(0.5, v0, v1)
    assert_close(out, ref, what="near-parallel slerp")
    assert float((ref - 0.5 * (v0.double() + v1.double())).abs().max()) > 1e-5  # differs from lerp


# ------------------------------------------------------------------------------------------------------
# DARE
# ------------------------------------------------------------------------------------------------------
N_DARE = 400_000


def _dare_inputs():
    base = rand(N_DARE, seed=50, dtype=torch.float64)
    x = base + rand(N_DARE, seed=51, dtype=torch.float64)
    return base, x


@pytest.mark.parametrize("density", [0.1, 0.3, 0.75])
def test_dare_kept_fraction_and_l1_rescale(density):
    base, x = _dare_inputs()
    d = x - base
    plain = M.dare(base, [x], [1.0], [density], seed=0, name="t", consensus=False, rescale=False) - base
    kept = plain != 0
    frac = float(kept.double().mean())
    sigma = math.sqrt(density * (1 - density) / N_DARE)
    assert abs(frac - density) < 5 * sigma, f"kept {frac:.4f}, want {density} +- {5 * sigma:.4f}"
    assert torch.allclose(plain[kept], d[kept], rtol=0, atol=1e-12)  # kept entries untouched without rescale

    scaled = M.dare(base, [x], [1.0], [density], seed=0, name="t", consensus=False, rescale=True) - base
    assert torch.equal(scaled != 0, kept)  # same mask
    factor = float(d.abs().sum() / d[kept].abs().sum())
    assert torch.allclose(scaled[kept], d[kept] * factor, rtol=1e-12, atol=1e-12)
    assert math.isclose(float(scaled.abs().sum()), float(d.abs().sum()), rel_tol=1e-9)  # L1 restored
    assert abs(factor * density - 1) < 0.02  # ~1/density


def test_dare_seed_name_and_input_determinism():
    base, x = _dare_inputs()

    def run(seed, name="t"):
        torch.manual_seed(seed + 1000)  # the global RNG must not matter
        return M.dare(base, [x], [1.0], [0.5], seed=seed, name=name, consensus=False)

    a = run(0)
    assert torch.equal(a, run(0))
    for other in (run(1), run(0, name="u")):
        changed = float(((a != base) != (other != base)).double().mean())
        assert abs(changed - 0.5) < 0.01  # independent masks disagree on 2p(1-p) = 50% of entries
    # two inputs with identical deltas get independent masks: exactly one kept in ~2p(1-p) of entries
    both = M.dare(base, [x, x], [1.0, 1.0], [0.4, 0.4], seed=0, name="t", consensus=False, rescale=False) - base
    d = x - base
    one = torch.isclose(both, d, rtol=0, atol=1e-12)
    assert abs(float(one.double().mean()) - 2 * 0.4 * 0.6) < 0.01


DARE_RECIPE = """\
merge_method: dare_ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.4}}
  - model: {b}
    parameters: {{weight: 0.5, density: [0.7, 0.3]}}
dtype: float32
"""


def _load(out: Path) -> dict[str, torch.Tensor]:
    res = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            res.update({k: sf.get_tensor(k) for k in sf.keys()})
    return res


@pytest.mark.slow  # four CLI merges
def test_dare_cli_independent_of_workers_and_seeded(f32_models, tmp_path):
    recipe = tmp_path / "dare.yaml"
    recipe.write_text(DARE_RECIPE.format(**{k: str(v) for k, v in f32_models.items()}))
    runs = {"w1": ["--workers", "1"], "w3": ["--workers", "3"], "s7": ["--seed", "7"]}
    outs = {tag: tmp_path / tag for tag in runs}
    with ThreadPoolExecutor(len(runs)) as pool:  # three processes at once: the tests stay fast
        list(pool.map(lambda tag: run_cli("merge", recipe, "-o", outs[tag], "-q", *runs[tag], check=True), runs))
    files = sorted(p.name for p in outs["w1"].glob("*.safetensors"))
    assert files == sorted(p.name for p in outs["w3"].glob("*.safetensors"))
    for f in files:
        assert (outs["w1"] / f).read_bytes() == (outs["w3"] / f).read_bytes(), f"{f} depends on --workers"
    w1, s7 = _load(outs["w1"]), _load(outs["s7"])
    assert any(not torch.equal(w1[k], s7[k]) for k in w1), "--seed changes nothing"
    # statistics on the embeddings (t = 0: densities 0.4 and 0.7): with sign consensus an entry stays at the
    # base value only when both deltas were dropped, probability 0.6 * 0.3
    base = _load(f32_models["base"])
    emb = "model.embed_tokens.weight"
    unchanged = float((w1[emb] == base[emb]).double().mean())
    n = base[emb].numel()
    assert abs(unchanged - 0.18) < 5 * math.sqrt(0.18 * 0.82 / n) + 2e-3, unchanged


# ------------------------------------------------------------------------------------------------------
# engine: chunked streaming == whole-tensor functions
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tie_models(tmp_path_factory):
    """float32 tiny Llamas whose values are multiples of 1/64 and deltas multiples of 1/16 (exact in
    float32): |delta| ties at the top-k threshold everywhere, spanning chunk boundaries."""
    from mergequant.demo import llama_tensor_shapes, tiny_llama_config, write_checkpoint

    root = tmp_path_factory.mktemp("ties_models")
    cfg = tiny_llama_config(hidden=64, intermediate=160, layers=2, vocab=512, dtype="float32")
    g = torch.Generator().manual_seed(60)
    base = {n: torch.randint(-64, 64, s, generator=g).float() / 64 for n, s in llama_tensor_shapes(cfg).items()}
    paths = {"base": write_checkpoint(root / "base", cfg, base, tokenizer=False)}
    for m in ("a", "b"):
        t = {n: x + torch.randint(-3, 4, x.shape, generator=g).float() / 16 for n, x in base.items()}
        paths[m] = write_checkpoint(root / m, cfg, t, tokenizer=False)
    return paths


CHUNK_RECIPES = {
    "ties": ("""merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.7, density: 0.3}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.55}}
parameters: {{lambda: 0.9}}
""", lambda B, A, Bb: M.ties(B, [A, Bb], [0.7, 0.5], [0.3, 0.55], lam=0.9)),
    "linear": ("""merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: 0.2}}
""", lambda B, A, Bb: M.linear([A, Bb], [0.7, 0.2])),
    "task_arithmetic": ("""merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: -0.4}}
parameters: {{lambda: 1.2}}
""", lambda B, A, Bb: M.task_arithmetic(B, [A, Bb], [0.7, -0.4], lam=1.2)),
    "slerp": ("""merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {a}
parameters: {{t: 0.35}}
""", lambda B, A, Bb: M.slerp(0.35, B, A)),
}


def _paths(method):
    """The engine's CPU paths for a method: the fused numba kernel (when installed) and the torch path."""
    if method in ("linear", "slerp"):
        return ["torch"]
    kernels = getattr(engine, "K", None)
    return ["torch", "fused"] if kernels is not None and kernels.AVAILABLE else ["torch"]


def _run_engine(recipe, out, monkeypatch, *, chunk, path, seed=0):
    from mergequant.merge.run import MergeOptions, run_merge

    monkeypatch.setattr(engine, "CHUNK", chunk)
    if getattr(engine, "K", None) is not None:
        monkeypatch.setattr(engine.K, "AVAILABLE", path == "fused")
    run_merge(recipe, MergeOptions(out=out, quiet=True, fsync=False, workers=2, seed=seed), log=lambda m: None)
    return _load(out)


@pytest.mark.parametrize("method,path", [(m, p) for m in CHUNK_RECIPES for p in _paths(m)])
def test_engine_chunked_equals_whole_tensor(method, path, tie_models, tmp_path, monkeypatch):
    text, whole = CHUNK_RECIPES[method]
    recipe = tmp_path / f"{method}.yaml"
    recipe.write_text(text.format(**{k: str(v) for k, v in tie_models.items()}))
    default = engine.CHUNK
    assert default > 40_000  # larger than every tensor here: the default run is whole-tensor
    small = _run_engine(recipe, tmp_path / "small", monkeypatch, chunk=1000, path=path)
    big = _run_engine(recipe, tmp_path / "big", monkeypatch, chunk=default, path=path)
    base, a, b = (_load(tie_models[m]) for m in ("base", "a", "b"))
    assert sorted(small) == sorted(base)
    multi_chunk = 0
    for k in sorted(base):
        multi_chunk += base[k].numel() > 1000
        expected = whole(base[k], a[k], b[k])
        if method == "slerp":  # norms are summed chunk by chunk: float64 rounding order only
            assert_close(small[k], expected, atol=1e-6, rtol=1e-6, what=k)
            assert_close(big[k], expected, atol=1e-6, rtol=1e-6, what=k)
        else:
            assert torch.equal(small[k], expected), f"{method}/{path}: {k}: chunked engine differs from the whole-tensor function"
            assert torch.equal(big[k], expected), f"{method}/{path}: {k}"
        if method == "ties":
            ref = ref_ties(base[k], [a[k], b[k]], [0.7, 0.5], [0.3, 0.55], lam=0.9)
            assert_close(small[k], ref, atol=1e-6, rtol=1e-6, what=f"{k} vs float64 reference")
    assert multi_chunk >= 10


DARE_CHUNK_RECIPE = """merge_method: dare_ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.7, density: 0.3}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.55}}
"""


@pytest.mark.skipif("fused" not in _paths("ties"), reason="numba kernels not available")
def test_engine_dare_fused_equals_torch_path(tie_models, tmp_path, monkeypatch):
    recipe = tmp_path / "dare.yaml"
    recipe.write_text(DARE_CHUNK_RECIPE.format(**{k: str(v) for k, v in tie_models.items()}))
    torch_out = _run_engine(recipe, tmp_path / "t", monkeypatch, chunk=1000, path="torch", seed=3)
    fused_out = _run_engine(recipe, tmp_path / "f", monkeypatch, chunk=1000, path="fused", seed=3)
    base = _load(tie_models["base"])
    for k in sorted(base):
        assert_close(fused_out[k], torch_out[k], atol=1e-6, rtol=1e-6, what=k)
    # and DARE did drop entries: with consensus, an entry keeps the base value iff both deltas were dropped
    # or were 0 (deltas here are 0 with probability 1/7)
    emb = "model.embed_tokens.weight"
    p0 = (1 - 0.3 + 0.3 / 7) * (1 - 0.55 + 0.55 / 7)
    frac = float((torch_out[emb] == base[emb]).double().mean())
    assert abs(frac - p0) < 5 * math.sqrt(p0 * (1 - p0) / base[emb].numel()), (frac, p0)
