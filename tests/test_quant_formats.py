"""Bit layouts of the quantized on-disk formats, checked against hand-made words (see quant-formats notes)."""

from __future__ import annotations

import pytest
import torch

import mergequant
from mergequant.quant.formats import (
    awq_dequantize,
    awq_pack,
    awq_pack_zeros,
    awq_quantize_config,
    awq_unpack,
    awq_unpack_zeros,
    g_idx_for,
    gptq_dequantize,
    gptq_pack,
    gptq_quantize_config,
    gptq_unpack,
    pack_cols,
    pack_rows,
    unpack_cols,
    unpack_rows,
)


def s32(word: int) -> int:
    """Unsigned 32-bit Python int -> the signed value an int32 tensor holds."""
    return word - (1 << 32) if word >= (1 << 31) else word


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------- hand-made words


def test_4bit_rows_1_to_8_is_0x87654321():
    q = torch.arange(1, 9, dtype=torch.int32).view(8, 1)
    packed = pack_rows(q, 4)
    assert packed.dtype == torch.int32 and packed.shape == (1, 1)
    assert packed.item() == s32(0x87654321) == -2023406815
    assert torch.equal(unpack_rows(packed, 4, 8), q)


def test_4bit_columns_are_independent_and_rows_stack_words():
    # 16 rows x 2 columns -> 2 words per column; column 1 holds 15 - value
    col0 = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 0xF, 0, 0xA, 0, 0, 0, 0, 0xC])
    q = torch.stack([col0, 15 - col0], dim=1)
    packed = pack_rows(q, 4)
    assert packed.shape == (2, 2)
    assert packed[:, 0].tolist() == [s32(0x87654321), s32(0xC0000A0F)]
    assert packed[:, 1].tolist() == [s32(0x789ABCDE), s32(0x3FFFF5F0)]


def test_symmetric_4bit_v1_qzeros_are_0x77777777():
    K, N, gs = 64, 16, 32
    q = torch.randint(0, 16, (K, N), generator=gen(0))
    zeros = torch.full((K // gs, N), 8)
    out = gptq_pack(q, zeros, torch.ones(K // gs, N), g_idx_for(K, gs), 4, "gptq")
    assert out["qzeros"].shape == (2, 2)
    assert (out["qzeros"] == 0x77777777).all()
    out2 = gptq_pack(q, zeros, torch.ones(K // gs, N), g_idx_for(K, gs), 4, "gptq_v2")
    assert (out2["qzeros"] == s32(0x88888888)).all()


def test_2bit_hand_word():
    vals = [1, 2, 3, 0, 3, 3, 2, 1, 0, 0, 1, 1, 2, 2, 3, 3]
    # lowest bits first: rows 0..15 -> bits 0..31, 2 bits each
    expected = 0
    for j, v in enumerate(vals):
        expected |= v << (2 * j)
    assert expected == 0xFA506F39  # written out by hand
    packed = pack_rows(torch.tensor(vals).view(16, 1), 2)
    assert packed.item() == s32(0xFA506F39)


def test_8bit_hand_word():
    q = torch.tensor([[0x01], [0x23], [0x45], [0xFE]])
    assert pack_rows(q, 8).item() == s32(0xFE452301)
    assert pack_cols(q.t(), 8).item() == s32(0xFE452301)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_whole_word_packing_matches_python_ints_across_blocks(bits, monkeypatch):
    """The 2/4/8-bit path (no value straddles a word), with blocks of 3 words so several blocks and a
    short last one are packed, against words built from Python ints."""
    import mergequant.quant.formats as fm

    per = 32 // bits
    K, N = per * 7, 5
    q = torch.randint(0, 1 << bits, (K, N), generator=gen(bits))
    monkeypatch.setattr(fm, "PACK_BLOCK_BYTES", 3 * per * N * 8)
    packed = pack_rows(q, bits)
    expected = [[s32(sum(int(q[w * per + j, n]) << (bits * j) for j in range(per))) for n in range(N)]
                for w in range(K // per)]
    assert packed.tolist() == expected
    assert torch.equal(unpack_rows(packed, bits, K), q)


def test_3bit_is_a_little_endian_96bit_stream():
    vals = [(5 * j + 3) % 8 for j in range(32)]
    vals[10], vals[21] = 5, 3
    stream = 0
    for j, v in enumerate(vals):
        stream |= v << (3 * j)
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(3)]
    # value 10 spans stream bits 30..32 and value 21 bits 63..65: both straddle a word boundary,
    # with set bits on each side, so a per-word packer would get them wrong
    assert vals[10] & 0b001 and vals[10] & 0b100 and vals[21] & 0b001 and vals[21] & 0b110
    assert (words[0] >> 30) & 1 and words[1] & 1 and (words[1] >> 31) & 1 and words[2] & 1
    packed = pack_rows(torch.tensor(vals).view(32, 1), 3)
    assert packed.shape == (3, 1)
    assert packed[:, 0].tolist() == [s32(w) for w in words]
    # and along columns (qzeros)
    packed_c = pack_cols(torch.tensor(vals).view(1, 32), 3)
    assert packed_c.shape == (1, 3)
    assert packed_c[0].tolist() == [s32(w) for w in words]


def test_3bit_all_sevens_is_all_ones():
    packed = pack_rows(torch.full((64, 3), 7), 3)
    assert packed.shape == (6, 3) and (packed == -1).all()


# ----------------------------------------------------------------- round trips


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rows_round_trip(bits):
    K, N = 256, 96
    q = torch.randint(0, 1 << bits, (K, N), generator=gen(bits))
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (K * bits // 32, N)
    assert torch.equal(unpack_rows(packed, bits, K), q.to(torch.int32))
    # some words have the top bit set, so the signed int32 path is exercised
    assert (packed < 0).any()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cols_round_trip(bits):
    G, N = 4, 128
    z = torch.randint(0, 1 << bits, (G, N), generator=gen(10 + bits))
    packed = pack_cols(z, bits)
    assert packed.dtype == torch.int32 and packed.shape == (G, N * bits // 32)
    assert torch.equal(unpack_cols(packed, bits, N), z.to(torch.int32))
    assert torch.equal(packed, pack_rows(z.t(), bits).t())


def test_pack_rejects_out_of_range_and_bad_shapes():
    with pytest.raises(ValueError):
        pack_rows(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError):
        pack_rows(torch.full((8, 1), -1), 4)
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(12, 1, dtype=torch.int64), 4)  # 12 not a multiple of 8
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(16, 1, dtype=torch.int64), 3)  # 3-bit needs 32-row chunks
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(32, 1, dtype=torch.int64), 5)


# ----------------------------------------------------------------- g_idx and GPTQ dequant


def test_g_idx_plain_and_one_group():
    assert g_idx_for(8, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert g_idx_for(6, -1).tolist() == [0] * 6
    assert g_idx_for(8, 4).dtype == torch.int32


def test_g_idx_act_order_hand():
    # processing order: channel 3 first, then 0, 2, 1 -> first group {3, 0}, second {2, 1}
    perm = torch.tensor([3, 0, 2, 1])
    assert g_idx_for(4, 2, perm).tolist() == [0, 1, 1, 0]


def _reference(q, z, s, g_idx):
    """Direct float64 W[n, k] = s[g[k], n] * (q[k, n] - z[g[k], n]), loop over k."""
    K, N = q.shape
    W = torch.empty(N, K, dtype=torch.float64)
    for k in range(K):
        g = int(g_idx[k])
        W[:, k] = s[g].double() * (q[k].double() - z[g].double())
    return W


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_desc_act_round_trip(bits, fmt):
    K, N, gs = 128, 64, 32
    G = K // gs
    g = gen(100 + bits)
    perm = torch.randperm(K, generator=g)
    g_idx = g_idx_for(K, gs, perm)
    assert torch.bincount(g_idx.long()).tolist() == [gs] * G
    assert not torch.equal(g_idx, g_idx_for(K, gs))  # act order really changes the mapping
    q = torch.randint(0, 1 << bits, (K, N), generator=g)
    lo = 1 if fmt == "gptq" else 0
    z = torch.randint(lo, 1 << bits, (G, N), generator=g)
    s = (torch.rand(G, N, generator=g) * 0.1 + 0.01).half()  # fp16-exact so the comparison is exact
    out = gptq_pack(q, z, s, g_idx, bits, fmt)
    assert out["qweight"].shape == (K * bits // 32, N) and out["qweight"].dtype == torch.int32
    assert out["qzeros"].shape == (G, N * bits // 32) and out["qzeros"].dtype == torch.int32
    assert out["scales"].dtype == torch.float16 and out["g_idx"].dtype == torch.int32
    q2, z2 = gptq_unpack(out["qweight"], out["qzeros"], bits, fmt)
    assert torch.equal(q2, q.int()) and torch.equal(z2, z.int())
    W = gptq_dequantize(out["qweight"], out["qzeros"], out["scales"], out["g_idx"], bits, fmt, dtype=torch.float64)
    assert W.shape == (N, K)
    assert torch.allclose(W, _reference(q, z, s, g_idx), rtol=0, atol=1e-12)
    # the group mapping matters: dequantizing with the plain g_idx gives a different weight
    W_plain = gptq_dequantize(out["qweight"], out["qzeros"], out["scales"], g_idx_for(K, gs), bits, fmt)
    assert not torch.allclose(W_plain.double(), W)


def test_gptq_v1_zero_of_zero_raises():
    K, N = 32, 8
    z = torch.full((1, N), 3)
    z[0, 5] = 0
    with pytest.raises(ValueError, match="gptq_v2"):
        gptq_pack(torch.zeros(K, N, dtype=torch.int64), z, torch.ones(1, N), g_idx_for(K, -1), 4, "gptq")


def test_gptq_v2_stores_raw_zeros_and_v1_stores_minus_one():
    K, N = 32, 8
    z = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 15]])
    q = torch.zeros(K, N, dtype=torch.int64)
    v2 = gptq_pack(q, z, torch.ones(1, N), g_idx_for(K, -1), 4, "gptq_v2")
    assert v2["qzeros"].tolist() == [[s32(0xF6543210)]]
    z1 = z.clone()
    z1[0, 0] = 1
    v1 = gptq_pack(q, z1, torch.ones(1, N), g_idx_for(K, -1), 4, "gptq")
    assert v1["qzeros"].tolist() == [[s32(0xE5432100)]]


# ----------------------------------------------------------------- AWQ


def test_awq_columns_1_to_8_is_0x86427531():
    q = torch.arange(1, 9, dtype=torch.int32).view(1, 8)
    assert awq_pack(q).item() == s32(0x86427531)
    assert awq_pack_zeros(q).item() == s32(0x86427531)
    assert awq_unpack(torch.tensor([[s32(0x86427531)]], dtype=torch.int32)).tolist() == [list(range(1, 9))]


def test_awq_second_block_and_rows():
    q = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 15, 15, 0, 0, 0, 0, 0, 9],
                      [7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    # block 2 columns 8..15 = [15,15,0,0,0,0,0,9]: nibbles (cols 0,2,4,6,1,3,5,7) = 15,0,0,0,15,0,0,9
    assert awq_pack(q).tolist() == [[s32(0x75316420), s32(0x900F000F)], [7, 0]]


def test_awq_round_trip():
    K, N = 128, 256
    q = torch.randint(0, 16, (K, N), generator=gen(7))
    packed = awq_pack(q)
    assert packed.dtype == torch.int32 and packed.shape == (K, N // 8)
    assert (packed < 0).any()
    assert torch.equal(awq_unpack(packed), q.int())
    z = torch.randint(0, 16, (K // 64, N), generator=gen(8))
    assert torch.equal(awq_unpack_zeros(awq_pack_zeros(z)), z.int())


def test_awq_dequantize_matches_direct():
    K, N, gs = 128, 64, 32
    g = gen(9)
    q = torch.randint(0, 16, (K, N), generator=g)
    z = torch.randint(0, 16, (K // gs, N), generator=g)
    s = (torch.rand(K // gs, N, generator=g) * 0.1 + 0.01).half()
    W = awq_dequantize(awq_pack(q), awq_pack_zeros(z), s, gs, dtype=torch.float64)
    assert W.shape == (N, K)
    assert torch.allclose(W, _reference(q, z, s, g_idx_for(K, gs)), rtol=0, atol=1e-12)


def test_awq_rejects_bad_input():
    with pytest.raises(ValueError):
        awq_pack(torch.zeros(2, 12, dtype=torch.int64))
    with pytest.raises(ValueError):
        awq_pack(torch.full((1, 8), 16))


# ----------------------------------------------------------------- configs


def test_gptq_config_defaults_exact():
    assert gptq_quantize_config() == {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
        "true_sequential": True, "damp_percent": 0.01, "static_groups": False, "checkpoint_format": "gptq",
        "pack_dtype": "int32", "lm_head": False, "meta": {"quantizer": [f"mergequant:{mergequant.__version__}"]},
    }


def test_gptq_config_values_passed_through():
    cfg = gptq_quantize_config(bits=8, group_size=-1, desc_act=True, sym=False, damp_percent=0.1,
                               static_groups=True, checkpoint_format="gptq_v2", version="9.9")
    assert (cfg["bits"], cfg["group_size"], cfg["desc_act"], cfg["sym"]) == (8, -1, True, False)
    assert (cfg["damp_percent"], cfg["static_groups"], cfg["checkpoint_format"]) == (0.1, True, "gptq_v2")
    assert cfg["meta"] == {"quantizer": ["mergequant:9.9"]}
    with pytest.raises(ValueError):
        gptq_quantize_config(sym=False, checkpoint_format="gptq")
    with pytest.raises(ValueError):
        gptq_quantize_config(bits=5)


def test_awq_config_exact():
    assert awq_quantize_config() == {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": None,
    }
    assert awq_quantize_config(group_size=64, modules_to_not_convert=["lm_head"])["modules_to_not_convert"] == ["lm_head"]
    with pytest.raises(ValueError):
        awq_quantize_config(bits=8)
