"""MoE GPTQ speed at realistic widths: mergequant vs GPTQModel 7.7 on a synthetic Mixtral-shaped model (CPU).

``bench/moe_bench.py`` measures quality and speed on the shared tiny Mixtral (hidden 256, 8 experts of 384,
4 layers). There both tools spend most of their time on the same things: importing torch and
transformers (~7 s of CPU each), and the arithmetic every all-token calibration needs (every expert's
gate/up on every token, every expert's down-projection Hessian), so the ratio says little about what
users quantize. This benchmark keeps the shape of a real Mixtral layer at a quarter of its width
(hidden 1024, 16 heads / 4 KV heads, 8 experts of intermediate 3584, top-2; ``--width 1`` is
Mixtral-8x7B's 4096/14336), random bf16 weights (the merge benchmark's generator; the router is
random too, so routing is close to uniform) and the bundled 2048-token tokenizer, and runs both tools
on the same calibration windows (``mergequant.quant.calib.calibration_batch`` of the quant benchmark's
text), w4g128, damp 0.01, no act order:

* mergequant GPTQ ``--moe-calibration all`` vs GPTQModel with ``ExpertsRoutingBypass`` (every expert
  sees every token: the same statistics);
* mergequant GPTQ ``--moe-calibration routed`` vs GPTQModel's natural routing.

Each run is its own subprocess; wall time, CPU time (user + system of the process tree: on this
shared machine the wall time depends on other load, the CPU time much less) and peak RssAnon.
Quality is not measured here (random weights); it is measured on the trained tiny Mixtral by
moe_bench.py. Writes ``bench/results/moe-speed-<tag>.json``.

    python bench/moe_speed.py                       # quarter width, 2 layers, 32 x 256 tokens
    python bench/moe_speed.py --only mergequant     # ours only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))  # this checkout's mergequant, whatever is installed
import merge_bench  # noqa: E402  (tensor generator)
import moe_bench  # noqa: E402  (GPTQModel driver script, code state)
import moe_synthetic  # noqa: E402  (Mixtral tensor names)
import quant_bench  # noqa: E402  (calibration text, run_measured)

WORK = ROOT / "bench" / "work" / "moe-speed"
RESULTS = ROOT / "bench" / "results"


def config(width_div: int, layers: int) -> dict:
    cfg = moe_synthetic.mixtral_config(layers, 8)
    cfg.update(hidden_size=4096 // width_div, intermediate_size=14336 // width_div,
               num_attention_heads=32 // width_div, num_key_value_heads=max(1, 8 // width_div))
    return cfg


def build(cfg: dict, log) -> Path:
    import torch

    from mergequant.demo import write_checkpoint

    path = WORK / f"mixtral-h{cfg['hidden_size']}-L{cfg['num_hidden_layers']}"
    spec = {"generator": merge_bench.GENERATOR_VERSION, "config": cfg}
    marker = path / "bench_spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return path
    shapes = moe_synthetic.mixtral_shapes(cfg)
    tmp = WORK / f".{path.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    tensors = {n: merge_bench._LazyTensor(lambda n=n, s=s: merge_bench._base_tensor(n, s), s, torch.bfloat16)
               for n, s in shapes.items()}
    write_checkpoint(tmp, cfg, tensors, shards=2 * cfg["num_hidden_layers"])
    (tmp / "bench_spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    os.rename(tmp, path)
    log(f"built {path}")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=4, help="divide Mixtral-8x7B's widths by this (default 4)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for both tools")
    ap.add_argument("--only", choices=["mergequant", "gptqmodel"], default=None)
    ap.add_argument("--bf16", action="store_true",
                    help="also run ours with --calib-dtype bfloat16 (calibration forwards in GPTQModel's precision)")
    ap.add_argument("--passive-peer", action="store_true",
                    help="also run GPTQModel with OMP_WAIT_POLICY=PASSIVE (the setting mergequant's CLI uses)")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    cfg = config(args.width, args.layers)
    model = build(cfg, log)
    calib, _, _ = quant_bench.build_data(300, 100)  # the quant benchmark's calibration text (shared corpus)
    env = {"OMP_NUM_THREADS": str(args.threads), "GPTQMODEL_CPU_WORKERS": "2"}
    plans = []
    # mergequant's CLI lets idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE); GPTQModel runs with the
    # OpenMP default (as its users run it) and, with --passive-peer, also with our setting
    peer_envs = [("", {})] + ([("-passive", {"OMP_WAIT_POLICY": "PASSIVE"})] if args.passive_peer else [])
    pairs = (("all", "bypass"), ("routed", "natural")) + ((("all-bf16", "bypass"),) if args.bf16 else ())
    for ours, theirs in pairs:
        if args.only in (None, "mergequant"):
            out = WORK / f"mergequant-{ours}"
            plans.append((f"mergequant-gptq-{ours}", out, {}, [
                sys.executable, "-m", "mergequant", "quantize", str(model), "-o", str(out), "--method", "gptq",
                "--bits", "4", "--group-size", "128", "--damp", "0.01", "--samples", str(args.samples),
                "--seqlen", str(args.seqlen), "--seed", "0", "--device", "cpu", "--force", "--quiet",
                "--batch-size", str(args.batch_size), "--calib", str(calib), "--moe-calibration", ours.split("-")[0]]
                + (["--calib-dtype", "bfloat16"] if ours.endswith("-bf16") else [])))
        if ours.endswith("-bf16"):
            continue  # its GPTQModel counterpart already runs above
        if args.only in (None, "gptqmodel"):
            for sfx, extra in peer_envs:
                out = WORK / f"gptqmodel-{theirs}{sfx}"
                plans.append((f"gptqmodel-gptq-{theirs}{sfx}", out, extra, [
                    sys.executable, "-c", moe_bench.GPTQMODEL_SCRIPT, str(model), str(calib), str(out), "4", "128",
                    theirs, str(args.samples), str(args.seqlen), "0", str(args.batch_size)]))
    rows = []
    for name, out, extra, cmd in plans:
        shutil.rmtree(out, ignore_errors=True)
        r = quant_bench.run_measured(cmd, env={**env, **extra}, log=WORK / f"{name}.log")
        r.pop("stdout", None)
        r["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        rows.append({"name": name, **r})
        shutil.rmtree(out, ignore_errors=True)
        log(f"{name}: wall {r['wall_s']:.1f} s  cpu {r['cpu_s']:.1f} s  peak RssAnon {r['peak_rss_anon_mib']:.0f} MiB  "
            f"(load {r['loadavg_after'][0]})")
    by = {r["name"]: r for r in rows}
    ratios = {}
    for ours, theirs in [(o, t + sfx) for o, t in pairs for sfx, _ in peer_envs]:
        a, b = by.get(f"mergequant-gptq-{ours}"), by.get(f"gptqmodel-gptq-{theirs}")
        if a and b:
            ratios[f"{theirs}_over_{ours}"] = {"wall": round(b["wall_s"] / a["wall_s"], 2),
                                               "cpu": round(b["cpu_s"] / a["cpu_s"], 2),
                                               "rss": round(b["peak_rss_anon_mib"] / a["peak_rss_anon_mib"], 2)}
    print(json.dumps(ratios, indent=1))
    shapes = moe_synthetic.mixtral_shapes(cfg)
    params = 0
    for s in shapes.values():
        n = 1
        for d in s:
            n *= d
        params += n
    result = {"benchmark": "moe-speed", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "code": moe_bench.code_state(), "config": cfg, "parameters": params,
              "settings": {"samples": args.samples, "seqlen": args.seqlen, "batch_size": args.batch_size,
                           "threads": args.threads, "bits": 4, "group_size": 128, "damp": 0.01},
              "rows": rows, "ratios": ratios}
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / f"moe-speed-h{cfg['hidden_size']}-L{args.layers}.json"
    dest.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {dest}")


if __name__ == "__main__":
    main()
