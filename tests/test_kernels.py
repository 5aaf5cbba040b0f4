"""The fused numba path equals the plain torch path, and the bracketed top-k is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mergequant.merge import engine
from mergequant.merge import kernels as K
from mergequant.merge.run import MergeOptions, run_merge

pytestmark = pytest.mark.skipif(not K.AVAILABLE, reason="numba not installed")


def _reference_selection(a: np.ndarray, k: int) -> np.ndarray:
    """Keep-mask of the k largest values, ties broken by lower index (stable sort in float64)."""
    order = np.lexsort((np.arange(a.size), -a.astype(np.float64)))
    keep = np.zeros(a.size, bool)
    keep[order[:k]] = True
    return keep


def _mask_from(sel: K.Selection, a: np.ndarray) -> np.ndarray:
    if sel.keep_all:
        return np.ones(a.size, bool)
    idx = np.arange(a.size)
    return (a > sel.threshold) | ((a == np.float32(sel.threshold)) & (idx <= sel.cutoff))


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_threshold_is_exact(density, ties):
    rng = np.random.default_rng(0)
    n = 50_000
    base = rng.standard_normal(n).astype(np.float32)
    x = base + rng.standard_normal(n).astype(np.float32)
    if ties:  # coarse values: many elements tie at the threshold (as with bf16 inputs)
        x = base + np.round(rng.standard_normal(n) * 4).astype(np.float32) / 4
    a = np.abs(x - base)
    k = max(1, int(density * n))

    def chunks():
        for s in range(0, n, 7000):
            yield s, base[s:s + 7000], x[s:s + 7000]

    sel = K.topk_threshold(chunks, n, k)
    got = _mask_from(sel, a)
    assert got.sum() == k
    np.testing.assert_array_equal(got, _reference_selection(a, k))


@pytest.mark.parametrize("k", [1, 3, 5000, 9999, 10000])
def test_topk_threshold_all_equal_and_bf16_inputs(k):
    """Every |delta| equal (the worst case for ties), on bfloat16 raw inputs."""
    n = 10_000
    base = torch.zeros(n, dtype=torch.bfloat16)
    x = torch.full((n,), -0.5, dtype=torch.bfloat16)
    a = np.full(n, 0.5, np.float32)

    def chunks():
        for s in range(0, n, 3001):
            yield s, K.raw(base[s:s + 3001]), K.raw(x[s:s + 3001])

    sel = K.topk_threshold(chunks, n, k)
    got = _mask_from(sel, a)
    assert got.sum() == k and got[:k].all()


RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.2}}\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
              "  - model: {b}\n    parameters: {{weight: 0.4}}\ndtype: float32\n",
    "linear_bf16": "merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.2}}\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                   "  - model: {b}\n    parameters: {{weight: 0.4}}\nout_dtype: bfloat16\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7, density: [0.9, 0.2]}}\n"
            "  - model: {b}\n    parameters: {{weight: 0.4, density: 0.5}}\nparameters: {{lambda: 0.9}}\ndtype: float32\n",
    "ties_rescale": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5, density: 0.3}}\n"
                    "  - model: {b}\n    parameters: {{weight: 0.5, density: 0.6}}\nparameters: {{rescale: true}}\ndtype: float32\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5, density: 0.4}}\n"
                 "  - model: {b}\n    parameters: {{weight: 0.5, density: 0.7}}\ndtype: float32\n",
    "dare_linear": "merge_method: dare_linear\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
                   "  - model: {b}\n    parameters: {{weight: 0.3, density: 0.5}}\nparameters: {{normalize: true}}\ndtype: float32\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n"
                       "  - model: {b}\n    parameters: {{weight: -0.3}}\nparameters: {{lambda: 1.3}}\ndtype: float32\n",
}


def _merge(recipe: Path, out: Path) -> dict[str, torch.Tensor]:
    run_merge(recipe, MergeOptions(out=out, quiet=True, fsync=False, seed=7), log=lambda m: None)
    sd = {}
    for f in sorted(out.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_fused_kernel_matches_torch_path(method, f32_models, tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES[method].format(**{k: str(v) for k, v in f32_models.items()}))
    monkeypatch.setattr(engine, "CHUNK", 3000)  # several chunks per tensor: offsets and tie cut-offs cross chunks
    fused = _merge(recipe, tmp_path / "fused")
    monkeypatch.setattr(K, "AVAILABLE", False)
    plain = _merge(recipe, tmp_path / "plain")
    assert fused.keys() == plain.keys()
    # linear may differ by an ulp or two (torch folds alpha differently); everything else is bit-identical
    tol = dict(rtol=3e-7, atol=1e-9) if method == "linear" else dict(rtol=0, atol=0)  # a couple of ulps
    if method == "linear_bf16":  # ... and an ulp of float32 can flip a bfloat16 rounding
        tol = dict(rtol=2 ** -7, atol=1e-6)  # one bfloat16 ulp
    for name in fused:
        assert fused[name].dtype == plain[name].dtype
        torch.testing.assert_close(fused[name], plain[name], msg=lambda m, name=name: f"{name}: {m}", **tol)
