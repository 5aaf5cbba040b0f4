"""The CheckpointFormat interface (mergequant/checkpoint_formats): every registered format round-trips
(plan -> pack -> read back equals an independently dequantized reference), format_for_config picks the
right format for each config shape, methods hold their format instead of inheriting one, and each
format's client verdicts are the serving-matrix table's.

The references are computed here from the codes (scale * (q - zero), codes * absmax / 127, GGML Q8_0
blocks decoded by hand), not with the format's own dequantizer, so a packing or reading bug fails.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mergequant.checkpoint_formats import FORMATS, CheckpointFormat, available_formats, format_for_config, get_format
from mergequant.quant import awq, clients
from mergequant.quant.formats import g_idx_for
from mergequant.quant.gptq import quantize_rtn
from mergequant.quant.int8 import channel_int8_quantize, llm_int8_quantize
from mergequant.quant.method import METHODS, QuantLinear, get_method

PREFIX = "model.layers.0.mlp.down_proj"
N, K = 64, 128  # out, in: divisible by 32 for 3-bit GPTQ and by 8 for AWQ


def _opts(**kw):
    base = dict(bits=4, group_size=32, sym=True, desc_act=False, static_groups=False, damp=0.01, zero_point=True,
                alpha=0.5)
    return SimpleNamespace(**{**base, **kw})


def _weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


LIN = QuantLinear(PREFIX, 0, "mlp.down_proj", N, K, False)


# ---- one case per format: (planned, packed tensors, qcfg, reference float32 [N, K]) ---------------------

def _gptq(opts):
    fmt = get_format("gptq")
    W = _weight(1)
    q, scales, zeros = quantize_rtn(W, opts.bits, opts.group_size, opts.sym)
    g_idx = g_idx_for(K, opts.group_size)
    packed = fmt.pack(q.T, scales, zeros, g_idx, opts)
    s16 = scales.to(torch.float16).float()  # the checkpoint stores float16 scales
    ref = s16[g_idx.long()].T * (q.float() - zeros[g_idx.long()].T.float())
    return fmt.planned(LIN, opts), packed, fmt.quantization_config(opts), ref


def _awq(opts):
    fmt = get_format("awq_gemm")
    qw = awq.pseudo_quantize(_weight(2), 4, opts.group_size, opts.zero_point)
    g = torch.arange(K) // opts.group_size
    ref = qw.scales.to(torch.float16).float()[g].T * (qw.q.float() - qw.zeros[g].T.float())
    torch.testing.assert_close(ref, qw.w_hat, rtol=0, atol=0)  # the reference is AWQ's own W_hat
    return fmt.planned(LIN, opts), fmt.pack(qw.q.T, qw.zeros, qw.scales), fmt.quantization_config(opts), ref


def _bnb_int8(opts):
    fmt = get_format("bnb_int8")
    W = _weight(3)
    codes, scb = llm_int8_quantize(W)
    ref = codes.float() * scb[:, None] / 127
    assert (ref - W).abs().max() <= scb.max() / 127  # the codes really encode W
    return fmt.planned(LIN, opts), fmt.pack(codes, scb), fmt.quantization_config(opts), ref


def _compressed_tensors(opts):
    fmt = get_format("compressed_tensors")
    W = _weight(4)
    codes, scale = channel_int8_quantize(W, fmt.float_dtype(opts))
    ref = codes.float() * scale.float()
    assert (ref - W).abs().max() <= scale.float().max()
    return fmt.planned(LIN, opts), fmt.pack(codes, scale), fmt.quantization_config(opts), ref


def _q8_0_reference(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """GGML Q8_0 decoded by hand: per block of 32, a float16 scale then 32 int8 codes (34 bytes)."""
    blocks = raw.reshape(rows, cols // 32, 34)
    d = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, :, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(rows, cols)


def _gguf(opts):
    fmt = get_format("gguf")
    qtype = opts.gguf_type
    x = _weight(5).numpy()
    name = "blk.0.ffn_down.weight"
    data = fmt.pack(x, qtype)
    qcfg = {"quant_method": "gguf", "tensors": {name: (qtype, x.shape)}}
    if qtype == "Q8_0":
        ref = torch.from_numpy(_q8_0_reference(data, N, K))
    elif qtype == "F16":
        ref = torch.from_numpy(x.astype(np.float16).astype(np.float32))
    else:  # Q4_0: no hand decoder here; the error bound says the blocks hold x
        ref = None
    planned = [fmt.planned_tensor("weight", x.shape, qtype)]
    return planned, {"weight": torch.from_numpy(data)}, qcfg, ref


CASES = {
    "gptq": [_gptq, [dict(bits=4, group_size=32), dict(bits=3, group_size=-1, sym=False),
                     dict(bits=2, group_size=64), dict(bits=8, group_size=32, sym=False)]],
    "awq_gemm": [_awq, [dict(group_size=32), dict(group_size=64, zero_point=False)]],
    "bnb_int8": [_bnb_int8, [dict(bits=8)]],
    "compressed_tensors": [_compressed_tensors, [dict(bits=8)]],
    "gguf": [_gguf, [dict(gguf_type="Q8_0"), dict(gguf_type="F16"), dict(gguf_type="Q4_0")]],
}


def test_every_registered_format_has_a_round_trip_case():
    assert set(CASES) == set(FORMATS)  # a new format needs a case here
    for name in FORMATS:
        fmt = get_format(name)
        assert isinstance(fmt, CheckpointFormat) and fmt.name == name
        assert get_format(name) is fmt  # one shared instance
    assert [f.name for f in available_formats()] == list(FORMATS)


@pytest.mark.parametrize("name,settings", [(n, s) for n, (_, ss) in CASES.items() for s in ss],
                         ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{x}" for k, x in v.items()))
def test_plan_pack_dequantize_round_trips(name, settings):
    fmt = get_format(name)
    opts = _opts(**settings)
    planned, packed, qcfg, ref = CASES[name][0](opts)
    # what is packed is exactly what was planned (the writer lays out shards from the plan)
    assert [(t.name, t.dtype, tuple(t.shape)) for t in planned] == \
        [(k, v.dtype, tuple(v.shape)) for k, v in packed.items()]
    names = [f"{PREFIX}.{k}" for k in packed]
    stored = dict(zip(names, packed.values()))
    assert all(n.endswith(fmt.storage_suffixes()) for n in names)
    # a float neighbour (norm, bias) is neither a quantized module nor one of its tensors
    others = ["model.norm.weight", f"{PREFIX}.bias"]
    if name == "gguf":
        qcfg = {**qcfg, "tensors": {**qcfg["tensors"], "output_norm.weight": ("F32", (K,))}}
        names = ["blk.0.ffn_down.weight", "output_norm.weight"]
        stored = {"blk.0.ffn_down.weight": packed["weight"]}
        prefix = "blk.0.ffn_down"
        assert fmt.quantized_prefixes(names, qcfg) == ([] if settings["gguf_type"] == "F16" else [prefix])
    else:
        prefix = PREFIX
        assert fmt.quantized_prefixes(names + others, qcfg) == [PREFIX]
        assert not any(o.endswith(fmt.marker) for o in others if o != f"{PREFIX}.bias")
    W_hat = fmt.dequantize(stored.__getitem__, prefix, qcfg)
    assert W_hat.dtype == torch.float32 and tuple(W_hat.shape) == (N, K)
    if ref is not None:
        torch.testing.assert_close(W_hat, ref, rtol=1e-6, atol=1e-7)
    else:
        x = _weight(5)
        assert float((W_hat - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt()) < 0.2  # Q4_0 on Gaussian weights: ~0.1


def test_gptq_pack_records_the_checkpoint_format_it_writes():
    fmt = get_format("gptq")
    assert fmt.quantization_config(_opts(sym=True))["checkpoint_format"] == "gptq"
    assert fmt.quantization_config(_opts(sym=False))["checkpoint_format"] == "gptq_v2"
    # v1 stores zero - 1: the same codes packed for v1 and v2 differ in qzeros only
    W = _weight(6)
    q, s, z = quantize_rtn(W, 4, 32, True)
    g = g_idx_for(K, 32)
    v1, v2 = fmt.pack(q.T, s, z, g, _opts(sym=True)), fmt.pack(q.T, s, z, g, _opts(sym=False))
    assert torch.equal(v1["qweight"], v2["qweight"]) and not torch.equal(v1["qzeros"], v2["qzeros"])


# ---- format_for_config -------------------------------------------------------------------------------------

def _written_configs():
    """(quantization_config as mergequant writes it, the format expected to read it back)."""
    out = []
    for method, settings in [("gptq", {}), ("gptq", dict(sym=False)), ("rtn", dict(bits=3)), ("awq", {}),
                             ("awq", dict(zero_point=False)), ("int8", dict(bits=8)), ("w8a8", dict(bits=8))]:
        m = get_method(method)
        qcfg = m.format.quantization_config(_opts(**settings))
        out.append((f"{method}-{settings}", qcfg, m.format))
        out.append((f"{method}-{settings}-moe", m.format.declare_float(qcfg, r"^(?:.*\.)?layers\.\d+\.(?:mlp\.gate)$"),
                    m.format))
    return out


@pytest.mark.parametrize("label,qcfg,fmt", _written_configs(), ids=[c[0] for c in _written_configs()])
def test_format_for_config_picks_the_format_that_wrote_it(label, qcfg, fmt):
    assert format_for_config(qcfg) is fmt
    assert [f.name for f in available_formats() if f.handles(qcfg)] == [fmt.name]  # exactly one claims it


@pytest.mark.parametrize("qcfg,expected", [
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq_v2"}, "gptq"),  # a Hub GPTQ v2 checkpoint
    ({"quant_method": "awq", "bits": 4, "version": "GEMM"}, "awq_gemm"),  # AutoAWQ spells it upper case
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, None),  # another AWQ packing
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, None),  # NF4/FP4, not LLM.int8
    ({"quant_method": "bitsandbytes", "_load_in_8bit": True}, "bnb_int8"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8}}}}, None),  # FP8
    ({"quant_method": "compressed-tensors", "format": "naive-quantized",
      "config_groups": {"g": {"weights": {"type": "int", "num_bits": 8}}}}, "compressed_tensors"),
    ({"quant_method": "gguf"}, None),  # GGUF files have no config.json: never claimed from one
    ({}, None),
])
def test_format_for_config_on_other_config_shapes(qcfg, expected):
    fmt = format_for_config(qcfg)
    assert (fmt.name if fmt else None) == expected


# ---- methods hold their format --------------------------------------------------------------------------------

def test_methods_hold_their_format_and_delegate_to_it():
    from mergequant.quant.gptq_method import GPTQMethod, RTNMethod

    assert not issubclass(GPTQMethod, RTNMethod) and not issubclass(RTNMethod, GPTQMethod)
    assert GPTQMethod.format is RTNMethod.format is get_format("gptq")
    expected = {"gptq": "gptq", "rtn": "gptq", "awq": "awq_gemm", "int8": "bnb_int8", "w8a8": "compressed_tensors"}
    assert set(METHODS) == set(expected)
    for name, fname in expected.items():
        m = get_method(name)
        assert m.format is get_format(fname) and name in m.format.methods, name
        opts = _opts(bits=m.default_bits, group_size=32)
        assert m.planned(LIN, opts) == m.format.planned(LIN, opts)
        assert m.quantization_config(opts) == m.format.quantization_config(opts)
        assert m.extra_files(opts) == m.format.extra_files(opts)
        assert m.client_modules == m.format.client_modules
        assert type(m).dequantize.__self__ is type(m)  # still callable on the class (tests and tools do)
    # the formats' methods cover every method, and only the registered ones (gguf: its own driver)
    written_by = {m for f in available_formats() for m in f.methods}
    assert written_by == set(METHODS) | {"gguf"}


def test_gptq_and_rtn_share_the_format_constraints():
    from mergequant.errors import MergeQuantError

    odd = QuantLinear("model.layers.0.mlp.up_proj", 0, "mlp.up_proj", 48, 128, False)
    for method in ("gptq", "rtn"):
        with pytest.raises(MergeQuantError, match="3-bit packing"):
            get_method(method).validate(_opts(bits=3), [odd])
        with pytest.raises(MergeQuantError, match="--damp"):
            get_method(method).validate(_opts(damp=1.5), [LIN])
    with pytest.raises(MergeQuantError, match="AWQ packs 8"):
        get_method("awq").validate(_opts(n_grid=20), [QuantLinear("p", 0, "s", 12, 128, False)])


# ---- clients ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sid", list(clients.MATRIX))
def test_each_formats_verified_clients_are_the_tables(sid):
    method, settings = clients.MATRIX[sid]
    fmt = get_method(method).format
    assert fmt.verified_clients(settings, method) == clients.verified_clients(method, settings)
    assert fmt.client_warnings(settings, method) == clients.client_warnings(method, settings)
    if fmt.methods == (method,):  # a format written by one method: the method may be left out
        assert fmt.verified_clients(settings) == clients.verified_clients(method, settings)


def test_client_delegation_is_not_vacuous_and_refuses_foreign_methods():
    verified = {sid: get_method(m).format.verified_clients(s, m) for sid, (m, s) in clients.MATRIX.items()}
    warned = {sid: get_method(m).format.client_warnings(s, m) for sid, (m, s) in clients.MATRIX.items()}
    assert any(verified.values()) and any(warned.values())
    # rtn and gptq share the GPTQ format but not their rows: rtn's own row is the one used
    fmt = get_format("gptq")
    assert fmt.verified_clients(dict(bits=4, group_size=128), "rtn") == clients.verified_clients(
        "rtn", dict(bits=4, group_size=128))
    with pytest.raises(ValueError, match="does not write"):
        fmt.verified_clients({}, "awq")
    assert get_format("gguf").verified_clients(dict(bits=4)) == []  # not in the matrix: nothing claimed
