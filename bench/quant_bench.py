"""Quantization quality/speed benchmark on the shared tiny Llama: mergequant's methods vs GPTQModel.

One run does everything:

* builds a calibration text (first ``--calib-kb`` KB of austen.txt and of shakespeare.txt) and a
  disjoint held-out text (last ``--heldout-kb`` KB of each), cut at line boundaries;
* quantizes the model, each run in its own subprocess (wall time and peak RssAnon of the process tree
  are measured by polling /proc/PID/status):
  - mergequant RTN (``python -m mergequant quantize --method rtn``),
  - mergequant GPTQ with desc_act off and on,
  - GPTQModel GPTQ (Python API, inline script) with desc_act off and on, fed the *same* calibration
    token windows (built with ``mergequant.quant.calib.calibration_batch``, same seed),
  at 4 and 3 bits, group size 128, symmetric, damp 0.01, the same calibration batch for both;
  - then (``--extra``) mergequant AWQ w4g128, GPTQ 8-bit, int8 (bitsandbytes LLM.int8) and W8A8;
* evaluates every checkpoint (and the full-precision model) with ``mergequant.evaluate.evaluate_model``
  on the held-out text (windows of ``--eval-seqlen``): weight-only formats through the dequantizing
  loader, W8A8 through transformers + compressed-tensors (its activations are quantized at run time);
* prints a table and writes ``bench/results/quant-tiny.json``.

Usage: python bench/quant_bench.py [--samples 128] [--seqlen 256] [--bits 4 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import _status, _tree  # noqa: E402  (the same /proc process-tree polling)
MODEL = Path("/work/shared/models/base")
CORPUS = Path("/work/shared/corpus")
WORK = ROOT / "bench" / "work" / "quant"
RESULTS = ROOT / "bench" / "results"

GPTQMODEL_SCRIPT = r"""
import os, sys, json, time
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
t0 = time.time()
model_dir, calib, out, bits, gs, desc_act, samples, seqlen, seed, batch = sys.argv[1:11]
bits, gs, samples, seqlen, seed, batch = int(bits), int(gs), int(samples), int(seqlen), int(seed), int(batch)
desc_act = desc_act == "1"
from transformers import AutoTokenizer
from mergequant.quant.calib import calibration_batch
from gptqmodel import GPTQModel, QuantizeConfig
t_import = time.time() - t0
tok = AutoTokenizer.from_pretrained(model_dir)
windows = calibration_batch(calib, tok, samples=samples, seqlen=seqlen, seed=seed)
data = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in windows]
qcfg = QuantizeConfig(bits=bits, group_size=gs, desc_act=desc_act, sym=True, damp_percent=0.01,
                      act_group_aware=False)
model = GPTQModel.load(model_dir, qcfg, device="cpu")
t1 = time.time()
model.quantize(data, batch_size=batch)
t_quant = time.time() - t1
import shutil
shutil.rmtree(out, ignore_errors=True)
model.save(out)
print("GPTQMODEL_TIMES " + json.dumps({"import_s": t_import, "quantize_s": t_quant, "total_s": time.time() - t0}))
"""


# ----------------------------------------------------------------------------------------------- data

def _cut_head(text: str, nbytes: int) -> str:
    head = text[:nbytes]
    return head[: head.rfind("\n") + 1] if "\n" in head else head


def _cut_tail(text: str, nbytes: int) -> str:
    tail = text[-nbytes:]
    return tail[tail.find("\n") + 1:] if "\n" in tail else tail


def build_data(calib_kb: int, heldout_kb: int) -> tuple[Path, Path, dict]:
    WORK.mkdir(parents=True, exist_ok=True)
    calib_parts, held_parts, info = [], [], {}
    for name in ("austen.txt", "shakespeare.txt"):
        text = (CORPUS / name).read_text(encoding="utf-8")
        head, tail = _cut_head(text, calib_kb * 1000), _cut_tail(text, heldout_kb * 1000)
        head_end, tail_start = len(head), len(text) - len(tail)
        if head_end > tail_start:
            raise SystemExit(f"{name}: calibration ({calib_kb} KB) and held-out ({heldout_kb} KB) overlap")
        info[name] = {"chars": len(text), "calib_chars": [0, head_end], "heldout_chars": [tail_start, len(text)]}
        calib_parts.append(head)
        held_parts.append(tail)
    calib, held = WORK / "calib.txt", WORK / "heldout.txt"
    calib.write_text("\n\n".join(calib_parts), encoding="utf-8")
    held.write_text("\n\n".join(held_parts), encoding="utf-8")
    return calib, held, info


# --------------------------------------------------------------------------------------- measurement

def _rss_anon_kb(pid: int) -> int:
    return _status(pid).get("RssAnon", 0) // 1024


def run_measured(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run ``cmd``; return wall seconds, CPU seconds (user + system of the process and every child it
    waited for: on a shared machine the wall time depends on the other load, the CPU time much less),
    peak RssAnon (MiB, summed over the process tree) and stdout."""
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, cwd=ROOT)
    peak = 0
    done = threading.Event()

    def poll():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(_rss_anon_kb(p) for p in _tree(proc.pid)))
            time.sleep(0.02)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    output = proc.communicate()[0]
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    done.set()
    th.join()
    if log:
        log.write_text(output)
    if proc.returncode:
        print(output[-4000:], file=sys.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_anon_mib": round(peak / 1024, 1), "stdout": output}


def evaluate(path: Path, heldout: Path, seqlen: int, backend: str = "dequant") -> dict:
    from mergequant.evaluate import evaluate_model

    # One evaluator for every weight-only checkpoint (ours and GPTQModel's): the dequantizing loader,
    # float32. W8A8 also quantizes activations at run time, which only its client does: it is
    # evaluated through transformers + compressed-tensors (when installed).
    r = evaluate_model(str(path), str(heldout), seqlen=seqlen, device="cpu", progress=False, backend=backend)
    return {"perplexity": round(r.perplexity, 4), "nll": round(r.nll, 6), "tokens": r.tokens, "eval_backend": r.backend}


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--calib-kb", type=int, default=300)
    ap.add_argument("--heldout-kb", type=int, default=100)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32, help="calibration windows per forward, both tools")
    ap.add_argument("--extra", nargs="*", default=["awq", "gptq8", "int8", "w8a8"],
                    help="rows beyond RTN/GPTQ at --bits: awq (w4, --group-size), gptq8, int8, w8a8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="quantize runs per config; the fastest is reported")
    ap.add_argument("--skip-gptqmodel", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "quant-tiny.json")
    args = ap.parse_args()

    import torch
    import transformers

    import mergequant

    torch.set_num_threads(os.cpu_count() or 1)
    calib, heldout, data_info = build_data(args.calib_kb, args.heldout_kb)
    gptqmodel_version = None
    if not args.skip_gptqmodel:
        from importlib.metadata import version
        gptqmodel_version = version("gptqmodel")

    rows = []
    t = time.perf_counter()
    fp = evaluate(MODEL, heldout, args.eval_seqlen)
    print(f"fp: ppl {fp['perplexity']:.3f} ({time.perf_counter() - t:.1f} s eval)", flush=True)
    rows.append({"name": "fp (bf16)", "tool": "-", "bits": 16, "desc_act": None, **fp})

    gs = args.group_size
    configs = []  # (method, tool, bits, desc_act)
    for bits in args.bits:
        configs += [("rtn", "mergequant", bits, False), ("gptq", "mergequant", bits, False),
                    ("gptq", "mergequant", bits, True)]
        if not args.skip_gptqmodel:
            configs += [("gptq", "gptqmodel", bits, False), ("gptq", "gptqmodel", bits, True)]
    extra = {"awq": ("awq", 4), "gptq8": ("gptq", 8), "int8": ("int8", 8), "w8a8": ("w8a8", 8)}
    configs += [(extra[e][0], "mergequant", extra[e][1], False) for e in args.extra]
    import importlib.util
    for method, tool, bits, desc_act in configs:
        grouped = method in ("rtn", "gptq", "awq")
        tag = f"{tool}-{method}-w{bits}" + (f"g{gs}" if grouped else "") + ("-act" if desc_act else "")
        out = WORK / tag
        shutil.rmtree(out, ignore_errors=True)
        if tool == "mergequant":
            cmd = [sys.executable, "-m", "mergequant", "quantize", str(MODEL), "-o", str(out), "--method", method,
                   "--bits", str(bits), "--group-size", str(gs), "--damp", "0.01", "--samples", str(args.samples),
                   "--seqlen", str(args.seqlen), "--seed", str(args.seed), "--device", "cpu", "--quiet", "--force",
                   "--batch-size", str(args.batch_size)]
            if method in ("gptq", "awq", "w8a8"):
                cmd += ["--calib", str(calib)]
            if desc_act:
                cmd.append("--desc-act")
            runs = [run_measured(cmd, log=WORK / f"{tag}.log") for _ in range(args.repeats)]
            extra_info = {}
        else:
            cmd = [sys.executable, "-c", GPTQMODEL_SCRIPT, str(MODEL), str(calib), str(out), str(bits), str(gs),
                   "1" if desc_act else "0", str(args.samples), str(args.seqlen), str(args.seed), str(args.batch_size)]
            runs = [run_measured(cmd, env={"GPTQMODEL_CPU_WORKERS": "2"}, log=WORK / f"{tag}.log")
                    for _ in range(args.repeats)]
            times = []
            for r in runs:
                line = [ln for ln in r["stdout"].splitlines() if ln.startswith("GPTQMODEL_TIMES ")]
                times.append(json.loads(line[-1].split(" ", 1)[1]) if line else None)
            extra_info = {"gptqmodel_internal_times": times}
        for r in runs:
            r.pop("stdout")
        best = min(runs, key=lambda r: r["wall_s"])
        meas = {"wall_s": best["wall_s"], "peak_rss_anon_mib": best["peak_rss_anon_mib"],
                "runs": [{"wall_s": r["wall_s"], "peak_rss_anon_mib": r["peak_rss_anon_mib"]} for r in runs]}
        backend = "transformers" if method == "w8a8" and importlib.util.find_spec("compressed_tensors") else "dequant"
        ev = evaluate(out, heldout, args.eval_seqlen, backend)
        row = {"name": tag, "tool": tool, "method": method, "bits": bits, "group_size": gs if grouped else None,
               "desc_act": desc_act, **ev, **meas, **extra_info}
        rows.append(row)
        print(f"{tag}: ppl {ev['perplexity']:.3f} ({ev['eval_backend']})  wall {meas['wall_s']:.1f} s  peak RssAnon "
              f"{meas['peak_rss_anon_mib']:.0f} MiB", flush=True)

    # comparisons
    by = {r["name"]: r for r in rows}
    comparisons = []
    for bits in args.bits:
        for act in (False, True):
            sfx = f"-w{bits}g{gs}" + ("-act" if act else "")
            ours, rtn = by.get(f"mergequant-gptq{sfx}"), by.get(f"mergequant-rtn-w{bits}g{gs}")
            theirs = by.get(f"gptqmodel-gptq{sfx}")
            c = {"bits": bits, "desc_act": act, "ours_ppl": ours["perplexity"], "rtn_ppl": rtn["perplexity"],
                 "better_than_rtn": ours["perplexity"] < rtn["perplexity"]}
            if theirs:
                c.update({"gptqmodel_ppl": theirs["perplexity"],
                          "ppl_ratio_ours_over_gptqmodel": round(ours["perplexity"] / theirs["perplexity"], 4),
                          "within_1pct_or_better": ours["perplexity"] <= theirs["perplexity"] * 1.01,
                          "speedup_wall": round(theirs["wall_s"] / ours["wall_s"], 2),
                          "rss_ratio_gptqmodel_over_ours": round(theirs["peak_rss_anon_mib"] / ours["peak_rss_anon_mib"], 2)})
            comparisons.append(c)
    fp_ppl = rows[0]["perplexity"]
    if f"mergequant-awq-w4g{gs}" in by and f"mergequant-gptq-w4g{gs}" in by:
        awq, gq = by[f"mergequant-awq-w4g{gs}"], by[f"mergequant-gptq-w4g{gs}"]
        comparisons.append({"awq_ppl": awq["perplexity"], "gptq_ppl": gq["perplexity"],
                            "awq_le_gptq": awq["perplexity"] <= gq["perplexity"],
                            "awq_lt_rtn": awq["perplexity"] < by[f"mergequant-rtn-w4g{gs}"]["perplexity"]})
    for name in (f"mergequant-gptq-w8g{gs}", "mergequant-int8-w8", "mergequant-w8a8-w8"):
        if name in by:
            comparisons.append({"row": name, "ppl": by[name]["perplexity"], "fp_ppl": fp_ppl,
                                "ratio_to_fp": round(by[name]["perplexity"] / fp_ppl, 5),
                                "within_1pct_of_fp": by[name]["perplexity"] <= fp_ppl * 1.01})

    print()
    hdr = f"{'config':34s} {'ppl':>9s} {'wall s':>8s} {'RssAnon MiB':>12s}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        w = f"{r['wall_s']:.1f}" if "wall_s" in r else "-"
        m = f"{r['peak_rss_anon_mib']:.0f}" if "peak_rss_anon_mib" in r else "-"
        print(f"{r['name']:34s} {r['perplexity']:9.3f} {w:>8s} {m:>12s}")
    print()
    for c in comparisons:
        print(json.dumps(c))

    result = {
        "benchmark": "quant-tiny",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {"mergequant": getattr(mergequant, "__version__", None), "torch": torch.__version__,
                     "transformers": transformers.__version__, "gptqmodel": gptqmodel_version},
        "model": str(MODEL),
        "settings": {"calibration": f"first {args.calib_kb} KB of austen.txt + first {args.calib_kb} KB of shakespeare.txt",
                     "heldout": f"last {args.heldout_kb} KB of austen.txt + last {args.heldout_kb} KB of shakespeare.txt",
                     "data_ranges": data_info, "samples": args.samples, "seqlen": args.seqlen, "seed": args.seed,
                     "eval_seqlen": args.eval_seqlen, "group_size": gs, "sym": True, "damp": 0.01,
                     "batch_size": args.batch_size, "gptqmodel_act_group_aware": False,
                     "device": "cpu", "threads": torch.get_num_threads(),
                     "evaluation": "mergequant.evaluate.evaluate_model: dequantizing loader (float32) for weight-only "
                                   "checkpoints; W8A8 through transformers + compressed-tensors (activation quantization)",
                     "repeats": args.repeats,
                     "timing": "fastest of `repeats` runs; wall time of the whole subprocess (interpreter start, imports, calibration, quantize, "
                               "save); peak RssAnon summed over the subprocess tree, polled every 20 ms "
                               "(reported for the fastest run; every run is listed under rows[].runs). The last run's "
                               "checkpoint is the one evaluated"},
        "rows": rows,
        "comparisons": comparisons,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
