"""``--method gguf --calib --gguf-search gptq``: GPTQ error feedback inside the k-quant grids
(mergequant/gguf/gptq_grid.py).

- the block layouts: a finished block's grid (step, offset, codes) reproduces gguf-py's dequantization exactly and
  writing its codes back reproduces its bytes, for every k-quant, plain and importance-weighted, adversarial rows
  included (the GPTQ loop rounds on that grid and packs with those writers);
- with a diagonal Hessian there is nothing to feed back: the bytes are the importance-weighted search's, per type;
- on correlated inputs the output error tr((W - W_hat) H (W - W_hat)^T), W_hat from gguf-py's own dequantizers,
  is clearly lower than the importance-weighted search's, per type;
- rows are independent (the q/k rotary row permutation may be applied before or after; a large weight may be
  solved a block of rows at a time);
- end to end on a tiny Llama: the files read back with tensor types as planned, decoder tensors differ from
  ``--gguf-search imatrix``'s and the rest does not, nothing is left of the spill, the card says so, and
  llama.cpp (when installed) loads a file and gives a finite perplexity;
- refusals in one line: without --calib, with another method, an unknown value, a mixture of experts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
from gguf.constants import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as gg_dequantize  # noqa: E402

from mergequant.gguf.blocks import quantize_blocks  # noqa: E402
from mergequant.gguf.gptq_grid import gptq_kquant, importance_of, inverse_factor, row_blocks  # noqa: E402
from mergequant.gguf.kquants import K_LAYOUT, block_grid, put_codes  # noqa: E402

from helpers import cli  # noqa: E402

KQUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
MOE = Path("/work/shared/models/moe-mixtral/base")


def _weights(rows: int = 48, cols: int = 768, seed: int = 0) -> np.ndarray:
    """Gaussian rows of different scales, with the cases where a sub-block's step is 0 (all-zero sub-blocks and
    super-blocks, one huge weight next to tiny ones)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 0.1, (rows, 1))).astype(np.float32)
    w[1, :16] = 0
    w[2, 256:512] = 0
    w[3, 300] = 40.0
    w[4, :] = np.abs(w[4, :]) + 0.05  # positive only: the min is used
    return w


def _correlated_hessian(cols: int, seed: int = 1, tokens: int = 3000) -> torch.Tensor:
    """H = (2/n) X^T X (``HessianAccumulator``'s scaling) of inputs with strongly correlated, unevenly scaled
    columns, as a Linear's inputs are."""
    from mergequant.quant.gptq import HessianAccumulator

    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) * 0.5 + torch.randn(cols, cols, generator=g) / cols ** 0.5
    x = (torch.randn(tokens, cols, generator=g) @ mix) * torch.empty(cols).uniform_(0.2, 2.0, generator=g)
    acc = HessianAccumulator()
    acc.add(x)
    return acc.take()


def _deq(blocks: np.ndarray, qtype: str, shape) -> np.ndarray:
    return gg_dequantize(blocks, T[qtype]).reshape(shape).astype(np.float64)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("qtype", KQUANTS)
def test_block_grid_and_codes_reproduce_the_blocks(qtype, weighted):
    w = _weights()
    im = np.random.default_rng(3).gamma(0.5, size=w.shape[1]).astype(np.float32) if weighted else None
    blocks = quantize_blocks(w, qtype, im)
    step, offset, codes = block_grid(blocks, qtype)
    zero, cmax = K_LAYOUT[qtype][2], K_LAYOUT[qtype][3]
    assert codes.min() >= 0 and codes.max() <= cmax
    value = step * (codes - zero).astype(np.float32) - offset
    np.testing.assert_array_equal(value, gg_dequantize(blocks, T[qtype]).reshape(w.shape))
    again = np.ascontiguousarray(blocks).copy()
    again[:, :] = blocks
    put_codes(again, qtype, np.zeros_like(codes))
    assert not np.array_equal(again, blocks)  # the codes were overwritten...
    put_codes(again, qtype, codes)
    np.testing.assert_array_equal(again, blocks)  # ...and are written back exactly


@pytest.mark.parametrize("qtype", KQUANTS)
def test_diagonal_hessian_gives_the_importance_weighted_bytes(qtype):
    """No cross terms, no feedback: every column is rounded on the grid the search chose for the unchanged
    weights, which is what the search itself stores."""
    w = _weights()
    diag = torch.from_numpy(np.random.default_rng(2).gamma(0.7, size=w.shape[1]).astype(np.float32) + 1e-3)
    H = torch.diag(diag)
    imp = importance_of(H)
    ours = gptq_kquant(w, inverse_factor(H), qtype, imp)
    np.testing.assert_array_equal(ours, quantize_blocks(w, qtype, imp))


@pytest.mark.parametrize("qtype", KQUANTS)
def test_error_feedback_lowers_the_output_error(qtype):
    """tr((W - W_hat) H (W - W_hat)^T) -- the layer's output error on the calibration inputs -- with W_hat
    decoded by gguf-py: GPTQ in the grids well below the importance-weighted search (measured 0.56-0.63x; with
    the feedback only between super-blocks, none inside them, 0.70-0.74x: the bound tells the two apart)."""
    w = _weights(rows=64)
    H = _correlated_hessian(w.shape[1])
    imp = importance_of(H)
    Hd = H.double().numpy()

    def out_err(blocks):
        d = w.astype(np.float64) - _deq(blocks, qtype, w.shape)
        return float(np.einsum("ij,jk,ik->", d, Hd, d))

    gptq = out_err(gptq_kquant(w, inverse_factor(H), qtype, imp))
    search = out_err(quantize_blocks(w, qtype, imp))
    assert gptq < 0.68 * search, (gptq, search)


def test_rows_are_independent():
    """GPTQ treats rows separately given H: permuting rows (llama.cpp's q/k rotary order, applied when the
    writer reads them) before or after quantizing gives the same bytes, and H's column order is untouched."""
    w = _weights(rows=32)
    H = _correlated_hessian(w.shape[1], seed=5)
    V, imp = inverse_factor(H), importance_of(H)
    perm = np.random.default_rng(0).permutation(w.shape[0])
    whole = gptq_kquant(w, V, "Q3_K", imp)
    np.testing.assert_array_equal(gptq_kquant(w[perm], V, "Q3_K", imp), whole[perm])
    # solved a few rows at a time (what bounds the memory of a large weight): the same solution, up to the few
    # roundings a different summation order in the matrix products can flip
    blocks = row_blocks(w.shape[0], w.shape[1], nbytes=4 * w.shape[1] * 5)
    assert len(blocks) == 7 and blocks[-1] == (30, 32)
    parts = np.concatenate([gptq_kquant(w[a:b], V, "Q3_K", imp) for a, b in blocks])
    d_whole, d_parts = (w.astype(np.float64) - _deq(b, "Q3_K", w.shape) for b in (whole, parts))
    Hd = H.double().numpy()
    e_whole, e_parts = (float(np.einsum("ij,jk,ik->", d, Hd, d)) for d in (d_whole, d_parts))
    assert abs(e_parts / e_whole - 1) < 0.02 and np.mean(parts == whole) > 0.97, (e_parts, e_whole)


# ---- whole files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    src = Path("/work/shared/corpus/austen.txt")
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(src.read_text()[:60000] if src.is_file() else
                 "It is a truth universally acknowledged, that a single man in possession of a good fortune "
                 "must be in want of a wife. " * 400)
    return p


def _quantize(model: Path, out: Path, types: list[str], calib: Path, search: str):
    from mergequant.quant.quantize import QuantizeOptions, run_quantize

    opts = QuantizeOptions(out=out, method="gguf", gguf_types=types, calib=str(calib), samples=8, seqlen=128,
                           quiet=True, fsync=False, device="cpu")
    opts.gguf_search = search
    return run_quantize(model, opts, log=lambda m: None)


@pytest.mark.slow
def test_end_to_end_files_read_back_as_planned(dense_model, calib_text, tmp_path):
    from mergequant.checkpoint_formats import get_format
    from mergequant.gguf.writer import gguf_architecture
    from mergequant.io.checkpoint import Checkpoint

    types = ["Q2_K", "Q4_K_M"]
    out, ref = tmp_path / "gptq", tmp_path / "imatrix"
    _quantize(dense_model, out, types, calib_text, "gptq")
    _quantize(dense_model, ref, types, calib_text, "imatrix")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # no spill left
    card = (out / "README.md").read_text()
    assert "--gguf-search gptq" in card and "--gguf-search gptq" not in (ref / "README.md").read_text()

    ck = Checkpoint.open(dense_model)
    arch_name, permute = gguf_architecture(ck.config)
    planned = {p.name: p for p in get_format("gguf").plan(ck, arch_name, permute, types, has_imatrix=True)}
    name = dense_model.resolve().name
    for ft in types:
        got = {t.name: t for t in gguf.GGUFReader(out / f"{name}-{ft}.gguf").tensors}
        base = {t.name: t for t in gguf.GGUFReader(ref / f"{name}-{ft}.gguf").tensors}
        assert set(got) == set(planned)
        changed = 0
        for n, p in planned.items():
            assert got[n].tensor_type.name == p.types[ft], (ft, n)
            same = bytes(got[n].data) == bytes(base[n].data)
            if p.imatrix_key and p.types[ft] in KQUANTS:
                changed += not same
            else:  # norms, embedding, output: not the decoder Linears GPTQ rounds
                assert same, (ft, n)
        assert changed >= 0.9 * sum(1 for p in planned.values() if p.imatrix_key and p.types[ft] in KQUANTS), ft
        # and the decoded decoder weights stay close to the source (an error in the layout would not)
        w = gg_dequantize(got["blk.0.ffn_down.weight"].data, got["blk.0.ffn_down.weight"].tensor_type)
        src = planned["blk.0.ffn_down.weight"].read(0, planned["blk.0.ffn_down.weight"].rows)
        assert np.sqrt(((w.reshape(src.shape) - src) ** 2).mean() / (src ** 2).mean()) < 0.6

    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out / f"{name}-Q4_K_M.gguf"), logits_all=True, n_ctx=128, n_batch=128,
                          n_threads=2, verbose=False)
    toks = llm.tokenize(calib_text.read_bytes()[:4000], add_bos=True)[:128]
    llm.eval(toks)
    logits = np.asarray(llm.scores[:len(toks)], dtype=np.float64)
    lse = logits.max(1) + np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1))
    nll = lse[:-1] - logits[np.arange(len(toks) - 1), toks[1:]]
    ppl = float(np.exp(nll.mean()))
    assert np.isfinite(ppl) and 1 < ppl < 2048, ppl


def _one_line_error(r, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_gptq_search_needs_calib(dense_model, tmp_path):
    r = cli("quantize", dense_model, "-o", tmp_path / "o", "--method", "gguf", "--gguf-type", "Q4_K_M",
            "--gguf-search", "gptq")
    _one_line_error(r, "--gguf-search gptq", "--calib")
    assert not (tmp_path / "o").exists()


def test_gptq_search_is_for_gguf_only(dense_model, calib_text, tmp_path):
    r = cli("quantize", dense_model, "-o", tmp_path / "o", "--method", "gptq", "--calib", calib_text,
            "--gguf-search", "gptq")
    _one_line_error(r, "--gguf-search gptq", "--method gguf")
    assert not (tmp_path / "o").exists()


def test_unknown_search_is_refused(dense_model, calib_text, tmp_path):
    r = cli("quantize", dense_model, "-o", tmp_path / "o", "--method", "gguf", "--gguf-type", "Q4_K_M", "--calib",
            calib_text, "--gguf-search", "hessian")
    _one_line_error(r, "--gguf-search", "imatrix, gptq")


def test_mixture_of_experts_is_refused(calib_text, tmp_path):
    if not (MOE / "config.json").is_file():
        pytest.skip("the shared tiny Mixtral is not here")
    r = cli("quantize", MOE, "-o", tmp_path / "o", "--method", "gguf", "--gguf-type", "Q4_K_M", "--calib", calib_text,
            "--gguf-search", "gptq")
    _one_line_error(r, "mixture-of-experts")


def test_dry_run_says_gptq(dense_model, calib_text, tmp_path):
    r = cli("quantize", dense_model, "-o", tmp_path / "o", "--method", "gguf", "--gguf-type", "Q3_K_M", "--calib",
            calib_text, "--gguf-search", "gptq", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "k-quant search: gptq" in r.stdout and not (tmp_path / "o").exists()
    r = cli("quantize", dense_model, "-o", tmp_path / "o", "--method", "gguf", "--gguf-type", "Q3_K_M", "--calib",
            calib_text, "--dry-run")
    assert r.returncode == 0 and "k-quant search: gptq" not in r.stdout
