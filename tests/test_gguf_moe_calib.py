"""``--method gguf --calib`` on mixture-of-experts models (issue 14): per-expert importance with llama.cpp's
semantics (``mergequant/gguf/moe_imatrix.py``).

- the collected matrix equals an independent float64 computation: transformers' own forward of a tiny
  random Mixtral / Qwen2-MoE / Qwen3-MoE, routing recomputed by hand from the router's weights (top-k of
  its logits), each expert's gate/up/down inputs built from its routed tokens only; routers and
  ``shared_expert_gate`` get nothing;
- our files equal ``llama_model_quantize`` given the same per-expert matrix (E x cols per stacked tensor,
  expert-major), Q4_K_M and Q3_K_M, on a tiny random Mixtral (every expert tensor a k-quant) and on the
  shared tiny Mixtral (expert ``ffn_down`` on the 32-weight types);
- the shared Mixtral's calibrated Q4_K_M loads in llama-cpp-python with a finite perplexity close to F32;
- an expert the router never chooses: count 0, a row of ones (llama.cpp's loader), said in the log and
  the card, and the bytes equal ``llama-quantize --imatrix`` fed llama-imatrix's own file format with a
  zero count for that expert (when the tool is built: scripts/build-llama-tools.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mergequant.gguf.moe_imatrix import gguf_vectors  # noqa: E402

BASE = Path("/work/shared/models/base")
MIXTRAL = Path("/work/shared/models/moe-mixtral/base")
CORPUS = Path("/work/shared/corpus")
TOOLS = Path(os.environ.get("MERGEQUANT_LLAMA_TOOLS", Path.home() / ".cache" / "mergequant" / "llama-tools"))
STARVED = 5  # the expert of layer 0 of the random Mixtral that no token reaches


def _text() -> str:
    if CORPUS.is_dir():
        return (CORPUS / "shakespeare.txt").read_text(encoding="utf-8")[:60000]
    return "To be, or not to be, that is the question. " * 1500


def _tokenizer_into(d: Path) -> None:
    if not (BASE / "tokenizer.json").is_file():
        pytest.skip("the shared tiny Llama's tokenizer is not here")
    shutil.copy(BASE / "tokenizer.json", d / "tokenizer.json")
    shutil.copy(BASE / "tokenizer_config.json", d / "tokenizer_config.json")


def _starve(router: torch.Tensor, expert: int, gen: torch.Generator) -> None:
    """Router rows that never pick ``expert`` under top-2: rows 0/1 = v/-v and 2/3 = u/-u give every token
    two strictly positive logits, and ``expert``'s zero row a logit of 0."""
    v, u = torch.randn(2, router.shape[1], generator=gen, dtype=router.dtype)
    router[0], router[1], router[2], router[3] = v, -v, u, -u
    router[expert] = 0


def _mixtral(d: Path, hidden: int = 256, inter: int = 256, experts: int = 6, starve: bool = True) -> Path:
    """A tiny random float32 Mixtral (2 layers, top-2); layer 0's router never picks expert STARVED."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2,
                        max_position_embeddings=512, bos_token_id=0, eos_token_id=1, initializer_range=0.1,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    m = MixtralForCausalLM(cfg)
    if starve:
        with torch.no_grad():
            _starve(m.model.layers[0].mlp.gate.weight, STARVED, torch.Generator().manual_seed(1))
    m.save_pretrained(d)
    _tokenizer_into(d)
    return d


def _qwen_moe(d: Path, kind: str, hidden: int = 64, inter: int = 48) -> Path:
    """A tiny random float32 Qwen2-MoE (shared expert and its gate) or Qwen3-MoE."""
    if kind == "qwen2_moe":
        from transformers import Qwen2MoeConfig as C, Qwen2MoeForCausalLM as M

        extra = {"shared_expert_intermediate_size": 2 * inter, "norm_topk_prob": False}
    else:
        from transformers import Qwen3MoeConfig as C, Qwen3MoeForCausalLM as M

        extra = {"norm_topk_prob": True, "head_dim": 16}
    cfg = C(vocab_size=2048, hidden_size=hidden, intermediate_size=96, moe_intermediate_size=inter, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
            max_position_embeddings=512, bos_token_id=0, eos_token_id=1, initializer_range=0.1,
            tie_word_embeddings=False, **extra)
    torch.manual_seed(2)
    M(cfg).save_pretrained(d)
    _tokenizer_into(d)
    return d


def _opts(tmp: Path, samples: int = 4, seqlen: int = 64):
    from mergequant.quant.quantize import QuantizeOptions

    calib = tmp / "calib.txt"
    calib.write_text(_text(), encoding="utf-8")
    return QuantizeOptions(out=tmp / "out", method="gguf", calib=str(calib), samples=samples, seqlen=seqlen)


def _run_gguf(model: Path, tmp: Path):
    """``run_gguf`` with --calib (8 x 128 tokens) writing F32 and Q4_K_M into ``tmp/out``: (result, options, log)."""
    from mergequant.gguf.driver import run_gguf

    opts = _opts(tmp, samples=8, seqlen=128)
    opts.gguf_types, opts.quiet, opts.fsync = ["F32", "Q4_K_M"], True, False
    logs: list[str] = []
    return run_gguf(model, opts, log=logs.append), opts, logs


def _collect(model: Path, opts):
    from mergequant.gguf.driver import collect_imatrix
    from mergequant.io.checkpoint import Checkpoint

    ck = Checkpoint.open(model)
    logs: list[str] = []
    routing: dict[int, list[int]] = {}
    imatrix, _ = collect_imatrix(model, ck, opts, logs.append, routing=routing)
    return ck, imatrix, routing, logs


# ---- 1. the collected matrix against an independent float64 computation ---------------------------------

def _reference(model: Path, ids: torch.Tensor, arch) -> tuple[dict[str, np.ndarray], dict[int, list[int]]]:
    """Per module (names on disk) the mean over its tokens of each input column's square, and per layer
    the tokens routed to each expert: transformers' float64 forward, routing and expert inputs by hand."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64, experts_implementation="eager")
    hf.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    routed: dict[int, list[int]] = {}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        sums[name] = sums.get(name, 0) + (x * x).sum(0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    hooks = []
    for i, layer in enumerate(hf.model.layers):
        prefix = f"model.layers.{i}."
        for rel in arch.quantized:  # attention, a shared expert: plain Linears
            mod = layer.get_submodule(rel)
            hooks.append(mod.register_forward_pre_hook(lambda m, a, n=prefix + arch.to_disk(rel): add(n, a[0])))
        block = layer.mlp

        def moe_inputs(m, a, i=i, prefix=prefix, block=block):
            h = a[0].reshape(-1, a[0].shape[-1])
            logits = h @ block.gate.weight.T  # float64: the router's top-k, recomputed
            top = torch.topk(logits, arch_top_k, dim=-1).indices
            gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
            inter = down.shape[-1]
            routed[i] = [int((top == e).any(-1).sum()) for e in range(gate_up.shape[0])]
            for e in range(gate_up.shape[0]):
                xe = h[(top == e).any(-1)]
                g, u = xe @ gate_up[e, :inter].T, xe @ gate_up[e, inter:].T
                for part, x in ((0, xe), (1, xe), (2, torch.nn.functional.silu(g) * u)):
                    add(prefix + arch.experts.expert_weight(e, part)[: -len(".weight")], x)

        hooks.append(block.register_forward_pre_hook(moe_inputs))
    arch_top_k = int(hf.config.num_experts_per_tok)
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for h in hooks:
            h.remove()
    out = {n: (s / counts[n]).numpy() if counts[n] else np.ones(s.shape) for n, s in sums.items()}  # ones: llama.cpp
    return out, routed


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_per_expert_importance_equals_an_independent_float64_computation(kind, tmp_path):
    from mergequant.architectures import architecture_for
    from mergequant.quant.quantize import _calibration_ids

    model = _mixtral(tmp_path / "m", hidden=64, inter=96) if kind == "mixtral" else _qwen_moe(tmp_path / "m", kind)
    opts = _opts(tmp_path)
    ck, ours, routing, logs = _collect(model, opts)
    arch = architecture_for(ck.config)
    ids = _calibration_ids(model, ck, opts)
    want, routed = _reference(model, ids, arch)

    assert routing == routed, f"routed tokens per expert: ours {routing}, transformers' router {routed}"
    assert all(sum(c) == 2 * ids.numel() for c in routing.values())  # top-2: every token counted twice
    assert sorted(ours) == sorted(want), sorted(set(ours) ^ set(want))[:6]
    assert not [k for k in ours if k.endswith((".gate", "shared_expert_gate"))]  # routers: not quantized
    worst = max(float(np.max(np.abs(ours[k] - want[k]) / (np.abs(want[k]) + 1e-3 * np.abs(want[k]).max())))
                for k in want)
    assert worst < 1e-4, f"largest relative difference {worst:.3g}"
    # the experts' rows really are per expert (all-token statistics would make every gate/up row equal)
    e0 = ours[f"model.layers.1.{arch.experts.expert_weight(0, 0)[:-7]}"]
    e1 = ours[f"model.layers.1.{arch.experts.expert_weight(1, 0)[:-7]}"]
    assert not np.allclose(e0, e1, rtol=1e-3)
    assert any(line.startswith("layer 0: routed tokens per expert") for line in logs)
    if kind == "mixtral":
        assert routing[0][STARVED] == 0 and all(c > 0 for c in routing[1])


# ---- 2. bytes: llama.cpp's quantizer given the same per-expert matrix -----------------------------------

def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama.cpp not installed (bash scripts/install-llama-cpp.sh)")


def _llama_quantize(src: Path, dst: Path, file_type: str, vectors: dict[str, np.ndarray]) -> None:
    """llama.cpp's ``llama_model_quantize`` with an importance matrix (GGUF name -> float32 vector): the driver
    of tests/test_gguf_llama_cpp.py, imported once llama.cpp is known to be installed."""
    _llama_cpp()
    from test_gguf_llama_cpp import llama_quantize

    llama_quantize(src, dst, file_type, vectors)


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    import gguf

    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, bytes(np.ascontiguousarray(t.data).view(np.uint8))) for t in r.tensors}


def _differences(ours: Path, ref: Path, label: str) -> list[str]:
    a, b = _tensors(ours), _tensors(ref)
    assert set(a) == set(b), label
    return [f"{label} {n} ({b[n][0]})" + (f" type {a[n][0]}" if a[n][0] != b[n][0] else ": bytes differ")
            for n in b if a[n] != b[n]]


@pytest.fixture(scope="module")
def shared_mixtral():
    if not (MIXTRAL / "config.json").is_file():
        pytest.skip("the shared tiny Mixtral is not here")
    return MIXTRAL


@pytest.mark.slow
@pytest.mark.client
@pytest.mark.parametrize("which", ["random", "shared", "qwen2_moe", "qwen3_moe"])
def test_moe_calib_files_equal_llama_quantize_with_the_same_per_expert_matrix(which, tmp_path, request):
    """``random``: every expert tensor a k-quant, one expert without tokens (its row of ones); ``shared``:
    the trained Mixtral, expert ffn_down on the 32-weight types; Qwen2-MoE adds the shared expert."""
    _llama_cpp()
    from mergequant.gguf.writer import gguf_architecture, plan_tensors, write_gguf

    if which in ("random", "shared"):
        model = _mixtral(tmp_path / "m") if which == "random" else request.getfixturevalue("shared_mixtral")
    else:
        model = _qwen_moe(tmp_path / "m", which, hidden=256, inter=256)
    ck, imatrix, routing, _ = _collect(model, _opts(tmp_path, samples=8, seqlen=128))
    vectors = gguf_vectors(imatrix, plan_tensors(ck, *gguf_architecture(ck.config)))
    exps = [n for n in vectors if "_exps." in n]
    assert len(exps) == 3 * ck.config["num_hidden_layers"]
    if which == "qwen2_moe":
        assert len([n for n in vectors if "_shexp." in n]) == 3 * ck.config["num_hidden_layers"]
    n_exp, cols = ck.config.get("num_local_experts") or ck.config["num_experts"], ck.config["hidden_size"]
    assert vectors["blk.0.ffn_gate_exps.weight"].shape == (n_exp * cols,)  # E x cols, expert-major
    types = ["Q4_K_M", "Q3_K_M"]
    ours = write_gguf(model, tmp_path, ["F32", *types], imatrix=imatrix, ck=ck, fsync=False)
    (tmp_path / "plain").mkdir()
    plain = write_gguf(model, tmp_path / "plain", types, ck=ck, fsync=False)
    bad = []
    for ft in types:
        ref = tmp_path / f"ref-{ft}.gguf"
        _llama_quantize(ours.files["F32"], ref, ft, vectors)
        bad += _differences(ours.files[ft], ref, ft)
        # the matrix changed the expert tensors (so the comparison above is about the per-expert rows)
        assert _tensors(plain.files[ft])["blk.1.ffn_up_exps.weight"] != _tensors(ours.files[ft])["blk.1.ffn_up_exps.weight"]
    assert not bad, "; ".join(bad[:12])
    # and each expert's row matters: the same rows in another expert order give other bytes in llama.cpp
    shuffled = dict(vectors)
    v = vectors["blk.1.ffn_up_exps.weight"].reshape(n_exp, cols)
    shuffled["blk.1.ffn_up_exps.weight"] = np.roll(v, 1, axis=0).reshape(-1)
    _llama_quantize(ours.files["F32"], tmp_path / "rolled.gguf", "Q4_K_M", shuffled)
    assert _tensors(tmp_path / "rolled.gguf")["blk.1.ffn_up_exps.weight"] != _tensors(ours.files["Q4_K_M"])["blk.1.ffn_up_exps.weight"]


# ---- 3. the calibrated file in llama.cpp ----------------------------------------------------------------

def _perplexity(path: Path, ids: list[int], ctx: int = 256) -> float:
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=ctx, n_batch=ctx, n_threads=2, verbose=False)
    nll, n = 0.0, 0
    for c in range(len(ids) // ctx):
        chunk = ids[c * ctx:(c + 1) * ctx]
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:ctx], dtype=np.float64)
        m = logits.max(-1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))[:-1]
        nll += float((lse - logits[np.arange(ctx - 1), chunk[1:]]).sum())
        n += ctx - 1
    return float(np.exp(nll / n))


@pytest.mark.slow
@pytest.mark.client
def test_calibrated_moe_file_loads_in_llama_cpp_with_finite_perplexity(shared_mixtral, tmp_path):
    _llama_cpp()
    from transformers import AutoTokenizer

    res, opts, logs = _run_gguf(shared_mixtral, tmp_path)
    files = {p.name.rsplit("-", 1)[1][:-5]: p for p in res.files}
    heldout = (CORPUS / "austen.txt").read_text(encoding="utf-8")[-30000:] if CORPUS.is_dir() else _text()[-30000:]
    ids = AutoTokenizer.from_pretrained(shared_mixtral)(heldout).input_ids[:1024]
    ppl_q, ppl_f = _perplexity(files["Q4_K_M"], ids), _perplexity(files["F32"], ids)
    assert np.isfinite(ppl_q) and 1 < ppl_q < 1.1 * ppl_f, (ppl_q, ppl_f)
    assert sum(line.startswith("layer ") and "routed tokens per expert" in line for line in logs) == 4
    card = (opts.out / "README.md").read_text()
    assert "## Mixture of experts" in card and "importance matrix from" in card


# ---- 4. an expert no token reaches -------------------------------------------------------------------------

def _imatrix_file(path: Path, ck, imatrix: dict, routing: dict[int, list[int]]) -> None:
    """Our matrix in llama-imatrix's own file format (``NAME.in_sum2`` [E, cols], ``NAME.counts`` [E]): each
    expert's mean with count 1, and for an expert without tokens zeros with count 0, as llama-imatrix
    leaves it -- what the quantizer's loader makes of that is llama.cpp's rule under test."""
    import gguf

    from mergequant.gguf.writer import plan_tensors

    w = gguf.GGUFWriter(path, "imatrix")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["calib.txt"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 128)
    for name, vec in sorted(gguf_vectors(imatrix, plan_tensors(ck, "llama", True)).items()):
        if "_exps." in name:
            layer = int(name.split(".")[1])
            counts = np.asarray(routing[layer], dtype=np.float32)
            rows = vec.reshape(len(counts), -1).copy()
            rows[counts == 0] = 0.0
            counts = np.minimum(counts, 1.0)
        else:
            rows, counts = vec.reshape(1, -1), np.ones(1, dtype=np.float32)
        w.add_tensor(f"{name}.in_sum2", rows.astype(np.float32))
        w.add_tensor(f"{name}.counts", counts.reshape(-1, 1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow
def test_expert_without_tokens_gets_llama_cpp_row_of_ones_and_is_reported(tmp_path):
    model = _mixtral(tmp_path / "m")
    ck, imatrix, routing, logs = _collect(model, _opts(tmp_path, samples=8, seqlen=128))
    assert routing[0][STARVED] == 0 and all(c > 0 for e, c in enumerate(routing[0]) if e != STARVED)
    for part in ("w1", "w3", "w2"):
        row = imatrix[f"model.layers.0.block_sparse_moe.experts.{STARVED}.{part}"]
        assert np.all(row == 1.0), part
        assert not np.all(imatrix[f"model.layers.0.block_sparse_moe.experts.0.{part}"] == 1.0)
    line = next(x for x in logs if x.startswith("layer 0:"))
    assert f"expert(s) {STARVED} got no tokens" in line and "importance 1" in line
    assert "got no tokens" not in next(x for x in logs if x.startswith("layer 1:"))

    res, opts, logs2 = _run_gguf(model, tmp_path)
    assert any(f"expert(s) {STARVED} got no tokens" in x for x in logs2)
    card = (opts.out / "README.md").read_text()
    assert f"| 0 | {' '.join(map(str, routing[0]))} | {STARVED} |" in card
    assert "importance 1 for every column" in card

    exe = TOOLS / "bin" / "llama-quantize"
    if not exe.is_file():
        pytest.skip("llama-quantize not built (bash scripts/build-llama-tools.sh)")
    files = {p.name.rsplit("-", 1)[1][:-5]: p for p in res.files}
    im = tmp_path / "imatrix.gguf"
    _imatrix_file(im, ck, imatrix, routing)
    ref = tmp_path / "ref-Q4_K_M.gguf"
    r = subprocess.run([str(exe), "--imatrix", str(im), str(files["F32"]), str(ref), "Q4_K_M", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    bad = _differences(files["Q4_K_M"], ref, "Q4_K_M")
    assert not bad, "; ".join(bad[:12])
