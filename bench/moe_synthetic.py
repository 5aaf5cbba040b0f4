"""GPTQ time and peak memory per layer on a synthetic Mixtral-8x7B-shaped model (CPU), projected to 32 layers.

The checkpoint has Mixtral-8x7B's per-layer dimensions (hidden 4096, 32 heads / 8 KV heads, experts
of intermediate 14336, top-2) but only ``--layers`` decoder layers (default 2), a small vocabulary
(the bundled 2048-token tokenizer in ``mergequant/data/``), bf16, random weights (``merge_bench``'s
generator: N(0, 1/fan_in), norms ~1, one tensor in memory at a time; the router is random too, so
routing is close to uniform). Only the shapes and the work matter here; quality is measured on the
trained tiny Mixtral by ``bench/moe_bench.py``. GPTQModel is not run: on the tiny Mixtral it already
needs minutes, and on this model it would need hours on 2 cores.

One ``mergequant quantize --method gptq`` run (w4g128, damp 0.01, ``--moe-calibration all`` unless
``--moe-calibration routed``) in its own subprocess, from ``--samples`` x ``--seqlen`` calibration
windows of the quant_bench calibration text. While it runs, its stdout is read line by line with
timestamps, and RssAnon of the process tree is polled every 20 ms; the per-layer routing line that
mergequant logs when a layer is done ("layer i: routed tokens per expert ...") closes that layer's
interval. Layer 0's interval also holds the start (imports, tokenizing, embeddings); later layers'
intervals are one layer each. Projection to 32 layers:

    time(32) = wall(run) + (32 - L) * mean(per-layer time of layers 1..L-1)
    peak(32) = max over the run (the runner holds one layer at a time: the peak is per layer, so it
               does not grow with depth; layer 1's peak vs layer 0's checks that)

With ``--experts E < 8`` (fewer experts of the same size, when 8 do not fit in time or memory) the
per-layer time and peak are also measured at a second expert count (``--experts2``) and extrapolated
linearly in E to 8 (every expert's forward, Hessian capture and solve are the same work; the shared
gate/up Hessian is once per layer): t(8) = t(E1) + (8 - E1) * (t(E2) - t(E1)) / (E2 - E1).

Usage: python bench/moe_synthetic.py [--layers 2] [--experts 8] [--samples 16] [--seqlen 512]
Writes bench/results/moe-synthetic.json. The checkpoint (2.9 GB per layer) goes to bench/work/moe-synth/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))  # this checkout's mergequant, whatever is installed
import merge_bench  # noqa: E402  (tensor generator, lazy tensors, /proc process tree)
import quant_bench  # noqa: E402  (calibration text, RssAnon reader)

WORK = ROOT / "bench" / "work" / "moe-synth"
RESULTS = ROOT / "bench" / "results"
MiB = 1024**2
LAYER_DONE = re.compile(r"^layer (\d+): routed tokens per expert")

HIDDEN, INTER, HEADS, KV_HEADS, TOP_K, FULL_LAYERS, FULL_EXPERTS = 4096, 14336, 32, 8, 2, 32, 8


def mixtral_config(layers: int, experts: int, vocab: int = 2048) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "attention_dropout": 0.0,
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None, "dtype": "bfloat16", "head_dim": None,
        "hidden_act": "silu", "hidden_size": HIDDEN, "intermediate_size": INTER, "initializer_range": 0.02,
        "max_position_embeddings": 4096, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "num_experts_per_tok": TOP_K, "num_hidden_layers": layers, "num_local_experts": experts,
        "output_router_logits": False, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "router_aux_loss_coef": 0.02,
        "router_jitter_noise": 0.0, "sliding_window": None, "tie_word_embeddings": False, "use_cache": True,
        "vocab_size": vocab,
    }


def mixtral_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Per-expert on-disk names (as Hub Mixtral checkpoints: block_sparse_moe.experts.E.w1|w2|w3)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = hd * cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "block_sparse_moe.gate.weight": (cfg["num_local_experts"], h)})
        for e in range(cfg["num_local_experts"]):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes.update({q + "w1.weight": (i, h), q + "w3.weight": (i, h), q + "w2.weight": (h, i)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


def build_model(layers: int, experts: int, log) -> Path:
    import torch

    from mergequant.demo import write_checkpoint

    cfg = mixtral_config(layers, experts)
    path = WORK / f"mixtral-L{layers}-E{experts}"
    spec = {"generator": merge_bench.GENERATOR_VERSION, "config": cfg}
    marker = path / "bench_spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return path
    t0 = time.perf_counter()
    shapes = mixtral_shapes(cfg)
    tmp = WORK / f".{path.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    tensors = {n: merge_bench._LazyTensor(lambda n=n, s=s: merge_bench._base_tensor(n, s), s, torch.bfloat16)
               for n, s in shapes.items()}
    write_checkpoint(tmp, cfg, tensors, shards=2 * layers)
    (tmp / "bench_spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    os.rename(tmp, path)
    log(f"built {path} ({sum(f.stat().st_size for f in path.glob('*.safetensors')) / 2**30:.2f} GiB) "
        f"in {time.perf_counter() - t0:.1f} s")
    return path


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def estimate_peak(experts: int, samples: int, seqlen: int) -> int:
    """A deliberately generous estimate of our peak anonymous memory, to refuse a run that cannot fit:
    Python stack, one down_proj Hessian and its factor temporaries, the shared gate/up Hessian, packed
    codes of every solved expert, layer inputs/outputs in float32 and the MLP activations of a chunk."""
    stack = 400 * MiB
    down_h = 2 * INTER * INTER * 4
    shared_h = 2 * HIDDEN * HIDDEN * 4
    codes = experts * 3 * HIDDEN * INTER // 2
    acts = 2 * samples * seqlen * HIDDEN * 4 + 2 * 8192 * INTER * 4 * 2
    return stack + down_h + shared_h + codes + acts


def run_timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``: wall time, peak RssAnon of the process tree, and per stdout line its time and the
    peak RssAnon since the previous layer line (layer intervals)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # lines arrive when printed
    state = {"peak": 0, "interval_peak": 0}
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            kb = sum(quant_bench._rss_anon_kb(p) for p in merge_bench._tree(proc.pid))
            state["peak"] = max(state["peak"], kb)
            state["interval_peak"] = max(state["interval_peak"], kb)
            samples.append((round(time.perf_counter() - t0, 2), kb))
            time.sleep(0.02)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    lines, layers = [], []
    phases: dict[str, float] = {}  # this layer's phase times so far
    last = 0.0
    logf = log.open("w")  # written as it goes: a run stopped midway still leaves its layers behind
    for line in proc.stdout:
        now = time.perf_counter() - t0
        lines.append(f"[{now:8.1f}] {line.rstrip()}")
        print(lines[-1], flush=True)
        logf.write(lines[-1] + "\n")
        logf.flush()
        p = PHASE.match(line)
        if p:
            phases[p.group(1)] = phases.get(p.group(1), 0.0) + float(p.group(2))
        m = LAYER_DONE.match(line)
        if m:
            layers.append({"layer": int(m.group(1)), "end_s": round(now, 1), "seconds": round(now - last, 1),
                           "peak_rss_anon_mib": round(state["interval_peak"] / 1024, 1),
                           "phases_s": {k: round(v, 1) for k, v in phases.items()}})
            phases.clear()
            state["interval_peak"] = 0
            last = now
    proc.wait()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    logf.close()
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    # a coarse memory timeline (one point per second) for the JSON
    timeline, next_t = [], 0.0
    for t, kb in samples:
        if t >= next_t:
            timeline.append([t, round(kb / 1024)])
            next_t = t + 1.0
    return {"wall_s": round(wall, 1), "peak_rss_anon_mib": round(state["peak"] / 1024, 1), "layers": layers,
            "tail_s": round(wall - last, 1), "rss_anon_timeline_mib": timeline}


# ``python -m mergequant quantize ...`` with timers wrapped, at runtime, around GPTQ's phases when the
# installed mergequant has them (nothing under mergequant/ is changed; absent names are skipped):
# capture (forwards that collect Hessians: _capture, and for experts _expert_gate_up_stats /
# _expert_down_stats), solve (GPTQ solves + packing), rtn (starved experts),
# output (the layer's recompute with quantized weights, feeding the next layer). Each call prints
# "PHASE name seconds"; the per-layer routing line that follows closes the layer.
DRIVER = r"""
import functools, sys, time
sys.path.insert(0, sys.argv[1])
from mergequant.quant import gptq_method, runner

def timed(owner, attr, key):
    fn = getattr(owner, attr, None)
    if fn is None:
        return
    static = isinstance(getattr(owner, "__dict__", {}).get(attr), staticmethod)
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            print(f"PHASE {key} {time.perf_counter() - t0:.3f}", flush=True)
    setattr(owner, attr, staticmethod(wrapper) if static else wrapper)

timed(gptq_method.GPTQMethod, "_capture", "capture")
timed(gptq_method.GPTQMethod, "_expert_gate_up_stats", "capture")
timed(gptq_method.GPTQMethod, "_expert_down_stats", "capture")
timed(gptq_method.GPTQMethod, "_solve_shared", "solve")
timed(gptq_method.GPTQMethod, "_round_starved", "rtn")
timed(runner, "run_layer", "output")
from mergequant.cli import main
sys.argv = ["mergequant"] + sys.argv[2:]
main()
"""
PHASE = re.compile(r"^PHASE (\w+) ([0-9.]+)")


def measure(model: Path, calib: Path, args, experts: int) -> dict:
    out = WORK / f"{model.name}-gptq-w4g128"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", DRIVER, str(ROOT), "quantize", str(model), "-o", str(out), "--method", "gptq",
           "--bits", "4", "--group-size", "128", "--damp", "0.01", "--samples", str(args.samples),
           "--seqlen", str(args.seqlen), "--seed", "0", "--device", "cpu", "--force", "--calib", str(calib),
           "--moe-calibration", args.moe_calibration]
    load0 = os.getloadavg()
    r = run_timed(cmd, WORK / f"{model.name}.log")
    steady = r["layers"][1:] or r["layers"][:1]
    mean_layer = sum(x["seconds"] for x in steady) / len(steady)
    phases = {k: round(sum(x["phases_s"].get(k, 0.0) for x in steady) / len(steady), 1)
              for k in ("capture", "solve", "rtn", "output")}
    r.update({"experts": experts, "cmd": "mergequant " + " ".join(cmd[4:]), "per_layer_phases_s": phases, "loadavg_before": [round(x, 2) for x in load0],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()],
              "per_layer_s": round(mean_layer, 1),
              "per_layer_peak_rss_anon_mib": max(x["peak_rss_anon_mib"] for x in r["layers"])})
    shutil.rmtree(out, ignore_errors=True)  # 4-bit output: ~0.75 GiB per layer, not needed afterwards
    return r


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
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=FULL_EXPERTS)
    ap.add_argument("--experts2", type=int, default=None, help="second expert count for the linear projection to 8")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--moe-calibration", default="all", choices=["all", "routed"])
    ap.add_argument("--project-tokens", type=int, default=16 * 512,
                    help="also project the per-layer time to this many calibration tokens (forwards scale, solves do not)")
    ap.add_argument("--keep-model", action="store_true", help="keep the synthetic checkpoint (2.9 GB per layer)")
    ap.add_argument("--out", type=Path, default=RESULTS / "moe-synthetic.json")
    args = ap.parse_args()

    import torch
    import transformers

    import mergequant

    WORK.mkdir(parents=True, exist_ok=True)
    quant_bench.WORK = WORK
    calib, _, _ = quant_bench.build_data(300, 100)
    counts = [args.experts] + ([args.experts2] if args.experts2 and args.experts2 != args.experts else [])
    need = max(estimate_peak(e, args.samples, args.seqlen) for e in counts)
    avail = mem_available()
    print(f"memory: estimated peak {need / 2**30:.1f} GiB, available {avail / 2**30:.1f} GiB", flush=True)
    if need > 0.8 * avail:
        raise SystemExit("not enough free memory for this configuration: lower --samples/--seqlen or --experts")
    code_start = code_state()
    runs = []
    for e in counts:
        model = build_model(args.layers, e, print)
        runs.append(measure(model, calib, args, e))
        if not args.keep_model:
            shutil.rmtree(model, ignore_errors=True)
        r = runs[-1]
        print(f"E={e}: wall {r['wall_s']:.0f} s, per layer {r['per_layer_s']:.0f} s, peak RssAnon "
              f"{r['peak_rss_anon_mib']:.0f} MiB; layers {[(x['layer'], x['seconds'], x['peak_rss_anon_mib']) for x in r['layers']]}",
              flush=True)

    if len(runs) == 1 and runs[0]["experts"] == FULL_EXPERTS:
        r = runs[0]
        t_layer, peak = r["per_layer_s"], r["peak_rss_anon_mib"]
        method = (f"measured with all {FULL_EXPERTS} experts: time(32) = wall + (32 - {args.layers}) x mean per-layer "
                  "time of layers >= 1; peak = the run's peak (one layer at a time)")
        fixed = r["wall_s"] - args.layers * t_layer  # start + tail not attributable to a layer
    else:
        (a, b) = sorted(runs, key=lambda x: x["experts"])[:2] if len(runs) > 1 else (runs[0], runs[0])
        if a is b:
            raise SystemExit("--experts < 8 needs --experts2 for the projection")
        slope_t = (b["per_layer_s"] - a["per_layer_s"]) / (b["experts"] - a["experts"])
        slope_m = (b["peak_rss_anon_mib"] - a["peak_rss_anon_mib"]) / (b["experts"] - a["experts"])
        t_layer = b["per_layer_s"] + (FULL_EXPERTS - b["experts"]) * slope_t
        peak = b["peak_rss_anon_mib"] + (FULL_EXPERTS - b["experts"]) * slope_m
        method = (f"per-layer time and peak measured at E={a['experts']} and E={b['experts']} experts (same widths), "
                  f"extrapolated linearly in E to {FULL_EXPERTS}; time(32) = start/tail of the E={b['experts']} run + 32 x that")
        fixed = b["wall_s"] - args.layers * b["per_layer_s"]
    # forwards (capture, output) scale with the calibration tokens, solves do not: the per-layer time at
    # --project-tokens, from the phase split of the (last) run
    last = runs[-1]
    ph = last["per_layer_phases_s"]
    tokens = args.samples * args.seqlen
    scale = t_layer / last["per_layer_s"] if last["per_layer_s"] else 1.0  # E extrapolation, if any
    other = last["per_layer_s"] - sum(ph.values())
    at_tokens = scale * (ph["solve"] + ph["rtn"] + other + (ph["capture"] + ph["output"]) * args.project_tokens / tokens)
    projection = {"per_layer_s": round(t_layer, 1), "layers": FULL_LAYERS, "calibration_tokens": tokens,
                  f"per_layer_s_at_{args.project_tokens}_tokens": round(at_tokens, 1),
                  f"total_s_at_{args.project_tokens}_tokens": round(fixed + FULL_LAYERS * at_tokens, 1),
                  "total_s": round(fixed + FULL_LAYERS * t_layer, 1),
                  "total_min": round((fixed + FULL_LAYERS * t_layer) / 60, 1),
                  "peak_rss_anon_mib": round(peak, 1), "method": method,
                  "note": "the real model's 32000-token embedding/lm_head add ~0.5 GiB of bf16 that is read, not "
                          "solved (lm_head is not quantized); calibration activations scale with samples x seqlen"}
    print(json.dumps(projection, indent=1))

    cfg = mixtral_config(args.layers, args.experts)
    params_layer = sum(int(torch.Size(s).numel()) for n, s in mixtral_shapes(mixtral_config(1, FULL_EXPERTS)).items()
                       if n.startswith("model.layers.0."))
    result = {
        "benchmark": "moe-synthetic",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "mem_available_gib_at_start": round(avail / 2**30, 1)},
        "versions": {"mergequant": getattr(mergequant, "__version__", None), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "code": {"start": code_start, "end": code_state()},
        "model": {"config": {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                 "num_key_value_heads", "num_experts_per_tok", "num_hidden_layers",
                                                 "vocab_size")},
                  "experts_measured": counts, "params_per_full_layer": params_layer,
                  "bytes_per_full_layer_bf16": 2 * params_layer, "weights": "random, N(0, 1/fan_in), bf16"},
        "settings": {"samples": args.samples, "seqlen": args.seqlen, "bits": 4, "group_size": 128, "sym": True,
                     "desc_act": False, "damp": 0.01, "moe_calibration": args.moe_calibration,
                     "batch_size": "mergequant's automatic choice",
                     "calibration": "first 300 KB of austen.txt + shakespeare.txt (quant_bench's calibration text)",
                     "timing": "wall time of the whole subprocess; per layer from timestamps of the per-layer "
                               "routing lines; RssAnon of the process tree polled every 20 ms"},
        "runs": runs,
        "projection_32_layers": projection,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
