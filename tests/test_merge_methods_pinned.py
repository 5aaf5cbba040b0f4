"""The methods that existed before the one-file-per-method restructuring (issue 13) give byte-identical outputs.

Each recipe below is merged in-process on the shared tiny Llama checkpoints (bf16 base, poet, coder; plus a
float32 copy of poet for the mixed-dtype path) and the output is reduced to one sha256 over every tensor's
name, dtype, shape and bytes, plus the written config.json. ``PINNED`` holds the digests computed with the
code as it was before the restructuring (commit 580363b): any change in a byte of any tensor fails here.
The variants cover both engine paths (fused numba kernel and torch), small chunks (DARE masks are drawn per
chunk; TIES ties are cut across chunks), ``--mergekit-dtype``, slices, seeds and mixed input dtypes.

Regenerate (only when a change of numbers is intended and documented): ``python tests/test_merge_methods_pinned.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergequant.merge import engine
from mergequant.merge.run import MergeOptions, run_merge

# the read-only shared folder sits beside the repository (also in CI's clean clone); /work/shared here
SHARED = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "models", Path("/work/shared/models"))
               if (p / "base" / "config.json").exists()), Path("/work/shared/models"))

RECIPES: dict[str, str] = {
    "linear_filters_gradients": """
        merge_method: linear
        models:
          - model: $base
            parameters: {weight: [0.2, 1.0]}
          - model: $poet
            parameters: {weight: [{filter: mlp, value: 0.5}, {filter: self_attn, value: [1.0, 0.1, 0.6]}, {value: 1.5}]}
          - model: $coder
        parameters: {weight: 0.4, normalize: false}
    """,
    "linear_out_f32": """
        merge_method: linear
        models:
          - {model: $poet, parameters: {weight: 0.6}}
          - {model: $coder, parameters: {weight: 0.3}}
        out_dtype: float32
    """,
    "task_arithmetic": """
        merge_method: task_arithmetic
        base_model: $base
        models:
          - model: $poet
            parameters: {weight: [{filter: mlp, value: 1.2}, {value: 0.3}]}
          - model: $coder
            parameters: {weight: [0.2, 0.9]}
        parameters: {normalize: true, lambda: 1.5}
    """,
    "ties": """
        merge_method: ties
        base_model: $base
        models:
          - model: $base
          - model: $poet
            parameters: {weight: 0.6, density: [0.9, 0.3]}
          - model: $coder
            parameters: {weight: [{filter: self_attn, value: 0.3}, {value: 0.8}], density: 0.5}
    """,
    "ties_rescale_f32": """
        merge_method: ties
        base_model: $base
        models:
          - {model: $poet, parameters: {weight: 0.6, density: 0.4}}
          - {model: $coder, parameters: {weight: 0.5, density: 0.7}}
        parameters: {rescale: true, normalize: false, lambda: 0.7}
        out_dtype: float32
    """,
    "dare_ties": """
        merge_method: dare_ties
        base_model: $base
        models:
          - {model: $poet, parameters: {weight: 0.5, density: 0.6}}
          - {model: $coder, parameters: {weight: 0.5, density: [0.3, 0.8]}}
        parameters: {normalize: true}
    """,
    "dare_linear_no_rescale": """
        merge_method: dare_linear
        base_model: $base
        models:
          - {model: $poet, parameters: {weight: 0.7, density: 0.5}}
          - {model: $coder, parameters: {weight: 0.4, density: 0.6}}
        parameters: {rescale: false, normalize: true}
        out_dtype: float32
    """,
    "slerp": """
        merge_method: slerp
        base_model: $base
        models:
          - model: $base
          - model: $poet
        parameters:
          t: [{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}, {value: 0.5}]
    """,
    "ties_slices": """
        merge_method: ties
        base_model: $base
        slices:
          - sources:
              - {model: $base, layer_range: [0, 2]}
              - {model: $poet, layer_range: [0, 2], parameters: {weight: 1.0, density: [0.9, 0.3]}}
              - {model: $coder, layer_range: [0, 2], parameters: {weight: 0.5, density: 0.6}}
          - sources:
              - {model: $base, layer_range: [2, 4]}
              - {model: $poet, layer_range: [2, 4], parameters: {weight: 0.7, density: 0.5}}
              - {model: $coder, layer_range: [2, 4], parameters: {weight: 0.5, density: [0.2, 0.8]}}
            parameters: {lambda: 1.3}
    """,
    "linear_frankenmerge": """
        merge_method: linear
        slices:
          - sources: [{model: $poet, layer_range: [0, 3]}]
            parameters: {weight: 1.0}
          - sources: [{model: $coder, layer_range: [1, 4]}]
            parameters: {weight: 1.0}
    """,
    "ties_mixed_dtypes": """
        merge_method: ties
        base_model: $base
        models:
          - {model: $poet32, parameters: {weight: 0.6, density: 0.5}}
          - {model: $coder, parameters: {weight: 0.4, density: 0.3}}
    """,
}
RECIPES["ties_mergekit_dtype"] = RECIPES["ties"].rstrip() + "\n        dtype: bfloat16\n"
RECIPES["task_arithmetic_mergekit_dtype"] = RECIPES["task_arithmetic"].rstrip() + "\n        dtype: bfloat16\n"

# name -> (recipe, {"chunk": elements per chunk, "numba": bool, "seed": int, "mergekit_dtype": bool})
VARIANTS: dict[str, tuple[str, dict]] = {name: (name, {}) for name in RECIPES}
VARIANTS["ties_mergekit_dtype"] = ("ties_mergekit_dtype", {"mergekit_dtype": True})
VARIANTS["task_arithmetic_mergekit_dtype"] = ("task_arithmetic_mergekit_dtype", {"mergekit_dtype": True})
VARIANTS["dare_ties_seed7"] = ("dare_ties", {"seed": 7})
for _name in ("ties", "ties_rescale_f32", "dare_ties", "dare_linear_no_rescale", "linear_filters_gradients", "slerp"):
    VARIANTS[f"{_name}_chunk50k"] = (_name, {"chunk": 50_000})
for _name in ("ties", "ties_rescale_f32", "dare_ties", "linear_out_f32", "task_arithmetic"):
    VARIANTS[f"{_name}_torch"] = (_name, {"numba": False, "chunk": 70_001})

PINNED = {  # computed at 580363b, before the restructuring
    'dare_linear_no_rescale': 'a63ce3f5f8ab1c4f4cfa3084630dd4ad7efa90e0ff7f244162a0e1f3fcd174c1',
    'dare_linear_no_rescale_chunk50k': '3eb69a17fda3602abb77f2954b2aa7deb251b6ee57d30bdad43881a4151a64ce',
    'dare_ties': '9ac86f65d109da19d49b001368727ed2c862c40994de98d9bb05decd020c3c2a',
    'dare_ties_chunk50k': 'dc7d305d8e9c8644578742e99e9c9718179fbf798e0d58ea895b1bc35f5d8a37',
    'dare_ties_seed7': '56a81dbaf3cbb0998e8105d7246dea9bfb2d01c7d52cbcfee84879cf97b4a2bd',
    'dare_ties_torch': '3808a97823511451fa6706c0ac653fd6e558d30ed3074a0a602b5574cf351575',
    'linear_filters_gradients': '1ce2b3eebfaa122ef23b953fc2c06cf4018a1b504aa2e26ce576c1bade0065fa',
    'linear_filters_gradients_chunk50k': '1ce2b3eebfaa122ef23b953fc2c06cf4018a1b504aa2e26ce576c1bade0065fa',
    'linear_frankenmerge': 'a515c06ac3527fe318accd1f54e0c7878dac064b80f48ef567f20d21435c9826',
    'linear_out_f32': 'e063fadcbafcfa192c01aad934c64fa264d874093e1ee0d0c121da2e121fd6b8',
    'linear_out_f32_torch': '925f9845d0b5858f945f0cfcdccd4f983417455afef83dec9884a132be2324ad',
    'slerp': '7b927cd3cccda55e816fb8a4b487e6b97119b0b750647af082d36d2e291fb217',
    'slerp_chunk50k': '7b927cd3cccda55e816fb8a4b487e6b97119b0b750647af082d36d2e291fb217',
    'task_arithmetic': 'fb9d4b1633d3ab5f6def2f2815013550c6326d4c2072a77f1a02b2d0e95ddeef',
    'task_arithmetic_mergekit_dtype': '673cd8dccdd232dbf6d3be6d39e3e0536a4bacf7974030165f1b8020127994e6',
    'task_arithmetic_torch': 'fb9d4b1633d3ab5f6def2f2815013550c6326d4c2072a77f1a02b2d0e95ddeef',
    'ties': '3abe253443edb365f2edc95c1dadae5b56e13ae377cce0700f3d4541344e9f5c',
    'ties_chunk50k': '3abe253443edb365f2edc95c1dadae5b56e13ae377cce0700f3d4541344e9f5c',
    'ties_mergekit_dtype': '2762569a2a73ece51f79d5e6e342f0723b5de036c452dac3502f4f9af1586897',
    'ties_mixed_dtypes': '5c2fe7b2ed63854223763cfbb301ae22e3ce420c954528ae58a354eb4a322931',
    'ties_rescale_f32': '8c3c30f24ab6b2cebc8cd013c6b501f3379309ed4f854dfce9ddef3e166957a1',
    'ties_rescale_f32_chunk50k': '8c3c30f24ab6b2cebc8cd013c6b501f3379309ed4f854dfce9ddef3e166957a1',
    'ties_rescale_f32_torch': '8c3c30f24ab6b2cebc8cd013c6b501f3379309ed4f854dfce9ddef3e166957a1',
    'ties_slices': 'f9db42ea1704062eda317ed4de5aa919d08215aebd72235ff6a62107af8d2f66',
    'ties_torch': '3abe253443edb365f2edc95c1dadae5b56e13ae377cce0700f3d4541344e9f5c',
}


def digest(out: Path) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in name order, then config.json (canonical)."""
    h = hashlib.sha256()
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k)
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(json.loads((out / "config.json").read_text()), sort_keys=True).encode())
    return h.hexdigest()


def _f32_copy(src: Path, dst: Path) -> Path:
    """A float32 copy of a checkpoint (one shard), for the mixed-dtype variant."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k).float()
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    return dst


def run_variant(name: str, root: Path, models: dict[str, Path]) -> str:
    from string import Template
    import textwrap

    from mergequant.merge import kernels

    recipe_name, opts = VARIANTS[name]
    recipe = root / f"{name}.yaml"
    recipe.write_text(Template(textwrap.dedent(RECIPES[recipe_name])).substitute({k: str(v) for k, v in models.items()}))
    chunk, numba = engine.CHUNK, kernels.AVAILABLE
    engine.CHUNK = opts.get("chunk", chunk)
    kernels.AVAILABLE = opts.get("numba", numba)
    try:
        out = root / f"{name}.out"
        run_merge(recipe, MergeOptions(out=out, quiet=True, fsync=False, workers=2, seed=opts.get("seed", 0),
                                       mergekit_dtype=opts.get("mergekit_dtype", False)), log=lambda m: None)
    finally:
        engine.CHUNK, kernels.AVAILABLE = chunk, numba
    return digest(out)


def _models(root: Path) -> dict[str, Path]:
    models = {m: SHARED / m for m in ("base", "poet", "coder")}
    models["poet32"] = _f32_copy(SHARED / "poet", root / "poet32")
    return models


@pytest.fixture(scope="module")
def shared_models(tmp_path_factory):
    if not (SHARED / "base" / "config.json").exists():
        pytest.skip("shared tiny models missing")
    return _models(tmp_path_factory.mktemp("pinned_models"))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_existing_methods_byte_identical(name, shared_models, tmp_path):
    assert name in PINNED, f"no pinned digest for {name}"
    assert run_variant(name, tmp_path, shared_models) == PINNED[name], \
        f"{name}: output bytes changed from the pinned pre-restructuring output"


if __name__ == "__main__":  # print the digests of the current code
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ms = _models(Path(d))
        for n in sorted(VARIANTS):
            print(f"    {n!r}: {run_variant(n, Path(d), ms)!r},", flush=True)
    sys.exit(0)
