"""LayerRunner: layer-by-layer execution must reproduce the full transformers model exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mergequant.errors import MergeQuantError
from mergequant.quant.gptq import HessianAccumulator
from mergequant.quant.runner import LayerRunner, linear_modules, run_layer

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM

S, T, V = 3, 16, 128

ARCHS = {
    "llama": {},
    "mistral": {},
    "qwen2": {},  # q/k/v biases
    "qwen3": {},  # q_norm / k_norm
    "gemma": {},  # scaled embedding, (1 + w) norms, tied lm_head
    "gemma2": {"sliding_window": 4, "final_logit_softcapping": 5.0},
    # layer 0 sliding (window 4, local rope), layer 1 full attention: different kwargs per layer
    "gemma3_text": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
}


def _config(model_type: str):
    return AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=V, max_position_embeddings=64, **ARCHS[model_type])


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random init leaves biases at 0 and norms at 1: make every tensor distinct so a mis-load shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """model_type -> (full float32 model, directory it was saved to, calibration ids)."""
    out = {}
    for i, mt in enumerate(ARCHS):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(_config(mt)).float().eval()
        _perturb(model, 100 + i)
        d = tmp_path_factory.mktemp(mt)
        model.save_pretrained(d)
        ids = torch.randint(0, V, (S, T), generator=torch.Generator().manual_seed(7 + i))
        out[mt] = (model, d, ids)
    return out


@pytest.mark.parametrize("model_type", list(ARCHS))
@pytest.mark.parametrize("batch_size", [1, 2])
def test_noop_logits_match_full_model(tiny_models, model_type, batch_size):
    model, d, ids = tiny_models[model_type]
    with torch.no_grad():
        ref = model(ids).logits
    logits = LayerRunner(d, ids, batch_size=batch_size).run(finish=True)
    assert logits.shape == (S, T, V)
    assert logits.abs().max() > 0.1
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_modified_weights_are_fed_forward(tiny_models, model_type):
    _, d, ids = tiny_models[model_type]

    def zero_down(i, layer, inputs):
        if i == 0:
            layer.mlp.down_proj.weight.zero_()

    logits = LayerRunner(d, ids, batch_size=2).run(zero_down, finish=True)

    edited = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        orig = edited(ids).logits
        edited.model.layers[0].mlp.down_proj.weight.zero_()
        ref = edited(ids).logits
    assert (ref - orig).abs().max() > 1e-3  # the edit matters, so the comparison below can fail
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layer_idx", [0, 1])
def test_hessian_of_q_proj_matches_full_model(tiny_models, layer_idx):
    model, d, ids = tiny_models["qwen2"]
    got = {}

    def collect(i, layer, inputs):
        lin = linear_modules(layer)
        assert {"self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"} <= set(lin)
        if i != layer_idx:
            return
        acc = HessianAccumulator()
        h = lin["self_attn.q_proj"].register_forward_hook(lambda m, a, o: acc.add(a[0]))
        try:
            run_layer(layer, inputs)
        finally:
            h.remove()
        got["H"], got["n"] = acc.hessian.clone(), acc.nsamples

    LayerRunner(d, ids, batch_size=2).run(collect)

    xs = []
    q = model.model.layers[layer_idx].self_attn.q_proj
    h = q.register_forward_hook(lambda m, a, o: xs.append(a[0].detach().clone()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    x = torch.cat(xs).reshape(-1, q.in_features).double()
    ref = (2.0 / x.shape[0]) * x.T @ x
    assert got["n"] == S * T
    torch.testing.assert_close(got["H"].double(), ref, atol=1e-5, rtol=1e-4)


def test_one_layer_materialized_at_a_time(tiny_models):
    _, d, ids = tiny_models["mistral"]
    runner = LayerRunner(d, ids)
    seen = []

    def check(i, layer, inputs):
        for j, other in enumerate(runner.layers):
            devs = {p.device.type for p in other.parameters()}
            assert devs == ({"cpu"} if j == i else {"meta"}), (i, j, devs)
        assert runner.model.model.embed_tokens.weight.device.type == "meta"
        assert runner.model.lm_head.weight.device.type == "meta"
        seen.append(i)

    runner.run(check)
    assert seen == [0, 1]
    assert all(p.device.type == "meta" for p in runner.model.parameters())


def test_missing_config(tmp_path, tiny_models):
    _, d, ids = tiny_models["llama"]
    for f in d.iterdir():
        if f.name != "config.json":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(MergeQuantError, match="config.json"):
        LayerRunner(tmp_path, ids)


def test_unknown_model_type(tmp_path, tiny_models):
    _, d, ids = tiny_models["llama"]
    for f in d.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "frobnicator"
    cfg["architectures"] = ["FrobnicatorForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeQuantError, match="frobnicator.*not known"):
        LayerRunner(tmp_path, ids)


def test_layers_not_at_model_layers(tmp_path):
    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=V, n_positions=32)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(MergeQuantError, match="GPT2LMHeadModel is not supported .*no architecture description"):
        LayerRunner(tmp_path, torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2"])
def test_capture_module_inputs_matches_full_forward_and_shares_inputs(tiny_models, model_type):
    """The early-stopping capture sees, chunk by chunk, exactly the inputs a full forward gives each
    module, reports q/k/v (and gate/up) as one shared input, and does not run past the last module."""
    from mergequant.quant.runner import capture_module_inputs

    model, d, ids = tiny_models[model_type]
    groups = [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
              ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]]

    def check(i, layer, inputs):
        lin = linear_modules(layer)
        for group in groups:
            full: dict[str, list] = {n: [] for n in group}
            hooks = [lin[n].register_forward_hook(lambda m, a, o, n=n: full[n].append(a[0].clone())) for n in group]
            try:
                run_layer(layer, inputs)
            finally:
                for h in hooks:
                    h.remove()
            seen: dict[str, list] = {n: [] for n in group}
            calls = []
            after = lin["mlp.down_proj"].register_forward_hook(lambda *a: calls.append("down ran"))
            try:
                capture_module_inputs(layer, inputs, {n: lin[n] for n in group},
                                      lambda names, x: [seen[n].append(x.clone()) for n in names] and None
                                      or calls.append(tuple(sorted(names))))
            finally:
                after.remove()
            for n in group:
                assert len(seen[n]) == len(inputs)
                for a, b in zip(seen[n], full[n]):
                    torch.testing.assert_close(a, b, atol=0, rtol=0)
            # one sink call per chunk with every name of the group (the inputs are the same tensor)
            assert calls.count(tuple(sorted(group))) == len(inputs), calls
            assert "down ran" not in calls  # the forward stopped at the last needed module

    LayerRunner(d, ids, batch_size=2).run(check)


@pytest.mark.parametrize("model_type", ["qwen2", "gemma3_text"])
def test_deferred_weights_stay_on_meta_and_compute_the_same(tiny_models, model_type):
    """Deferred Linears are never materialized, yet a forward that calls them reads their weights
    from the checkpoint: the logits equal the full model's."""
    model, d, ids = tiny_models[model_type]
    deferred = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    runner = LayerRunner(d, ids, batch_size=2)
    seen = []

    def check(i, layer, inputs):
        mods = dict(layer.named_modules())
        for name, mod in mods.items():
            if isinstance(mod, torch.nn.Linear):
                want = "meta" if name in deferred else "cpu"
                assert mod.weight.device.type == want, (name, mod.weight.device)
        assert mods["self_attn.q_proj"].bias is None or mods["self_attn.q_proj"].bias.device.type == "cpu"
        seen.append(i)

    logits = runner.run(check, finish=True, deferred=lambda i: deferred)
    assert seen == [0, 1]
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
    for layer in runner.layers:  # freed: no installed forward keeps a reference
        assert not any("forward" in m.__dict__ for m in layer.modules())


def test_deferring_an_unknown_module_is_an_error(tiny_models):
    _, d, ids = tiny_models["llama"]
    with pytest.raises(MergeQuantError, match="no Linear module 'mlp.nope'"):
        LayerRunner(d, ids).run(deferred=lambda i: ["mlp.nope"])


def test_hidden_states_are_stored_in_a_16_bit_checkpoints_dtype(tiny_models, tmp_path):
    """A bf16 checkpoint's inter-layer hidden states are kept in bf16 (half the memory) while every
    layer computes in float32; a float32 checkpoint keeps float32 (exact, tested above)."""
    model, _, ids = tiny_models["llama"]
    d = tmp_path / "bf16"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(d)  # the fixture's model stays float32
    seen = []

    def check(i, layer, inputs):
        seen.append((inputs.hidden[0].dtype, next(iter(inputs))[0].dtype, layer.mlp.up_proj.weight.dtype))

    runner = LayerRunner(d, ids, batch_size=2)
    assert runner.activation_dtype == torch.bfloat16
    logits = runner.run(check, finish=True)
    assert seen == [(torch.bfloat16, torch.float32, torch.float32)] * 2
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # bf16 weights, float32 compute
    with torch.no_grad():
        full = ref(ids).logits
    err = float((logits - full).abs().max())
    assert 0 < err < 0.05 * float(full.abs().max()), err  # only the stored activations were rounded
    assert LayerRunner(tiny_models["llama"][1], ids).activation_dtype == torch.float32


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_parallel_capture_never_computes_the_groups_modules(tiny_models, model_type):
    """``parallel=True`` (a true-sequential group): the modules of the group that run before the last
    one's input is seen are not computed (their weights may not even be loaded), the inputs are the same
    as without it, and every module computes again afterwards."""
    from mergequant.quant.runner import capture_module_inputs

    _, d, ids = tiny_models[model_type]
    group = ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"]

    def check(i, layer, inputs):
        lin = linear_modules(layer)
        seen = {True: [], False: []}
        for parallel in (False, True):
            computed = []
            hooks = [lin[n].register_forward_hook(lambda m, a, o, n=n: computed.append((n, float(o.abs().sum()))))
                     for n in group]
            try:
                capture_module_inputs(layer, inputs, {n: lin[n] for n in group},
                                      lambda names, x: seen[parallel].append(x.clone()), parallel=parallel)
            finally:
                for h in hooks:
                    h.remove()
            # the module(s) run before the last pre-hook: real outputs without, zeros with parallel=True
            assert computed and all((s == 0) == parallel for _, s in computed), computed
        assert len(seen[True]) == len(seen[False]) == len(inputs)
        assert all(torch.equal(a, b) for a, b in zip(seen[True], seen[False]))
        assert all("forward" not in lin[n].__dict__ for n in group)  # the Linears compute again
        assert float(lin[group[0]](inputs.hidden[0].float()).abs().sum()) > 0

    LayerRunner(d, ids, batch_size=2).run(check)
