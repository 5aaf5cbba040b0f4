"""Compact forwards: a quantized module computing from uint8 codes must be exactly its W_hat."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergequant.quant import compact
from mergequant.quant.compact import (
    CheckpointForward,
    QuantizedForward,
    remove_forwards,
)
from mergequant.quant.gptq import HessianAccumulator, gptq_quantize


def _problem(n=96, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(512, k, generator=g) @ mix  # correlated inputs
    acc = HessianAccumulator(k)
    acc.add(x)
    return torch.randn(n, k, generator=g), acc.hessian, x


@pytest.mark.parametrize("bits,group_size,desc_act", [(4, 64, False), (4, 64, True), (4, -1, False), (4, 32, True),
                                                      (2, 64, False), (3, 64, True), (8, 32, False)])
def test_weight_is_bitwise_w_hat_and_forward_matches(bits, group_size, desc_act, monkeypatch):
    W, H, x = _problem()
    res = gptq_quantize(W, H, bits=bits, group_size=group_size, desc_act=desc_act)
    lin = nn.Linear(W.shape[1], W.shape[0], bias=True)
    monkeypatch.setattr(compact, "BLOCK_BYTES", 4 * W.shape[1] * 40)  # 40 output features per block: 3 blocks
    fwd = QuantizedForward(lin, res.codes, res.scales, res.zeros, res.g_idx, bits=bits)
    assert fwd.block == 40
    # 2- and 4-bit codes are held packed: a quarter / half of a byte per weight
    assert fwd.codes.numel() * fwd.codes.element_size() == W.numel() * {2: 1, 3: 4, 4: 2, 8: 4}[bits] // 4
    assert torch.equal(fwd.weight(), res.W_hat)  # same formula, same float32 operations
    lin.forward = fwd
    with torch.no_grad():
        got = lin(x[:7].reshape(7, 1, -1))
        ref = F.linear(x[:7], res.W_hat.double().float(), lin.bias).reshape(7, 1, -1)
    assert got.shape == (7, 1, W.shape[0])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_hand_made_codes_against_float64_formula():
    # two groups of 2 input features, 3 outputs; g_idx deliberately not in natural order (act order)
    codes = torch.tensor([[0, 15, 7], [3, 8, 1], [9, 2, 15], [4, 4, 4]], dtype=torch.uint8)  # [K=4, N=3]
    scales = torch.tensor([[0.5, 0.25, 2.0], [0.125, 1.0, 0.75]])
    zeros = torch.tensor([[8, 7, 8], [1, 8, 3]], dtype=torch.int32)
    g_idx = torch.tensor([1, 0, 0, 1], dtype=torch.int32)
    lin = nn.Linear(4, 3, bias=False)
    fwd = QuantizedForward(lin, codes, scales, zeros, g_idx, bits=4)
    assert fwd.groups is not None  # gathered, not broadcast
    ref = torch.empty(3, 4, dtype=torch.float64)
    for n in range(3):
        for k in range(4):
            g = int(g_idx[k])
            ref[n, k] = float(scales[g, n]) * (int(codes[k, n]) - int(zeros[g, n]))
    assert torch.equal(fwd.weight().double(), ref)
    x = torch.randn(5, 4)
    torch.testing.assert_close(fwd(x).double(), x.double() @ ref.T, rtol=1e-6, atol=1e-6)


def test_column_slices_of_stacked_codes():
    """q/k/v solved as one stacked matrix: each module gets a column slice of the shared codes."""
    W, H, x = _problem(n=96)
    res = gptq_quantize([W[:64], W[64:]], H, bits=4, group_size=64)
    for rows in (slice(0, 64), slice(64, 96)):
        lin = nn.Linear(W.shape[1], rows.stop - rows.start, bias=False)
        fwd = QuantizedForward(lin, res.codes[:, rows], res.scales[:, rows], res.zeros[:, rows], res.g_idx, bits=4)
        assert torch.equal(fwd.weight(), res.W_hat[rows])
        torch.testing.assert_close(fwd(x[:3]), x[:3] @ res.W_hat[rows].T, rtol=1e-5, atol=1e-5)


def test_checkpoint_forward_reads_per_call_and_remove_forwards():
    lin = nn.Linear(8, 4)
    w = torch.randn(4, 8, dtype=torch.bfloat16)
    reads = []

    def read():
        reads.append(1)
        return w

    lin.forward = CheckpointForward(lin, read)
    x = torch.randn(2, 8)
    torch.testing.assert_close(lin(x), F.linear(x, w.float(), lin.bias))
    lin(x)
    assert len(reads) == 2
    outer = nn.Sequential(lin)
    remove_forwards(outer)
    assert "forward" not in lin.__dict__
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))  # the class forward again
