"""GPTQ: error vs RTN, blocked float32 vs an unblocked float64 reference, act order, edge cases."""

from __future__ import annotations

import pytest
import torch

from mergequant.quant.gptq import HessianAccumulator, gptq_quantize, gptq_quantize_batch, quantize_rtn

K, N, T = 256, 128, 512


def _data(seed=0, channel_scales=None):
    """Correlated activations X = Z @ A (random mixing) and a random weight W."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(T, K, generator=g, dtype=torch.float64)
    A = torch.randn(K, K, generator=g, dtype=torch.float64) / K**0.5 + torch.eye(K, dtype=torch.float64)
    X = Z @ A
    if channel_scales is not None:
        X = X * channel_scales
    W = torch.randn(N, K, generator=g, dtype=torch.float64) * 0.05
    return X, W.to(torch.float32)


def _hessian(X):
    acc = HessianAccumulator()
    for chunk in X.split(100):  # several uneven batches exercise the running average
        acc.add(chunk.to(torch.float32))
    return acc.hessian


def _out_err(X, W, W_hat):
    """||X W^T - X W_hat^T||_F in float64."""
    X = X.to(torch.float64)
    return float(torch.linalg.norm(X @ W.to(torch.float64).T - X @ W_hat.to(torch.float64).T))


def _dequant(r):
    """The GPTQ checkpoint dequant formula, written independently of the module."""
    g = r.g_idx.long()
    return r.scales[g].T * (r.codes.T.float() - r.zeros[g].T.float())


def _rtn_dequant(W, bits, gs, sym=True):
    q, s, z = quantize_rtn(W, bits, gs, sym)
    g = (torch.arange(W.shape[1]) // (W.shape[1] if gs == -1 else gs)).long()
    return s[g].T * (q.float() - z[g].T.float())


def test_hessian_accumulator_matches_direct_formula():
    X, _ = _data()
    H = _hessian(X)
    ref = 2.0 / X.shape[0] * X.T @ X
    assert H.dtype == torch.float32
    torch.testing.assert_close(H.double(), ref, rtol=1e-5, atol=1e-5)
    acc = HessianAccumulator()
    acc.add(X[:7].float().reshape(7, 1, K))
    acc.add(X[7:20].float())
    assert acc.nsamples == 20


def test_hessian_upper_strips_equal_the_full_product():
    """H is accumulated on upper row strips only (half the products) and mirrored when read: for a
    width of several strips it equals the float64 X^T X, is exactly symmetric, and reading it midway
    does not disturb later batches."""
    g = torch.Generator().manual_seed(3)
    k = 700  # several strips of HessianAccumulator.MIN_STRIP, the last one short
    X = torch.randn(300, k, generator=g, dtype=torch.float64)
    acc = HessianAccumulator()
    acc.add(X[:100].float())
    torch.testing.assert_close(acc.hessian.double(), 2.0 / 100 * X[:100].T @ X[:100], rtol=1e-5, atol=1e-5)
    acc.add(X[100:].float())  # after a read (mirror) the next batch still updates every entry
    H = acc.hessian
    assert len(acc._strips(k)) > 2
    assert torch.equal(H, H.T)
    torch.testing.assert_close(H.double(), 2.0 / 300 * X.T @ X, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gs", [128, -1, 32])
def test_batched_solves_equal_separate_solves(gs):
    """Independent weights solved as one batch (the experts' down projections) give exactly the codes,
    scales, zeros and proxy errors of separate solves, dead input columns and a failed factorization
    (round-to-nearest fallback) included."""
    probs = []
    for seed in range(4):
        X, W = _data(seed=20 + seed)
        if seed == 1:
            X[:, 7] = 0  # a dead input channel in one of them
        probs.append((W, _hessian(X)))
    probs[2] = (probs[2][0], -torch.eye(K))  # never factorizes: RTN, as on its own
    ref = [gptq_quantize(W, H, bits=4, group_size=gs) for W, H in probs]
    Hs = [H.clone() for _, H in probs]
    got = gptq_quantize_batch([W for W, _ in probs], Hs, bits=4, group_size=gs)
    assert Hs == []  # consumed
    for r, b in zip(ref, got):
        assert torch.equal(r.codes, b.codes) and torch.equal(r.scales, b.scales) and torch.equal(r.zeros, b.zeros)
        assert r.fallback_rtn == b.fallback_rtn and r.error == pytest.approx(b.error, rel=1e-12)
    assert [b.fallback_rtn for b in got] == [False, False, True, False]
    with pytest.raises(ValueError, match="one shape"):
        gptq_quantize_batch([probs[0][0], probs[0][0][:, :128]], [probs[0][1], probs[0][1]], bits=4)


def test_batched_stacked_solves_equal_separate_solves():
    """Batch entries given as row blocks sharing their H (an expert's gate and up under routed
    calibration) equal separate stacked solves, and a mismatched stack is refused."""
    probs = []
    for seed in range(3):
        X, W = _data(seed=40 + seed)
        probs.append(([W[:24], W[24:]], _hessian(X)))
    ref = [gptq_quantize(parts, H, bits=4, group_size=32) for parts, H in probs]
    got = gptq_quantize_batch([parts for parts, _ in probs], [H.clone() for _, H in probs], bits=4, group_size=32)
    for r, b in zip(ref, got):
        assert torch.equal(r.codes, b.codes) and torch.equal(r.scales, b.scales) and torch.equal(r.zeros, b.zeros)
        assert r.error == pytest.approx(b.error, rel=1e-12)
    W0 = probs[0][0]
    with pytest.raises(ValueError, match="one shape"):
        gptq_quantize_batch([W0, [W0[0][:, :64], W0[1][:, :64]]], [probs[0][1], probs[1][1]], bits=4)


def test_rtn_conventions():
    W = torch.tensor([[-1.0, 0.5, 0.25, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    q, s, z = quantize_rtn(W, 4, -1, sym=True)
    assert s.shape == (1, 3) and z.shape == (1, 3)
    assert (z == 8).all()  # sym zero point = 2^(bits-1)
    assert torch.allclose(s[0], torch.tensor([2 / 15, 2 / 15, 6 / 15]))  # all-zero row: scale 2/maxq, not 0
    assert (q[1] == 8).all()
    assert q.min() >= 0 and q.max() <= 15
    q, s, z = quantize_rtn(W, 4, 2, sym=False)
    assert s.shape == (2, 3)
    assert torch.allclose(s[:, 0], torch.tensor([1.5 / 15, 1.0 / 15]))
    assert z[0, 0] == 10 and z[1, 0] == 0
    W_hat = s[torch.tensor([0, 0, 1, 1])].T * (q.float() - z[torch.tensor([0, 0, 1, 1])].T.float())
    assert (W_hat[1] == 0).all()
    assert (W_hat - W).abs().max() <= s.max() / 2 + 1e-6


@pytest.mark.parametrize("bits,gs", [(4, 128), (3, 128), (3, -1)])
def test_gptq_beats_rtn(bits, gs):
    X, W = _data()
    H = _hessian(X)
    r = gptq_quantize(W, H, bits=bits, group_size=gs)
    assert not r.fallback_rtn
    e_gptq = _out_err(X, W, r.W_hat)
    e_rtn = _out_err(X, W, _rtn_dequant(W, bits, gs))
    ratio = e_gptq / e_rtn
    print(f"bits={bits} gs={gs}: GPTQ/RTN output error ratio {ratio:.3f}")
    assert ratio < 0.8, ratio
    assert torch.equal(_dequant(r), r.W_hat)  # exact checkpoint dequant identity
    # error field is the proxy loss tr(dW H dW^T) = (2/n)||X dW^T||^2
    assert r.error == pytest.approx(2.0 / T * e_gptq**2, rel=1e-3)


def _reference_gptq(W, H, bits, gs, damp=0.01):
    """Textbook unblocked GPTQ in float64: quantize a column, push its error onto all later columns."""
    W = W.double().clone()
    H = H.double().clone()
    n, k = W.shape
    maxq = 2**bits - 1
    H += damp * torch.diag(H).mean() * torch.eye(k, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    Uc = torch.linalg.cholesky(Hinv).T  # upper factor of H^-1, via the lower one
    W_hat = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    size = k if gs == -1 else gs
    for j in range(k):
        if j % size == 0:
            blk = W[:, j : j + size]
            amax = torch.maximum(blk.min(1).values.clamp(max=0).abs(), blk.max(1).values.clamp(min=0))
            amax[amax == 0] = 1
            scale = 2 * amax / maxq
            zero = (maxq + 1) / 2
        q = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, maxq)
        codes[:, j] = q
        W_hat[:, j] = scale * (q - zero)
        err = (W[:, j] - W_hat[:, j]) / Uc[j, j]
        W[:, j + 1 :] -= err[:, None] * Uc[j, j + 1 :][None, :]
    return codes, W_hat


@pytest.mark.parametrize("bits,gs,block", [(4, 128, 128), (4, -1, 128), (3, 32, 128), (4, 128, 48)])
def test_blocked_float32_matches_unblocked_float64_reference(bits, gs, block):
    X, W = _data(seed=1)
    H = _hessian(X)
    codes_ref, W_hat_ref = _reference_gptq(W, H, bits, gs)
    r = gptq_quantize(W, H, bits=bits, group_size=gs, block_size=block)
    same = (r.codes.T.double() == codes_ref).double().mean().item()
    assert same > 0.98, same
    # the few code flips are float32 rounding ties; the weights still agree to ~one step in a few places
    close = torch.isclose(r.W_hat.double(), W_hat_ref, atol=1e-6, rtol=1e-5).double().mean().item()
    assert close > 0.98, close
    assert _out_err(X, W, r.W_hat) == pytest.approx(_out_err(X, W, W_hat_ref.float()), rel=0.02)


def _unequal_scales():
    g = torch.Generator().manual_seed(12)
    return torch.exp(2.0 * torch.randn(K, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("gs", [-1, 128, 32])
def test_desc_act(gs):
    X, W = _data(seed=2, channel_scales=_unequal_scales())
    H = _hessian(X)
    plain = gptq_quantize(W, H, bits=4, group_size=gs)
    act = gptq_quantize(W, H, bits=4, group_size=gs, desc_act=True)
    e_plain, e_act = _out_err(X, W, plain.W_hat), _out_err(X, W, act.W_hat)
    print(f"gs={gs}: act-order / plain error {e_act / e_plain:.3f}")
    if gs == -1:  # one group: only the order changes; no group bookkeeping to check
        assert e_act < e_plain
        assert torch.equal(act.g_idx, torch.zeros(K, dtype=torch.int32))
        assert torch.equal(_dequant(act), act.W_hat)
        return
    # measured 0.85-0.88 here; with small groups act order is not guaranteed to win on every input
    # (other seeds gave up to ~1.05 at gs=32), so this fixed input is the check, not a law
    assert e_act < e_plain
    # perm sorts diag(H) descending
    d = torch.diag(H)
    assert sorted(act.perm.tolist()) == list(range(K))
    assert (d[act.perm][:-1] >= d[act.perm][1:]).all()
    # g_idx follows the permuted order: the j-th quantized column is in group j // gs
    assert torch.equal(act.g_idx[act.perm].long(), torch.arange(K) // gs)
    assert torch.equal(torch.bincount(act.g_idx.long()), torch.full((K // gs,), gs))
    assert torch.equal(_dequant(act), act.W_hat)
    assert not torch.equal(act.g_idx.long(), torch.arange(K) // gs)  # really permuted

    static = gptq_quantize(W, H, bits=4, group_size=gs, desc_act=True, static_groups=True)
    assert torch.equal(static.g_idx.long(), torch.arange(K) // gs)
    assert torch.equal(_dequant(static), static.W_hat)
    assert _out_err(X, W, static.W_hat) < _out_err(X, W, _rtn_dequant(W, 4, gs))


def test_dead_channel():
    X, W = _data(seed=4)
    X[:, 5] = 0
    X[:, 200] = 0
    H = _hessian(X)
    for desc_act in (False, True):
        r = gptq_quantize(W, H, bits=4, group_size=128, desc_act=desc_act)
        assert torch.isfinite(r.W_hat).all()
        assert (r.W_hat[:, 5] == 0).all() and (r.W_hat[:, 200] == 0).all()
        assert torch.equal(_dequant(r), r.W_hat)


def test_cholesky_retry_with_larger_damp():
    X, W = _data(seed=5)
    H = _hessian(X[:40])  # rank 40 < K: singular without damping
    H[0, 0] = -1e-3 * H[0, 0]  # and indefinite
    r = gptq_quantize(W, H, bits=4, group_size=128, damp=0.0)
    assert r.damp_used > 0
    assert not r.fallback_rtn
    assert torch.isfinite(r.W_hat).all()


def test_rtn_fallback_when_cholesky_always_fails(monkeypatch):
    X, W = _data(seed=6)
    # negative definite H: damping by a fraction of its (negative) mean diagonal never helps
    r = gptq_quantize(W, -torch.eye(K), bits=4, group_size=128)
    assert r.fallback_rtn and r.perm is None
    assert torch.equal(r.W_hat, _rtn_dequant(W, 4, 128))

    def boom(*a, **kw):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "cholesky", boom)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", boom)
    r = gptq_quantize(W, _hessian(X), bits=3, group_size=64, desc_act=True)
    assert r.fallback_rtn
    assert torch.equal(r.W_hat, _rtn_dequant(W, 3, 64))
    assert torch.equal(_dequant(r), r.W_hat)
    assert r.damp_used > 0.01


def test_validation():
    W = torch.randn(8, 96)
    H = torch.eye(96)
    with pytest.raises(ValueError, match=r"(?s)(?=.*\b96\b)(?=.*\b40\b)"):
        gptq_quantize(W, H, bits=4, group_size=40)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(W, H, bits=5)
    with pytest.raises(ValueError, match="40"):
        quantize_rtn(W, 4, 40)
    with pytest.raises(ValueError):
        gptq_quantize(W, torch.eye(95), bits=4)


def test_stacked_rows_solve_like_separate_modules():
    """GPTQ is row-independent given H: solving q, k, v stacked (what quantize does for modules with
    one shared input) gives the codes of solving each alone."""
    X, _ = _data(seed=3)
    H = _hessian(X)
    k = H.shape[0]
    g = torch.Generator().manual_seed(4)
    Ws = [torch.randn(n, k, generator=g) for n in (32, 16, 16)]
    stacked = gptq_quantize(torch.cat(Ws), H, bits=4, group_size=32)
    start = 0
    for W in Ws:
        alone = gptq_quantize(W, H, bits=4, group_size=32)
        rows = slice(start, start + W.shape[0])
        start += W.shape[0]
        same = (stacked.codes[:, rows] == alone.codes).float().mean().item()
        assert same > 0.999, same
        torch.testing.assert_close(stacked.scales[:, rows], alone.scales)


@pytest.mark.parametrize("k,block", [(300, 64), (257, 256), (64, 256), (7, 2)])
def test_in_place_factor_matches_torch_linalg(k, block):
    """The in-place blocked Cholesky / triangular inverse give torch.linalg's results, touch only the
    lower triangle, and a failed factorization can be undone from the untouched upper triangle."""
    from mergequant.quant.gptq import (
        _cholesky_lower_,
        _invert_lower_,
        _restore_lower_,
        _rotate180_,
        _zero_upper_,
    )

    g = torch.Generator().manual_seed(k)
    X = torch.randn(2 * k, k, generator=g, dtype=torch.float64)
    A = X.T @ X / (2 * k) + 0.1 * torch.eye(k, dtype=torch.float64)
    A = (A + A.T) / 2  # exactly symmetric, so restoring from the upper triangle gives A back bit for bit
    M = A.clone()
    assert _cholesky_lower_(M, block)
    L = torch.linalg.cholesky(A)
    torch.testing.assert_close(M.tril(), L, rtol=1e-10, atol=1e-10)
    assert torch.equal(M.triu(1), A.triu(1))  # strict upper triangle untouched
    F = M.clone()
    _restore_lower_(F, A.diagonal().clone(), block)
    assert torch.equal(F, A)
    _zero_upper_(M, block)
    assert torch.equal(M, M.tril())
    _invert_lower_(M, block)
    torch.testing.assert_close(M, torch.linalg.inv(L), rtol=1e-8, atol=1e-8)
    R = A.clone()
    _rotate180_(R, rows=3)
    assert torch.equal(R, A.flip(0, 1))
    bad = A.clone()
    bad[k // 2, k // 2] = -1.0  # indefinite: fails part way
    work = bad.clone()
    assert not _cholesky_lower_(work, block)
    _restore_lower_(work, bad.diagonal().clone(), block)
    assert torch.equal(work, bad)


def test_row_blocks_and_overwrite_h_give_the_same_result():
    """A list of row blocks is solved like their concatenation; overwrite_h consumes H (no copy)."""
    X, _ = _data(seed=7)
    H = _hessian(X)
    g = torch.Generator().manual_seed(8)
    Ws = [torch.randn(n, H.shape[0], generator=g) for n in (32, 16)]
    ref = gptq_quantize(torch.cat(Ws), H, bits=4, group_size=32)
    H2 = H.clone()
    got = gptq_quantize(Ws, H2, bits=4, group_size=32, overwrite_h=True)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.W_hat, ref.W_hat)
    assert not torch.equal(H2, H)  # used as the workspace
    assert got.error == pytest.approx(ref.error, rel=1e-6)


@pytest.mark.parametrize("desc_act,static_groups,gs", [(False, False, 64), (True, False, 64), (True, True, 64),
                                                       (False, False, -1)])
def test_solving_in_row_blocks_changes_nothing(desc_act, static_groups, gs):
    """Rows are independent given H: a working copy of a few rows at a time (blocks that straddle the
    boundary between stacked parts, dead columns included) gives the codes, scales and error of one block."""
    X, _ = _data(seed=9)
    X[:, 17] = 0  # a dead input channel
    H = _hessian(X)
    g = torch.Generator().manual_seed(10)
    Ws = [torch.randn(n, K, generator=g) for n in (40, 30, 26)]
    kw = dict(bits=4, group_size=gs, desc_act=desc_act, static_groups=static_groups)
    one = gptq_quantize(Ws, H, **kw)
    many = gptq_quantize(Ws, H, row_block_bytes=4 * K * 24, **kw)  # 24 rows per block: 4 blocks, 2 straddling
    assert torch.equal(many.codes, one.codes)
    assert torch.equal(many.scales, one.scales) and torch.equal(many.zeros, one.zeros)
    assert torch.equal(many.g_idx, one.g_idx)
    assert many.error == pytest.approx(one.error, rel=1e-5)
    assert (many.W_hat[:, 17] == 0).all()


def _thread_log(monkeypatch) -> list[tuple[str, int]]:
    """Record the intra-op thread count seen by each column loop and each factorization."""
    import mergequant.quant.gptq as g

    seen = []
    for name in ("_solve_rows", "_inverse_cholesky_upper_"):
        orig = getattr(g, name)

        def spy(*a, _orig=orig, _name=name, **k):
            seen.append((_name, torch.get_num_threads()))
            return _orig(*a, **k)
        monkeypatch.setattr(g, name, spy)
    return seen


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 intra-op threads to tell one from many")
def test_small_solves_run_on_one_thread_large_ones_on_all(monkeypatch):
    """A small solve (K^2 (N + K) <= SMALL_SOLVE_WORK) runs wholly on one thread and gives exactly what a
    run on one thread gives; a large one factorizes on every thread; the count is restored either way."""
    import mergequant.quant.gptq as g

    n_threads = torch.get_num_threads()
    torch.manual_seed(0)
    X = torch.randn(256, 64)
    H = X.T @ X
    W = torch.randn(48, 64)
    seen = _thread_log(monkeypatch)
    small = gptq_quantize(W, H, bits=4, group_size=32)
    assert seen and all(t == 1 for _, t in seen) and torch.get_num_threads() == n_threads
    torch.set_num_threads(1)
    try:
        ref = gptq_quantize(W, H, bits=4, group_size=32)
    finally:
        torch.set_num_threads(n_threads)
    assert torch.equal(small.codes, ref.codes) and torch.equal(small.scales, ref.scales)

    seen.clear()
    monkeypatch.setattr(g, "SMALL_SOLVE_WORK", 0)  # everything is large now
    gptq_quantize(W, H, bits=4, group_size=32)
    gptq_quantize_batch([W, W], [H.clone(), H.clone()], bits=4, group_size=32)
    assert ("_inverse_cholesky_upper_", n_threads) in seen
    assert torch.get_num_threads() == n_threads
    seen.clear()
    monkeypatch.setattr(g, "SMALL_SOLVE_WORK", 2e9)
    gptq_quantize_batch([W, W], [H.clone(), H.clone()], bits=4, group_size=32)
    assert seen and all(t == 1 for _, t in seen)
