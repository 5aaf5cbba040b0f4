"""GGUF benchmark (issue 14): our k-quants against llama.cpp's own tools, quality and speed.

Needs llama.cpp's command-line tools, built once from the llama.cpp source vendored in the
llama-cpp-python 0.3.36 sdist by ``bash scripts/build-llama-tools.sh`` (into
``~/.cache/mergequant/llama-tools/``: ``bin/llama-quantize``, ``bin/llama-imatrix``,
``bin/llama-perplexity`` and ``src/convert_hf_to_gguf.py``).

Quality (``--part quality``), on the shared tiny Llama ``/work/shared/models/base``:

* data: ``bench/quant_bench.py``'s split (``build_data``): calibration = first ``--calib-kb`` KB of
  austen.txt + shakespeare.txt, held-out = last ``--heldout-kb`` KB of each (disjoint);
* our files: ``mergequant quantize --method gguf`` writes F32 + F16, then every ``--types`` file
  without ``--calib`` (one pass), then with ``--calib calib.txt --samples N --seqlen S --seed 0``;
* llama.cpp's files: ``llama-quantize`` of *our F16 file* to each type, without and with
  ``--imatrix``; the matrix comes from ``llama-imatrix`` run on our F16 file over the *same token
  windows* our ``--calib`` draws (``mergequant.quant.calib.calibration_batch``, same N, S and seed):
  the windows are decoded to text end to end (``calib-windows.txt``), which llama.cpp re-tokenizes and
  cuts into ``--chunks N`` chunks of ``-c S`` tokens (N x S tokens both, the same text up to a few
  tokens of re-tokenization at window seams; llama.cpp puts BOS at each chunk start when the
  vocabulary asks for it);
* byte identity: each of our uncalibrated files against ``llama-quantize`` of our F32 file (tensor
  types and bytes, every tensor; the assertion of the issue) and, reported, against the F16-sourced one;
* every file's held-out perplexity in llama.cpp: ``llama-perplexity -f heldout.txt -c CTX`` (its
  "Final estimate"; it scores the second half of each CTX-token chunk), the same CTX for all;
  without the tool, llama-cpp-python's ``Llama(logits_all=True)`` over the same chunks;
* the importance matrices themselves: ours (``collect_imatrix``, in-process) against llama-imatrix's,
  per tensor (cosine of the vectors, ratio of their means);
* ``ours --calib, refined``: the same with ``MERGEQUANT_GGUF_REFINE=1`` (the opt-in refinement of the
  importance-weighted search in ``mergequant/gguf/imatrix.py``; ``--no-refine`` leaves these rows out);
* ``ours --calib --gguf-search gptq``: the same calibration with GPTQ error feedback inside the k-quant grids
  (``mergequant/gguf/gptq_grid.py``; dense models only; ``--no-gptq`` leaves these rows out);
* the tiny Mixtral ``/work/shared/models/moe-mixtral/base`` (if present): the same rows (without the
  refined ones unless asked): our files without and with ``--calib`` (per-expert importance from each
  expert's routed tokens, ``mergequant/gguf/moe_imatrix.py``) against llama-quantize of our F16 without
  and with llama-imatrix's matrix (its routed ``MUL_MAT_ID`` statistics, same windows); the matrices are
  compared per tensor (stacked expert tensors as E x cols vectors) and per expert (routed-token counts).
  ``--only-moe`` runs just this model and replaces the ``moe`` entry of an existing results file, keeping
  the dense rows.

Files whose every tensor (type and bytes) equals an already measured one are not measured twice (the
llama-quantize rows that equal ours); perplexities are cached in ``bench/work/gguf/ppl-cache.json`` by
file content, so an interrupted run resumes cheaply.

Speed (``--part speed``): the synthetic ~1.1B Llama of ``bench/merge_bench.py --size 1b`` (built
and cached under ``bench/work/models/1b-L22/base`` by ``bench/quant_1b.build_base``) to Q4_K_M:
ours (``mergequant quantize --method gguf --gguf-type Q4_K_M``, one process) against llama.cpp's
``convert_hf_to_gguf.py --outtype f16`` followed by ``llama-quantize ... Q4_K_M 2``. Wall time, CPU
time (user + system of the process tree) and peak RssAnon (summed over the process tree, polled every
20 ms) of each process (``quant_bench.run_measured``); llama.cpp's pair is summed (times) / maxed
(memory). The converter refuses tokenizers whose pre-tokenizer hash it does not know (ours is a
byte-level BPE trained for the demo): it is run through a 3-line wrapper that answers its hash lookup
with ``gpt-2`` (what our own writer reads from the tokenizer), the conversion is otherwise untouched.
Runs alternate (ours, theirs, ours, ...) ``--repeats`` times; the fastest of each is reported.

Usage::

    bash scripts/build-llama-tools.sh
    python bench/gguf_bench.py                       # both parts (~25 min on a loaded 2-core machine)
    python bench/gguf_bench.py --part quality        # -> bench/results/gguf-quality.json
    python bench/gguf_bench.py --part quality --only-moe --no-refine   # the Mixtral rows only (~15 min)
    python bench/gguf_bench.py --part speed          # -> bench/results/gguf-speed-1b.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from quant_bench import build_data, run_measured  # noqa: E402

BASE = Path("/work/shared/models/base")
MOE = Path("/work/shared/models/moe-mixtral/base")
TOOLS = Path(os.environ.get("MERGEQUANT_LLAMA_TOOLS", Path.home() / ".cache" / "mergequant" / "llama-tools"))
WORK = ROOT / "bench" / "work" / "gguf"
RESULTS = ROOT / "bench" / "results"
TYPES = ["Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K"]

CONVERT_WRAPPER = r"""
import runpy, sys
src = sys.argv.pop(1)
sys.path.insert(0, src)
sys.argv[0] = src + "/convert_hf_to_gguf.py"
import conversion.base as cb  # llama.cpp's converter package (vendored next to the script)
cb.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"  # our demo BPE's hash is not in its table
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def tool(name: str) -> Path | None:
    p = TOOLS / "bin" / name
    return p if p.is_file() and os.access(p, os.X_OK) else None


def mq(*args: str) -> list[str]:
    return [sys.executable, "-m", "mergequant", "quantize", *args]


def measured(cmd, log: Path, env=None) -> dict:
    r = run_measured([str(c) for c in cmd], env=env, log=log)
    r.pop("stdout")
    return r


# -------------------------------------------------------------------------------------- GGUF helpers

def gguf_tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    import gguf

    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, bytes(np.ascontiguousarray(t.data).view(np.uint8))) for t in r.tensors}


def compare(ours: Path, ref: Path) -> dict:
    a, b = gguf_tensors(ours), gguf_tensors(ref)
    same = [n for n in a if n in b and a[n] == b[n]]
    diff = sorted(set(a) ^ set(b)) + [n for n in a if n in b and a[n] != b[n]]
    return {"tensors": len(a), "identical": len(same), "differ": diff[:10], "n_differ": len(diff),
            "all_identical": not diff and len(a) == len(b)}


def _file_key(p: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(1 << 24):
            h.update(b)
    return h.hexdigest()[:32]


def perplexity(model: Path, heldout: Path, ctx: int, threads: int, log: Path) -> dict:
    """Held-out perplexity of ``model`` in llama.cpp; cached in WORK/ppl-cache.json by the file's and the
    held-out text's SHA-256 and the context (a rerun after an interruption measures only what is new)."""
    cache_file = WORK / "ppl-cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    key = f"{_file_key(model)}|{_file_key(heldout)}|{ctx}"
    if key in cache:
        return cache[key]
    r = _perplexity(model, heldout, ctx, threads, log)
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    cache[key] = r
    cache_file.write_text(json.dumps(cache, indent=1))
    return r


def _perplexity(model: Path, heldout: Path, ctx: int, threads: int, log: Path) -> dict:
    exe = tool("llama-perplexity")
    if exe is not None:
        for _attempt in range(5):  # llama.cpp logs from a thread: rarely the last lines are lost at exit
            r = measured([exe, "-m", model, "-f", heldout, "-c", ctx, "-b", ctx, "-t", threads, "--no-warmup"], log)
            text = log.read_text()
            m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
            if m:
                break
        else:  # still lost: the running estimate after the LAST chunk equals the final one; a partial one does not
            last = re.findall(r"\[(\d+)\]([0-9.]+)", text)
            total = re.search(r"calculating perplexity over (\d+) chunks", text)
            if not last or not total or int(last[-1][0]) != int(total.group(1)):
                raise SystemExit(f"no complete perplexity in {log} (final line lost in 5 runs)")
            return {"ppl": float(last[-1][1]), "ppl_err": None, "chunks": int(last[-1][0]),
                    "evaluator": "llama-perplexity (running estimate after the last chunk; final line lost)",
                    "eval_wall_s": r["wall_s"]}
        chunks = re.search(r"calculating perplexity over (\d+) chunks", text)
        return {"ppl": float(m.group(1)), "ppl_err": float(m.group(2)), "chunks": int(chunks.group(1)) if chunks else None,
                "evaluator": "llama-perplexity", "eval_wall_s": r["wall_s"]}
    return _perplexity_llama_cpp_python(model, heldout, ctx, threads)


def _perplexity_llama_cpp_python(model: Path, heldout: Path, ctx: int, threads: int) -> dict:
    """The same measure as llama-perplexity (BOS-led chunks of ctx tokens, the second half of each scored)
    through llama-cpp-python, when the tool could not be built."""
    from llama_cpp import Llama

    llm = Llama(str(model), n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=threads, verbose=False)
    toks = llm.tokenize(heldout.read_bytes(), add_bos=False, special=False)
    bos = llm.token_bos()
    nll, n = 0.0, 0
    for c in range(len(toks) // ctx):
        chunk = list(toks[c * ctx:(c + 1) * ctx])
        if llm.metadata.get("tokenizer.ggml.add_bos_token", "true") == "true":
            chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:ctx], dtype=np.float64)
        for i in range(ctx // 2, ctx - 1):
            row = logits[i]
            lse = row.max() + np.log(np.exp(row - row.max()).sum())
            nll += lse - row[chunk[i + 1]]
            n += 1
    return {"ppl": float(np.exp(nll / n)), "ppl_err": None, "chunks": len(toks) // ctx, "evaluator": "llama-cpp-python"}


def read_llama_imatrix(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """llama-imatrix's GGUF output: ``NAME.in_sum2`` (sum of squares per column, [E, cols] for a stacked
    expert tensor) and ``NAME.counts`` (tokens, one per expert), read as llama-quantize's loader reads it:
    each row divided by its own count, a row of ones where the count is 0. Returns (GGUF name -> flat
    vector, GGUF name -> counts)."""
    import gguf

    r = gguf.GGUFReader(path)
    t = {x.name: np.asarray(x.data, dtype=np.float64).reshape(-1) for x in r.tensors}
    out, counts = {}, {}
    for name, s in t.items():
        if name.endswith(".in_sum2"):
            base = name[: -len(".in_sum2")]
            cnt = t.get(base + ".counts", np.ones(1))
            rows = s.reshape(cnt.size, -1)
            out[base] = np.where(cnt[:, None] > 0, rows / np.maximum(cnt[:, None], 1), 1.0).reshape(-1)
            counts[base] = cnt
    return out, counts


def our_imatrix(model: Path, calib: Path, samples: int, seqlen: int, seed: int
                ) -> tuple[dict[str, np.ndarray], dict[int, list[int]]]:
    """The matrix ``--calib`` uses as llama.cpp's quantizer takes it (GGUF tensor name -> vector; a stacked
    expert tensor's E x cols, expert-major), and for a MoE model the tokens routed to each expert per layer."""
    from types import SimpleNamespace

    from mergequant.gguf.driver import collect_imatrix
    from mergequant.gguf.moe_imatrix import gguf_vectors
    from mergequant.gguf.writer import gguf_architecture, plan_tensors
    from mergequant.io.checkpoint import Checkpoint
    from mergequant.merge.moe_layout import per_expert_view

    ck = per_expert_view(Checkpoint.open(model))
    opts = SimpleNamespace(calib=str(calib), samples=samples, seqlen=seqlen, seed=seed, batch_size=None, device="cpu",
                           method="gguf")
    routing: dict[int, list[int]] = {}
    im, _ = collect_imatrix(model, ck, opts, print, routing=routing)
    vectors = gguf_vectors(im, plan_tensors(ck, *gguf_architecture(ck.config)))
    return {k: np.asarray(v, dtype=np.float64) for k, v in vectors.items()}, routing


def compare_routing(ours: dict[int, list[int]], llama_counts: dict[str, np.ndarray]) -> dict:
    """Tokens per expert, ours (``--calib``) against llama-imatrix's counts of ``blk.N.ffn_gate_exps``."""
    rows = {}
    for layer, mine in sorted(ours.items()):
        theirs = llama_counts.get(f"blk.{layer}.ffn_gate_exps.weight")
        if theirs is None:
            continue
        a, b = np.asarray(mine, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
        rows[layer] = {"ours": [int(x) for x in a], "llama_imatrix": [int(x) for x in b],
                       "share_l1_difference": round(float(np.abs(a / a.sum() - b / b.sum()).sum()), 4),
                       "ours_empty": [int(e) for e in np.flatnonzero(a == 0)],
                       "llama_empty": [int(e) for e in np.flatnonzero(b == 0)]}
    return rows


def compare_imatrices(ours: dict, theirs: dict) -> dict:
    rows = {}
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name], theirs[name]
        if a.shape != b.shape:
            rows[name] = {"shape_mismatch": [a.size, b.size]}
            continue
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
        rows[name] = {"cosine": round(cos, 5), "mean_ratio_ours_over_llama": round(float(a.mean() / b.mean()), 4)}
    cos = [r["cosine"] for r in rows.values() if "cosine" in r]
    return {"tensors_compared": len(cos), "only_ours": sorted(set(ours) - set(theirs))[:5],
            "only_llama": sorted(set(theirs) - set(ours))[:5], "min_cosine": min(cos) if cos else None,
            "mean_cosine": round(float(np.mean(cos)), 5) if cos else None, "per_tensor": rows}


def calib_windows_text(model: Path, calib: Path, samples: int, seqlen: int, seed: int, out: Path) -> dict:
    """Our --calib token windows, decoded end to end, for llama-imatrix."""
    from mergequant.quant.calib import calibration_batch, load_tokenizer

    tok = load_tokenizer(model, "bench")
    ids = calibration_batch(str(calib), tok, samples=samples, seqlen=seqlen, seed=seed)
    text = tok.decode(ids.reshape(-1).tolist(), skip_special_tokens=True)
    out.write_text(text, encoding="utf-8")
    retok = len(tok(text, add_special_tokens=False)["input_ids"])
    return {"windows": samples, "seqlen": seqlen, "tokens": int(ids.numel()), "retokenized_tokens": retok,
            "chars": len(text)}


# --------------------------------------------------------------------------------------------- quality

def quality_model(model: Path, label: str, types: list[str], data: dict, args, calib_ok: bool) -> dict:
    work = WORK / label
    work.mkdir(parents=True, exist_ok=True)
    quant, imat = tool("llama-quantize"), tool("llama-imatrix")
    stem = model.resolve().name
    ctx, thr = args.ctx, str(args.threads)
    timings = {}

    def ours(tag: str, gtypes: list[str], extra: list[str], env: dict | None = None) -> Path:
        out = work / tag
        cmd = mq(str(model), "-o", str(out), "--method", "gguf", "--force", "--quiet", "--device", "cpu")
        for t in gtypes:
            cmd += ["--gguf-type", t]
        timings[tag] = measured(cmd + extra, work / f"{tag}.log", env=env)
        print(f"[{label}] {tag}: {timings[tag]['wall_s']:.1f} s wall, {timings[tag]['cpu_s']:.1f} s CPU", flush=True)
        return out

    float_dir = ours("ours-float", ["F32", "F16"], [])
    f32, f16 = float_dir / f"{stem}-F32.gguf", float_dir / f"{stem}-F16.gguf"
    plain = ours("ours", types, [])
    calib_args = ["--calib", str(data["calib"]), "--samples", str(args.samples), "--seqlen", str(args.seqlen),
                  "--seed", str(args.seed)]
    cal = ours("ours-calib", types, calib_args) if calib_ok else None
    refined = ours("ours-calib-refine", types, calib_args, {"MERGEQUANT_GGUF_REFINE": "1"}) \
        if calib_ok and args.refine and (label != "moe-mixtral" or args.moe_refine) else None
    gptq = ours("ours-calib-gptq", types, calib_args + ["--gguf-search", "gptq"]) \
        if calib_ok and args.gptq and label != "moe-mixtral" else None

    rows = [{"model": label, "type": "F16", "variant": "reference (our F16 file)", "file": str(f16)}]
    identity, imatrix_info = {}, {}
    llama_im = None
    if imat is not None and calib_ok:
        wtxt = work / "calib-windows.txt"
        imatrix_info["windows"] = calib_windows_text(model, data["calib"], args.samples, args.seqlen, args.seed, wtxt)
        llama_im = work / "llama-imatrix.gguf"
        r = measured([imat, "-m", f16, "-f", wtxt, "-o", llama_im, "-c", args.seqlen, "-b", args.seqlen,
                      "--chunks", args.samples, "-t", thr, "--no-ppl"], work / "llama-imatrix.log")
        timings["llama-imatrix"] = r
        m = re.search(r"computing over (\d+) chunks", (work / "llama-imatrix.log").read_text())
        imatrix_info["llama_imatrix_chunks"] = int(m.group(1)) if m else None
        theirs, their_counts = read_llama_imatrix(llama_im)
        if calib_ok:
            mine, routing = our_imatrix(model, data["calib"], args.samples, args.seqlen, args.seed)
            imatrix_info["ours_vs_llama"] = compare_imatrices(mine, theirs)
            if routing:
                imatrix_info["expert_tokens_ours_vs_llama"] = compare_routing(routing, their_counts)
            print(f"[{label}] imatrix cosine ours vs llama: mean {imatrix_info['ours_vs_llama']['mean_cosine']}, "
                  f"min {imatrix_info['ours_vs_llama']['min_cosine']}", flush=True)

    for t in types:
        mine = plain / f"{stem}-{t}.gguf"
        rows.append({"model": label, "type": t, "variant": "ours", "file": str(mine)})
        if cal is not None:
            rows.append({"model": label, "type": t, "variant": "ours --calib", "file": str(cal / f"{stem}-{t}.gguf")})
        if refined is not None:
            rows.append({"model": label, "type": t, "variant": "ours --calib, refined", "file": str(refined / f"{stem}-{t}.gguf")})
        if gptq is not None:
            rows.append({"model": label, "type": t, "variant": "ours --calib --gguf-search gptq",
                         "file": str(gptq / f"{stem}-{t}.gguf")})
        if quant is None:
            continue
        ref32, ref16 = work / f"llama-from-f32-{t}.gguf", work / f"llama-{t}.gguf"
        measured([quant, f32, ref32, t, thr], work / f"llama-quantize-f32-{t}.log")
        timings[f"llama-quantize-{t}"] = measured([quant, f16, ref16, t, thr], work / f"llama-quantize-{t}.log")
        identity[t] = {"vs_llama_quantize_of_f32": compare(mine, ref32), "vs_llama_quantize_of_f16": compare(mine, ref16)}
        ok = identity[t]["vs_llama_quantize_of_f32"]["all_identical"]
        print(f"[{label}] {t}: ours == llama-quantize(F32): {ok}; == llama-quantize(F16): "
              f"{identity[t]['vs_llama_quantize_of_f16']['all_identical']}", flush=True)
        if not ok and not args.no_assert:
            raise SystemExit(f"{label} {t}: our file differs from llama-quantize of our F32 file: {identity[t]}")
        rows.append({"model": label, "type": t, "variant": "llama-quantize (our F16)", "file": str(ref16),
                     "same_tensors_as": "ours" if identity[t]["vs_llama_quantize_of_f16"]["all_identical"] else None})
        if llama_im is not None:
            refim = work / f"llama-imatrix-{t}.gguf"
            timings[f"llama-quantize-imatrix-{t}"] = measured([quant, "--imatrix", llama_im, f16, refim, t, thr],
                                                              work / f"llama-quantize-imatrix-{t}.log")
            rows.append({"model": label, "type": t, "variant": "llama-quantize --imatrix", "file": str(refim)})

    for r in rows:
        p = Path(r.pop("file"))
        twin = r.pop("same_tensors_as", None)
        if twin:  # every tensor's type and bytes equal: the same model for llama.cpp, not measured twice
            src = next(x for x in rows if x["type"] == r["type"] and x["variant"] == twin)
            r.update({k: src[k] for k in ("ppl", "ppl_err", "chunks", "evaluator")}, ppl_from=twin)
        else:
            r.update(perplexity(p, data["heldout"], ctx, args.threads, work / f"ppl-{p.parent.name}-{p.stem}.log"))
        r["size_mib"] = round(p.stat().st_size / 2**20, 3)
        print(f"[{label}] {r['type']:7s} {r['variant']:28s} ppl {r['ppl']:.4f}", flush=True)
    for k in timings:
        timings[k] = {x: timings[k][x] for x in ("wall_s", "cpu_s", "peak_rss_anon_mib")}
    return {"model": str(model), "rows": rows, "identity": identity, "imatrix": imatrix_info, "timings": timings}


def _vs_llama_imatrix(c: dict, t: str, ppl: float, ref: float, ppl_key: str, ratio_key: str, flag: str) -> None:
    """One of our calibrated rows against llama-quantize with llama-imatrix's matrix, into ``c``: its
    perplexity, the ratio, within x1.005, and (Q3_K_M, Q2_K) whether it is better (the issue's targets)."""
    c.update({ppl_key: ppl, ratio_key: round(ppl / ref, 5), f"{flag}within_x1.005": ppl <= ref * 1.005})
    if t in ("Q3_K_M", "Q2_K"):
        c[f"{flag}better_than_llama_imatrix"] = ppl < ref


def targets(res: dict, types: list[str]) -> list[dict]:
    out = []
    by = {(r["type"], r["variant"]): r["ppl"] for r in res["rows"]}
    for t in types:
        c = {"model": res["model"], "type": t}
        ident = res["identity"].get(t, {}).get("vs_llama_quantize_of_f32", {})
        c["no_calib_identical_bytes"] = ident.get("all_identical")
        ours_c, ref_im = by.get((t, "ours --calib")), by.get((t, "llama-quantize --imatrix"))
        if ref_im is None:
            out.append(c)
            continue
        if ours_c is not None:
            c["llama_imatrix_ppl"] = ref_im
            _vs_llama_imatrix(c, t, ours_c, ref_im, "ours_calib_ppl", "ratio_ours_over_llama_imatrix", "")
        ours_r = by.get((t, "ours --calib, refined"))
        if ours_r is not None:
            _vs_llama_imatrix(c, t, ours_r, ref_im, "ours_refined_ppl", "ratio_refined_over_llama_imatrix", "refined_")
        ours_g = by.get((t, "ours --calib --gguf-search gptq"))
        if ours_g is not None:
            _vs_llama_imatrix(c, t, ours_g, ref_im, "ours_gptq_ppl", "ratio_gptq_over_llama_imatrix", "gptq_")
            if ours_c is not None:
                c["ratio_gptq_over_ours_calib"] = round(ours_g / ours_c, 5)
        out.append(c)
    return out


def run_quality(args) -> dict:
    calib, heldout, info = build_data(args.calib_kb, args.heldout_kb)
    WORK.mkdir(parents=True, exist_ok=True)
    data = {"calib": WORK / "calib.txt", "heldout": WORK / "heldout.txt"}
    shutil.copyfile(calib, data["calib"])
    shutil.copyfile(heldout, data["heldout"])
    results = {}
    if not args.only_moe:
        results["base"] = quality_model(BASE, "base", args.types, data, args, calib_ok=True)
        results["base"]["targets"] = targets(results["base"], args.types)
    if MOE.is_dir() and not args.skip_moe:
        results["moe"] = quality_model(MOE, "moe-mixtral", args.types, data, args, calib_ok=True)
        results["moe"]["targets"] = targets(results["moe"], args.types)
    results["data"] = {"calibration": f"first {args.calib_kb} KB of austen.txt + shakespeare.txt (quant_bench.build_data)",
                       "heldout": f"last {args.heldout_kb} KB of austen.txt + shakespeare.txt", "ranges": info,
                       "calib_windows": f"{args.samples} x {args.seqlen} tokens, seed {args.seed}",
                       "ppl_ctx": args.ctx}
    return results


def print_quality(res: dict) -> None:
    for key in ("base", "moe"):
        if key not in res:
            continue
        rows = res[key]["rows"]
        f16 = next(r["ppl"] for r in rows if r["type"] == "F16")
        print(f"\n{res[key]['model']} (held-out perplexity in llama.cpp, -c {res['data']['ppl_ctx']})")
        hdr = f"{'type':8s} {'variant':28s} {'ppl':>9s} {'+/-':>7s} {'vs F16':>8s} {'MiB':>7s}"
        print(hdr + "\n" + "-" * len(hdr))
        for r in rows:
            err = f"{r['ppl_err']:.3f}" if r.get("ppl_err") is not None else "-"
            print(f"{r['type']:8s} {r['variant']:28s} {r['ppl']:9.4f} {err:>7s} {100 * (r['ppl'] / f16 - 1):+7.2f}% "
                  f"{r['size_mib']:7.2f}")
        for c in res[key]["targets"]:
            print(json.dumps(c))


# ----------------------------------------------------------------------------------------------- speed

def run_speed(args) -> dict:
    import quant_1b

    model = quant_1b.build_base(args.layers, print)
    work = WORK / "speed"
    work.mkdir(parents=True, exist_ok=True)
    quant = tool("llama-quantize")
    conv = TOOLS / "src" / "convert_hf_to_gguf.py"
    wrapper = work / "convert_wrapper.py"
    wrapper.write_text(CONVERT_WRAPPER)
    ours_runs, theirs_runs = [], []
    for rep in range(args.repeats):
        out = work / "ours"
        r = measured(mq(str(model), "-o", str(out), "--method", "gguf", "--gguf-type", "Q4_K_M", "--force", "--quiet",
                        "--device", "cpu"), work / f"ours-{rep}.log")
        ours_runs.append(r)
        print(f"speed ours: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, {r['peak_rss_anon_mib']:.0f} MiB", flush=True)
        if quant is None or not conv.is_file():
            continue
        f16 = work / "llama-f16.gguf"
        c = measured([sys.executable, wrapper, str(TOOLS / "src"), model, "--outtype", "f16", "--outfile", f16],
                     work / f"convert-{rep}.log")
        q = measured([quant, f16, work / "llama-Q4_K_M.gguf", "Q4_K_M", str(args.threads)], work / f"quantize-{rep}.log")
        theirs_runs.append({"convert": c, "quantize": q, "wall_s": round(c["wall_s"] + q["wall_s"], 2),
                            "cpu_s": round(c["cpu_s"] + q["cpu_s"], 2),
                            "peak_rss_anon_mib": max(c["peak_rss_anon_mib"], q["peak_rss_anon_mib"])})
        t = theirs_runs[-1]
        print(f"speed llama.cpp: convert {c['wall_s']:.1f} s + quantize {q['wall_s']:.1f} s wall, "
              f"{t['cpu_s']:.1f} s CPU, peak {t['peak_rss_anon_mib']:.0f} MiB", flush=True)
    best_o = min(ours_runs, key=lambda r: r["wall_s"])
    res = {"model": str(model), "params": _params(model), "ours": best_o, "ours_runs": ours_runs}
    ours_file = work / "ours" / f"{model.resolve().name}-Q4_K_M.gguf"
    res["ours_file_mib"] = round(ours_file.stat().st_size / 2**20, 1)
    if theirs_runs:
        best_t = min(theirs_runs, key=lambda r: r["wall_s"])
        res.update({"llama_cpp": best_t, "llama_cpp_runs": theirs_runs,
                    "llama_file_mib": round((work / "llama-Q4_K_M.gguf").stat().st_size / 2**20, 1),
                    "ratio_wall_llama_over_ours": round(best_t["wall_s"] / best_o["wall_s"], 3),
                    "ratio_cpu_llama_over_ours": round(best_t["cpu_s"] / best_o["cpu_s"], 3),
                    "targets": {"at_least_as_fast_wall": best_o["wall_s"] <= best_t["wall_s"],
                                "ours_peak_rss_anon_under_1GiB": best_o["peak_rss_anon_mib"] < 1024}})
        cmpd = compare(ours_file, work / "llama-Q4_K_M.gguf")
        res["ours_vs_llama_tensors"] = {k: cmpd[k] for k in ("tensors", "identical", "n_differ", "differ")}
    return res


def _params(model: Path) -> int:
    from mergequant.io.checkpoint import Checkpoint

    ck = Checkpoint.open(model)
    return int(sum(int(np.prod(ck.tensors[n].shape)) for n in ck.tensors))


def print_speed(res: dict) -> None:
    print(f"\n{res['model']} ({res['params'] / 1e9:.2f}B params) -> Q4_K_M")
    hdr = f"{'tool':44s} {'wall s':>8s} {'CPU s':>8s} {'peak RssAnon MiB':>17s}"
    print(hdr + "\n" + "-" * len(hdr))
    o = res["ours"]
    print(f"{'mergequant quantize --method gguf':44s} {o['wall_s']:8.1f} {o['cpu_s']:8.1f} {o['peak_rss_anon_mib']:17.0f}")
    if "llama_cpp" in res:
        t = res["llama_cpp"]
        for k, name in (("convert", "  convert_hf_to_gguf.py --outtype f16"), ("quantize", "  llama-quantize Q4_K_M")):
            print(f"{name:44s} {t[k]['wall_s']:8.1f} {t[k]['cpu_s']:8.1f} {t[k]['peak_rss_anon_mib']:17.0f}")
        print(f"{'llama.cpp total':44s} {t['wall_s']:8.1f} {t['cpu_s']:8.1f} {t['peak_rss_anon_mib']:17.0f}")
        print(f"ratio llama.cpp / ours: wall {res['ratio_wall_llama_over_ours']}, CPU {res['ratio_cpu_llama_over_ours']}")
        print(json.dumps(res["targets"]))


# ------------------------------------------------------------------------------------------------ main

def _meta(args) -> dict:
    from importlib.metadata import version

    import mergequant

    v = {"mergequant": getattr(mergequant, "__version__", None), "numba": version("numba"), "gguf": version("gguf")}
    try:
        v["llama_cpp_python"] = version("llama-cpp-python")
    except Exception:  # noqa: BLE001
        v["llama_cpp_python"] = None
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "loadavg_at_start": os.getloadavg()},
            "versions": v, "llama_tools": {n: str(tool(n)) for n in ("llama-quantize", "llama-imatrix", "llama-perplexity")},
            "llama_cpp_source": "vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist (scripts/build-llama-tools.sh; "
                                "-DGGML_NATIVE=OFF, Release)",
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["quality", "speed", "all"], default="all")
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--samples", type=int, default=128, help="calibration windows (ours) = llama-imatrix --chunks")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration window (ours) = llama-imatrix -c")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-kb", type=int, default=300)
    ap.add_argument("--heldout-kb", type=int, default=100)
    ap.add_argument("--ctx", type=int, default=512, help="llama-perplexity -c (the same for every file)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=22, help="speed: layers of the synthetic 1.1B Llama")
    ap.add_argument("--repeats", type=int, default=1, help="speed: runs per tool (alternating); the fastest is reported")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--only-moe", action="store_true",
                    help="quality: only the MoE model; its entry replaces the 'moe' one of an existing results file")
    ap.add_argument("--moe-refine", action="store_true", help="also the 'refined' rows for the MoE model")
    ap.add_argument("--no-refine", dest="refine", action="store_false",
                    help="leave out the 'ours --calib, refined' rows (MERGEQUANT_GGUF_REFINE=1)")
    ap.add_argument("--no-gptq", dest="gptq", action="store_false",
                    help="leave out the 'ours --calib --gguf-search gptq' rows (dense models only)")
    ap.add_argument("--no-assert", action="store_true", help="report, do not stop, when uncalibrated bytes differ")
    args = ap.parse_args()
    if tool("llama-quantize") is None:
        print(f"warning: llama.cpp tools not found in {TOOLS}/bin (bash scripts/build-llama-tools.sh); "
              "only our own rows are measured", file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.part in ("quality", "all"):
        q = run_quality(args)
        print_quality(q)
        out = RESULTS / "gguf-quality.json"
        if args.only_moe and out.is_file():  # keep the dense rows (and their run's metadata)
            old = json.loads(out.read_text())
            old["moe"], old["moe_run"] = q["moe"], {**_meta(args), "data": q["data"]}
            out.write_text(json.dumps(old, indent=2) + "\n")
        else:
            new = {"benchmark": "gguf-quality", **_meta(args), **q}
            if args.skip_moe and out.is_file():  # keep the MoE rows of the previous run (and that run's metadata)
                old = json.loads(out.read_text())
                if "moe" in old:
                    new["moe"] = old["moe"]
                    new["moe_run"] = old.get("moe_run") or {k: old[k] for k in ("date", "machine", "versions", "args",
                                                                                 "data") if k in old}
            out.write_text(json.dumps(new, indent=2) + "\n")
        print(f"wrote {out}")
    if args.part in ("speed", "all"):
        s = run_speed(args)
        print_speed(s)
        out = RESULTS / f"gguf-speed-1b-L{args.layers}.json"
        out.write_text(json.dumps({"benchmark": "gguf-speed", **_meta(args), **s}, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
