"""MoE quantization quality/speed benchmark on the shared tiny Mixtral: mergequant vs GPTQModel 7.7.

The conventions of ``bench/quant_bench.py`` (whose helpers this script imports):

* the same calibration text (first ``--calib-kb`` KB of austen.txt and of shakespeare.txt) and the
  same disjoint held-out text (last ``--heldout-kb`` KB of each), cut at line boundaries;
* every quantization runs in its own subprocess; wall time and peak RssAnon of the process tree are
  measured by polling /proc/PID/status every 20 ms (``quant_bench.run_measured``);
* both tools get the *same* calibration token windows (``mergequant.quant.calib.calibration_batch``,
  same seed) and the same batch (windows per forward);
* every checkpoint, GPTQModel's included, is scored by the same function
  (``mergequant.evaluate.evaluate_model``, ``backend="dequant"``: our dequantizing loader, float32)
  over the WHOLE held-out text in windows of ``--eval-seqlen``; the fp row is the bf16 model through
  transformers (computing in float32 on a CPU without bfloat16 instructions, as ``mergequant eval`` does).

Rows (w4g128, symmetric, damp 0.01, desc_act off, GPTQModel's act_group_aware off):

* fp (bf16);
* mergequant RTN;
* mergequant GPTQ ``--moe-calibration all`` (every expert's statistics from every token, layer output
  routed) and GPTQModel GPTQ with ``moe=MoEConfig(routing=ExpertsRoutingBypass())`` (its "routing
  bypass": all calibration data forwarded to every expert), run back to back;
* mergequant GPTQ ``--moe-calibration all --calib-dtype bfloat16`` (calibration forward in bfloat16, the
  precision GPTQModel calibrates in; leave it out with ``--no-bf16``; left out on a CPU without bfloat16
  instructions, where it would be emulated);
* mergequant GPTQ ``--moe-calibration routed`` (starved experts: round-to-nearest) and GPTQModel GPTQ
  with natural routing (no ``moe`` option; its default ``fallback``: RTN for a module reached by
  < 0.5% of the calibration tokens), run back to back.
* GPTQModel computes in bfloat16 on every CPU (its ``auto_dtype``). On a CPU without bfloat16 instructions
  that is emulated (its bypass run: 190 s there, against 57 s with ``dtype=torch.float32``), so there both
  GPTQModel rows also run with ``dtype=torch.float32`` (rows ending ``-fp32``, ``--gptqmodel-float32``):
  the speed-ups against those are the fair ones on such a CPU.

Besides the whole-process wall time (the headline), each row reports the time "beyond imports": wall time
minus the run's fixed start-up (interpreter start and imports: each run measures its own imports:
GPTQModel's driver script (torch, transformers, gptqmodel), and ``OURS_SCRIPT``, which imports what our run
imports (torch, tokenizers and mergequant's modules: our runner builds the Llama-shaped families in plain
torch, ``mergequant.quant.native``, so it never imports transformers' modeling code), prints the time and
then runs mergequant's CLI ``main()`` in the same process).

Writes ``bench/results/moe-tiny.json`` (``moe-tiny-avx2.json`` on a CPU without bfloat16 instructions). Usage: python bench/moe_bench.py [--samples 128] [--seqlen 256]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))  # this checkout's mergequant, whatever is installed
import merge_bench  # noqa: E402  (source digest)
import quant_bench  # noqa: E402  (data cuts, measured subprocesses, evaluation: the dense benchmark's helpers)
from quant_bench import evaluate, run_measured  # noqa: E402

SHARED = Path(os.environ.get("MERGEQUANT_SHARED", "/work/shared"))
MODEL = SHARED / "models" / "moe-mixtral" / "base"
WORK = ROOT / "bench" / "work" / "moe"
RESULTS = ROOT / "bench" / "results"

# GPTQModel, as quant_bench runs it, plus the MoE routing option. ``routing``: "bypass" ->
# QuantizeConfig(moe=MoEConfig(routing=ExpertsRoutingBypass())); "natural" -> no moe option.
GPTQMODEL_SCRIPT = r"""
import os, sys, json, time
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
t0 = time.time()
model_dir, calib, out, bits, gs, routing, samples, seqlen, seed, batch, dtype = sys.argv[1:12]
bits, gs, samples, seqlen, seed, batch = int(bits), int(gs), int(samples), int(seqlen), int(seed), int(batch)
from transformers import AutoTokenizer
from mergequant.quant.calib import calibration_batch
from gptqmodel import GPTQModel, QuantizeConfig
from gptqmodel.quantization.config import ExpertsRoutingBypass, MoEConfig
t_import = time.time() - t0
tok = AutoTokenizer.from_pretrained(model_dir)
windows = calibration_batch(calib, tok, samples=samples, seqlen=seqlen, seed=seed)
data = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in windows]
moe = {"bypass": MoEConfig(routing=ExpertsRoutingBypass()), "natural": None}[routing]
qcfg = QuantizeConfig(bits=bits, group_size=gs, desc_act=False, sym=True, damp_percent=0.01,
                      act_group_aware=False, moe=moe)
print("GPTQMODEL_CONFIG " + json.dumps({"moe": repr(qcfg.moe), "fallback": repr(qcfg.fallback)}))
import torch
# "auto": GPTQModel's own choice (bfloat16 on every CPU); "float32": asked for explicitly
model = GPTQModel.load(model_dir, qcfg, device="cpu", **({"dtype": torch.float32} if dtype == "float32" else {}))
t1 = time.time()
model.quantize(data, batch_size=batch)
t_quant = time.time() - t1
import shutil
shutil.rmtree(out, ignore_errors=True)
model.save(out)
print("GPTQMODEL_TIMES " + json.dumps({"import_s": t_import, "quantize_s": t_quant, "total_s": time.time() - t0}))
"""

# `mergequant quantize ...` as `python -m mergequant` runs it (the same main(), the same OpenMP setting, which
# must be in the environment before torch loads), after importing up front what the run imports (the CLI and
# the quantizer; for a calibrated run also the runner, its native Mixtral and the tokenizer) and reporting how long
# that took: the
# fixed start-up cost, measured in the run itself as GPTQModel's script measures its own.
OURS_SCRIPT = r"""
import os, sys, time, json
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
t0 = time.time()
import mergequant.cli, mergequant.quant.quantize, mergequant.quant.gptq_method
if "--calib" in sys.argv:  # a calibrated run: the layer runner, its plain-torch Mixtral, the tokenizer
    import mergequant.quant.runner, mergequant.quant.native, mergequant.quant.fast_tokenizer, tokenizers
print("MERGEQUANT_TIMES " + json.dumps({"import_s": time.time() - t0}), flush=True)
sys.argv = ["mergequant"] + sys.argv[1:]
mergequant.cli.main()
"""

ROUTING_LINE = re.compile(r"layer (\d+): routed tokens per expert \((\d+) tokens, (\w+) calibration\): ([0-9:, ]+)"
                          r"(?:; round-to-nearest for starved expert\(s\) ([0-9, ]+))?")


def _ours_routing(log: str) -> dict:
    """Per layer: routed tokens per expert, and the experts that fell back to RTN (from our log)."""
    layers = {}
    for m in ROUTING_LINE.finditer(log):
        counts = [int(p.split(":")[1]) for p in m.group(4).split(", ")]
        fell = [int(x) for x in m.group(5).split(", ")] if m.group(5) else []
        layers[int(m.group(1))] = {"tokens_per_expert": counts, "rtn_fallback_experts": fell}
    return layers


def _gptqmodel_log(out: Path) -> dict:
    """GPTQModel's quant_log.csv: per module, the samples it saw; modules it did not GPTQ-solve."""
    path = out / "quant_log.csv"
    if not path.exists():
        return {}
    rows = list(csv.DictReader(path.open()))
    experts: dict[str, dict[str, int]] = {}
    for r in rows:
        m = re.match(r"mlp\.experts\.(\d+)\.(\w+)", r["module"])
        if m:
            experts.setdefault(r["layer"], {})[f"{m.group(1)}.{m.group(2)}"] = int(float(r["samples"] or 0))
    # a module's loss column holds a number for a GPTQ solve; anything else (e.g. a fallback marker) is kept
    special = [{k: r[k] for k in ("layer", "module", "loss", "samples")} for r in rows
               if not re.fullmatch(r"[0-9.eE+-]+", (r.get("loss") or "").strip())]
    return {"modules_logged": len(rows), "expert_samples_per_layer": experts, "non_numeric_loss_rows": special}


def code_state() -> dict:
    """The mergequant code measured: HEAD, whether mergequant/ has uncommitted changes, and a digest of
    its source files (merge_bench.source_digest); taken at the start and the end of a run, since
    other people edit the working tree."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    return {"head": git("rev-parse", "--short", "HEAD"), "mergequant_dirty": bool(git("status", "--porcelain", "mergequant")),
            "source_digest": merge_bench.source_digest()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--calib-kb", type=int, default=300)
    ap.add_argument("--heldout-kb", type=int, default=100)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32, help="calibration windows per forward, both tools")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2,
                    help="rounds: every config runs once per round, interleaved; the fastest run is reported")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for both tools' subprocesses (default: unset, each tool's own choice)")
    ap.add_argument("--skip-gptqmodel", action="store_true")
    ap.add_argument("--no-bf16", action="store_true", help="leave out the mergequant --calib-dtype bfloat16 row "
                    "(left out anyway on a CPU without bfloat16 instructions, where it would be emulated)")
    ap.add_argument("--gptqmodel-float32", choices=("auto", "on", "off"), default="auto",
                    help="also run GPTQModel with dtype=torch.float32 (its default on CPU is bfloat16); auto: on a "
                         "CPU without bfloat16 instructions, where its default is emulated and float32 is its best")
    ap.add_argument("--passive-peer", action="store_true",
                    help="also run GPTQModel with OMP_WAIT_POLICY=PASSIVE (the setting mergequant's CLI uses)")
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--out", type=Path, default=None,
                    help="default: bench/results/moe-tiny.json, or moe-tiny-avx2.json on a CPU without bfloat16 instructions")
    args = ap.parse_args()

    import torch
    import transformers

    import mergequant
    from mergequant.hardware import cpu_bfloat16_instructions, fast_bfloat16

    bf16_native = fast_bfloat16("cpu")
    if args.out is None:  # the two CPU classes rank the tools differently: each keeps its own record
        args.out = RESULTS / ("moe-tiny.json" if bf16_native else "moe-tiny-avx2.json")
    peer_fp32 = args.gptqmodel_float32 == "on" or (args.gptqmodel_float32 == "auto" and not bf16_native)
    if not bf16_native and not args.no_bf16:
        print("note: this CPU has no bfloat16 instructions: the --calib-dtype bfloat16 row is left out", flush=True)
    t_bench = time.perf_counter()
    code_start = code_state()
    load_start = os.getloadavg()
    torch.set_num_threads(os.cpu_count() or 1)
    quant_bench.WORK = WORK  # build_data writes calib.txt / heldout.txt there
    calib, heldout, data_info = quant_bench.build_data(args.calib_kb, args.heldout_kb)
    gptqmodel_version = None
    if not args.skip_gptqmodel:
        from importlib.metadata import version
        gptqmodel_version = version("gptqmodel")

    bits, gs = args.bits, args.group_size
    rows = []
    t = time.perf_counter()
    fp = evaluate(args.model, heldout, args.eval_seqlen, backend="transformers")
    print(f"fp: ppl {fp['perplexity']:.3f} ({time.perf_counter() - t:.1f} s eval)", flush=True)
    rows.append({"name": "fp (bf16)" if bf16_native else "fp (bf16 weights, float32 compute)", "tool": "-", "bits": 16,
                 **fp})

    # (tag, tool, method, routing): ours and GPTQModel back to back, all-token pair first
    # mergequant's CLI lets idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE, mergequant.cli); GPTQModel
    # runs as its users run it (spinning threads, the OpenMP default) and, in a "-passive" row, with the
    # same setting as ours, so the comparison can be read both ways
    configs = [("mergequant-rtn", "mergequant", "rtn", None, {}),
               ("mergequant-gptq-all", "mergequant", "gptq", "all", {})]
    if not args.no_bf16 and bf16_native:  # --calib-dtype bfloat16: the calibration forward in GPTQModel's own precision
        configs.append(("mergequant-gptq-all-bf16", "mergequant", "gptq", "all", {}))
    passive = {"OMP_WAIT_POLICY": "PASSIVE"}
    if not args.skip_gptqmodel:
        configs.append(("gptqmodel-gptq-bypass", "gptqmodel", "gptq", "bypass", {}))
        if peer_fp32:
            configs.append(("gptqmodel-gptq-bypass-fp32", "gptqmodel", "gptq", "bypass", {}))
        if args.passive_peer:
            configs.append(("gptqmodel-gptq-bypass-passive", "gptqmodel", "gptq", "bypass", passive))
    configs.append(("mergequant-gptq-routed", "mergequant", "gptq", "routed", {}))
    if not args.skip_gptqmodel:
        configs.append(("gptqmodel-gptq-natural", "gptqmodel", "gptq", "natural", {}))
        if peer_fp32:
            configs.append(("gptqmodel-gptq-natural-fp32", "gptqmodel", "gptq", "natural", {}))
        if args.passive_peer:
            configs.append(("gptqmodel-gptq-natural-passive", "gptqmodel", "gptq", "natural", passive))

    # every round runs each configuration once, in the order above, so each of ours runs right next to
    # its GPTQModel counterpart in every round (the load on this shared machine drifts over minutes)
    env_threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    plans = []
    for base, tool, method, routing, extra_env in configs:
        tag = f"{base}-w{bits}g{gs}"
        out = WORK / tag
        if tool == "mergequant":
            cmd = [sys.executable, "-c", OURS_SCRIPT, "quantize", str(args.model), "-o", str(out), "--method", method,
                   "--bits", str(bits), "--group-size", str(gs), "--damp", "0.01", "--samples", str(args.samples),
                   "--seqlen", str(args.seqlen), "--seed", str(args.seed), "--device", "cpu", "--force",
                   "--batch-size", str(args.batch_size)]  # not --quiet: the per-layer routing lines are parsed
            if method == "gptq":
                cmd += ["--calib", str(calib), "--moe-calibration", routing]
            if base.endswith("-bf16"):
                cmd += ["--calib-dtype", "bfloat16"]
            env = dict(env_threads)
        else:
            cmd = [sys.executable, "-c", GPTQMODEL_SCRIPT, str(args.model), str(calib), str(out), str(bits), str(gs),
                   routing, str(args.samples), str(args.seqlen), str(args.seed), str(args.batch_size),
                   "float32" if base.endswith("-fp32") else "auto"]
            env = {"GPTQMODEL_CPU_WORKERS": "2", **env_threads, **extra_env}
        plans.append((tag, tool, method, routing, out, cmd, env))
    runs: dict[str, list[dict]] = {p[0]: [] for p in plans}
    floors: dict[str, list[float]] = {"interpreter": []}
    for rnd in range(args.repeats):
        # the fixed cost of each run: interpreter start (measured here) plus the imports each run reports
        # itself; "beyond imports" below subtracts them
        floors["interpreter"].append(run_measured([sys.executable, "-c", "pass"])["wall_s"])
        for tag, tool, method, routing, out, cmd, env in plans:
            shutil.rmtree(out, ignore_errors=True)
            r = run_measured(cmd, env=env, log=WORK / f"{tag}.log")
            r["round"] = rnd
            r["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
            runs[tag].append(r)
            print(f"round {rnd}: {tag}: wall {r['wall_s']:.1f} s  cpu {r['cpu_s']:.1f} s  peak RssAnon {r['peak_rss_anon_mib']:.0f} MiB  "
                  f"(load {r['loadavg_after'][0]})", flush=True)

    for tag, tool, method, routing, out, cmd, env in plans:
        rs = runs[tag]
        times, cfgs = [], []
        for r in rs:
            for key, dest in ((f"{tool.upper()}_TIMES ", times), ("GPTQMODEL_CONFIG ", cfgs)):
                line = [ln for ln in r["stdout"].splitlines() if ln.startswith(key)]
                dest.append(json.loads(line[-1].split(" ", 1)[1]) if line else None)
        if tool == "mergequant":
            extra = {"routing": _ours_routing(rs[-1]["stdout"])} if method == "gptq" else {}
        else:
            extra = {"gptqmodel_config": cfgs[-1], "gptqmodel_log": _gptqmodel_log(out)}
        extra["internal_times"] = times
        for r in rs:
            r.pop("stdout", None)
        best = min(rs, key=lambda r: r["wall_s"])
        own = times[rs.index(best)]  # the fastest round's own import time
        floor = min(floors["interpreter"]) + (own["import_s"] if own else 0.0)
        extra["beyond_imports_s"] = round(best["wall_s"] - floor, 2)
        extra["import_floor_s"] = round(floor, 2)
        meas = {"wall_s": best["wall_s"], "cpu_s": min(r["cpu_s"] for r in rs),
                "peak_rss_anon_mib": max(r["peak_rss_anon_mib"] for r in rs),
                "runs": [{k: r[k] for k in ("round", "wall_s", "cpu_s", "peak_rss_anon_mib", "loadavg_after")} for r in rs]}
        t = time.perf_counter()
        ev = evaluate(out, heldout, args.eval_seqlen, "dequant")  # the last round's checkpoint
        ev["eval_s"] = round(time.perf_counter() - t, 1)
        rows.append({"name": tag, "tool": tool, "method": method, "moe_calibration": routing, "bits": bits,
                     "group_size": gs, **ev, **meas, **extra})
        print(f"{tag}: ppl {ev['perplexity']:.3f} ({ev['eval_backend']})  wall {meas['wall_s']:.1f} s (fastest of "
              f"{len(rs)})  peak RssAnon {meas['peak_rss_anon_mib']:.0f} MiB (highest)", flush=True)

    by = {r["name"]: r for r in rows}
    sfx = f"-w{bits}g{gs}"
    rtn = by[f"mergequant-rtn{sfx}"]
    ours = {m: by[f"mergequant-gptq-{m}{sfx}"] for m in ("all", "routed")}
    if f"mergequant-gptq-all-bf16{sfx}" in by:
        ours["all-bf16"] = by[f"mergequant-gptq-all-bf16{sfx}"]
    theirs = {m: by.get(f"gptqmodel-gptq-{m}{sfx}") for m in ("bypass", "natural", "bypass-fp32", "natural-fp32")}
    comparisons = {"rtn_ppl": rtn["perplexity"]}
    for m, r in ours.items():
        comparisons[f"ours_{m}_ppl"] = r["perplexity"]
        comparisons[f"ours_{m}_better_than_rtn"] = r["perplexity"] < rtn["perplexity"]
    present = {m: r for m, r in theirs.items() if r}
    if present:
        best_m = min(present, key=lambda m: present[m]["perplexity"])
        best_t = present[best_m]["perplexity"]
        comparisons["gptqmodel_best"] = {"routing": best_m, "ppl": best_t}
        for m, r in ours.items():
            comparisons[f"ours_{m}_over_gptqmodel_best"] = round(r["perplexity"] / best_t, 4)
            comparisons[f"ours_{m}_within_1pct_of_gptqmodel_best"] = r["perplexity"] <= best_t * 1.01
        pairs = [("all", "bypass"), ("routed", "natural"), ("all", "bypass-fp32"), ("routed", "natural-fp32")]
        pairs += [("all-bf16", "bypass")] if "all-bf16" in ours else []
        for o, g in pairs:
            if theirs[g]:
                comparisons[f"speedup_{o}_vs_{g}"] = round(theirs[g]["wall_s"] / ours[o]["wall_s"], 2)
                comparisons[f"cpu_ratio_{g}_over_{o}"] = round(theirs[g]["cpu_s"] / ours[o]["cpu_s"], 2)
                comparisons[f"speedup_beyond_imports_{o}_vs_{g}"] = round(
                    theirs[g]["beyond_imports_s"] / ours[o]["beyond_imports_s"], 2)
                per_round = sorted(round(t["wall_s"] / u["wall_s"], 2) for t, u in zip(theirs[g]["runs"], ours[o]["runs"]))
                comparisons[f"speedup_{o}_vs_{g}_per_round"] = per_round
                comparisons[f"rss_ratio_{g}_over_{o}"] = round(theirs[g]["peak_rss_anon_mib"] / ours[o]["peak_rss_anon_mib"], 2)
                comparisons[f"ppl_ratio_{o}_over_{g}"] = round(ours[o]["perplexity"] / theirs[g]["perplexity"], 4)
            peer = by.get(f"gptqmodel-gptq-{g}-passive{sfx}")
            if peer:
                comparisons[f"speedup_{o}_vs_{g}_passive"] = round(peer["wall_s"] / ours[o]["wall_s"], 2)
                comparisons[f"cpu_ratio_{g}_passive_over_{o}"] = round(peer["cpu_s"] / ours[o]["cpu_s"], 2)
        fastest_theirs = min(r["wall_s"] for r in present.values())
        comparisons["speedup_slowest_ours_vs_fastest_gptqmodel"] = round(
            fastest_theirs / max(r["wall_s"] for r in ours.values()), 2)

    print()
    hdr = f"{'config':36s} {'ppl':>9s} {'wall s':>8s} {'beyond imports s':>17s} {'cpu s':>8s} {'RssAnon MiB':>12s}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        w = f"{r['wall_s']:.1f}" if "wall_s" in r else "-"
        c = f"{r['cpu_s']:.1f}" if "cpu_s" in r else "-"
        m = f"{r['peak_rss_anon_mib']:.0f}" if "peak_rss_anon_mib" in r else "-"
        b = f"{r['beyond_imports_s']:.1f}" if "beyond_imports_s" in r else "-"
        print(f"{r['name']:36s} {r['perplexity']:9.3f} {w:>8s} {b:>17s} {c:>8s} {m:>12s}")
    print()
    print(json.dumps(comparisons, indent=1))

    result = {
        "benchmark": "moe-tiny",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "bfloat16_instructions": cpu_bfloat16_instructions(),
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"mergequant": getattr(mergequant, "__version__", None), "torch": torch.__version__,
                     "transformers": transformers.__version__, "gptqmodel": gptqmodel_version},
        "code": {"start": code_start, "end": code_state()},
        "model": str(args.model),
        "settings": {"calibration": f"first {args.calib_kb} KB of austen.txt + first {args.calib_kb} KB of shakespeare.txt",
                     "heldout": f"last {args.heldout_kb} KB of austen.txt + last {args.heldout_kb} KB of shakespeare.txt",
                     "data_ranges": data_info, "samples": args.samples, "seqlen": args.seqlen, "seed": args.seed,
                     "eval_seqlen": args.eval_seqlen, "bits": bits, "group_size": gs, "sym": True, "damp": 0.01,
                     "desc_act": False, "batch_size": args.batch_size, "gptqmodel_act_group_aware": False,
                     "gptqmodel_routing": {"bypass": "QuantizeConfig(moe=MoEConfig(routing=ExpertsRoutingBypass()))",
                                           "natural": "QuantizeConfig(moe=None); default fallback RTN below 0.5% of tokens"},
                     "mergequant_routed_min_share": "default --moe-min-share 0.05 (of a uniform share, tokens x top_k / E)",
                     "device": "cpu", "threads": torch.get_num_threads(),
                     "gptqmodel_dtype": "rows ending -fp32: GPTQModel.load(..., dtype=torch.float32); others its "
                                        "default on CPU (bfloat16, gptqmodel.utils.model.auto_dtype)",
                     "evaluation": "mergequant.evaluate.evaluate_model over the whole held-out text: fp through "
                                   "transformers (bf16; float32 compute on a CPU without bfloat16 instructions); every quantized checkpoint, GPTQModel's included, through "
                                   "the dequantizing loader (float32)",
                     "repeats": args.repeats, "omp_num_threads": args.threads,
                     "timing": "`repeats` rounds, each running every config once in table order (ours next to "
                               "its GPTQModel counterpart); wall time of the whole subprocess (interpreter start, "
                               "imports, calibration, quantize, save), the fastest round reported, every round under "
                               "rows[].runs; peak RssAnon summed over the subprocess tree, polled every 20 ms, the "
                               "highest round reported; the last round's checkpoint is evaluated"},
        "rows": rows,
        "import_floors_s": floors,
        "comparisons": comparisons,
        "bench_wall_s": round(time.perf_counter() - t_bench, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['bench_wall_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
