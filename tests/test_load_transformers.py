"""A TIES merge of bf16 checkpoints is a model transformers loads and runs, with exactly our tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from helpers import cli

transformers = pytest.importorskip("transformers")

RECIPE = """\
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4, density: [0.8, 0.4]}}
parameters: {{normalize: true}}
dtype: bfloat16
"""


@pytest.fixture(scope="module")
def merged_dir(bf16_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("load_tf")
    recipe = root / "ties.yaml"
    recipe.write_text(RECIPE.format(**{k: str(v) for k, v in bf16_models.items()}))
    out = root / "merged"
    cli("merge", recipe, "-o", out, "-q", check=True)  # in-process: this test is about the output, not the CLI
    return out


def _safetensors(path):
    res = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            res.update({k: sf.get_tensor(k) for k in sf.keys()})
    return res


def test_transformers_loads_generates(merged_dir, bf16_models):
    from transformers import AutoModelForCausalLM

    cfg = json.loads((merged_dir / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"
    model, info = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16, output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info

    ours = _safetensors(merged_dir)
    sd = model.state_dict()
    assert sorted(sd) == sorted(ours)
    for k, v in ours.items():
        assert v.dtype == torch.bfloat16, k
        assert torch.equal(sd[k], v), f"{k}: transformers holds different values than our safetensors"
    # the merge really moved the weights away from every parent
    for parent in bf16_models.values():
        p = _safetensors(parent)
        assert any(not torch.equal(p[k], ours[k]) for k in ours)

    ids = torch.tensor([[5, 17, 300, 42, 9]])
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.shape == (1, 5, cfg["vocab_size"])
        assert bool(torch.isfinite(logits.float()).all())
        gen = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 11)
    assert torch.equal(gen[0, :5], ids[0])
    new = gen[0, 5:]
    assert bool(((new >= 0) & (new < cfg["vocab_size"])).all())
    # greedy decoding: the first new token is the argmax of the last position's logits (token 1 is EOS,
    # suppressed by min_new_tokens, so compare against the argmax over the other tokens)
    last = logits[0, -1].float().clone()
    last[cfg["eos_token_id"]] = -float("inf")
    assert int(new[0]) == int(last.argmax())
