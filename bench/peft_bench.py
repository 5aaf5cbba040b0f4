#!/usr/bin/env python
"""Benchmark `mergequant extract-lora` against `mergekit-extract-lora` (rank 64) on synthetic Llama checkpoints.

This is a benchmark, not a test. One invocation:

1. builds (or reuses) the synthetic bf16 base and fine-tune of ``bench/merge_bench.py`` (same generator, same
   cache under bench/work/models/), warms the page cache by reading them once;
2. runs both tools as subprocesses at ``--rank`` (default 64), embeddings as LoRA for both (mergekit:
   ``--embed-lora``), polling the process tree's RssAnon/RssFile/VmRSS every ~20 ms exactly as merge_bench does;
3. checks the outputs against the true delta on a sample of modules (every module of the first and the last
   layer, the embeddings and lm_head): each tool's relative Frobenius error ``||D - B A|| / ||D||``, and the
   optimum (float64 SVD of D) for comparison;
4. prints a table and writes bench/results/peft-extract-<size>-<layers>.json.

Examples::

    python bench/peft_bench.py --size small          # ~100M params per model (the size reported in docs/benchmarks.md)
    python bench/peft_bench.py --size 1b             # TinyLlama shapes; mergekit's full SVDs take very long on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import merge_bench as mb  # noqa: E402  (the synthetic checkpoints and the measuring code are shared)

GiB = 1024**3


def _lora_products(adapter: Path, modules: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    out = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for mod in modules:
            emb = f"base_model.model.{mod}.lora_embedding_A" in keys
            a_k, b_k = ((f"base_model.model.{mod}.lora_embedding_A", f"base_model.model.{mod}.lora_embedding_B") if emb
                        else (f"base_model.model.{mod}.lora_A.weight", f"base_model.model.{mod}.lora_B.weight"))
            if a_k not in keys:
                continue
            r = cfg.get("rank_pattern", {}).get(mod, cfg["r"])
            alpha = cfg.get("alpha_pattern", {}).get(mod, cfg["lora_alpha"])
            ba = f.get_tensor(b_k).double() @ f.get_tensor(a_k).double() * (alpha / r)
            out[mod] = ba.T if emb else ba
    return out


def check_outputs(models: dict[str, Path], outs: dict[str, Path], cfg: dict, rank: int) -> dict:
    """Relative reconstruction errors of each tool on sampled modules, next to the SVD optimum."""
    from mergequant.io.checkpoint import Checkpoint

    base, ft = Checkpoint.open(models["base"]), Checkpoint.open(models["ft1"])
    last = cfg["num_hidden_layers"] - 1
    names = [n for n in ft.tensors if len(ft.tensors[n].shape) == 2
             and (".layers.0." in n or f".layers.{last}." in n or "layers" not in n)]
    mods = [n.removesuffix(".weight") for n in names]
    prods = {tool: _lora_products(path, mods) for tool, path in outs.items()}
    rows = []
    for n, mod in zip(names, mods):
        d = ft.get(n).double() - base.get(n).double()
        dn = float(d.norm())
        s = torch.linalg.svdvals(d)
        opt = float((s[rank:] ** 2).sum().sqrt()) / dn
        row = {"module": mod, "shape": list(d.shape), "optimum": opt}
        for tool, p in prods.items():
            row[tool] = float((d - p[mod]).norm()) / dn if mod in p else None
        rows.append(row)
    return {"rank": rank, "modules": rows}


def fmt_table(rows: list[dict]) -> str:
    head = ("| tool | wall s | CPU s (user+sys) | peak RssAnon GiB | peak RSS GiB | adapter MiB | wall vs mergekit | "
            "CPU vs mergekit |\n|---|--:|--:|--:|--:|--:|--:|--:|")
    mk = next((r for r in rows if r["tool"] == "mergekit"), None)
    lines = [head]
    for r in rows:
        cpu = r["user_s"] + r["sys_s"]
        other = mk is not None and r["tool"] != "mergekit"
        wall_ratio = f"{mk['wall_s'] / r['wall_s']:.2f}× faster" if other else "1"
        cpu_ratio = f"{(mk['user_s'] + mk['sys_s']) / cpu:.2f}× less" if other else "1"
        lines.append(f"| {r['tool']} | {r['wall_s']:.1f} | {cpu:.1f} | {r['peak_rss_anon'] / GiB:.2f} | "
                     f"{r['peak_vmrss'] / GiB:.2f} | {r['out_bytes'] / 2**20:.1f} | {wall_ratio} | {cpu_ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(mb.SIZES), default="small")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--tools", default="mergequant,mergekit")
    ap.add_argument("--mergequant-args", default="")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args(argv)

    cfg_spec = dict(mb.SIZES[args.size])
    if args.layers:
        cfg_spec["layers"] = args.layers
    from mergequant.demo import tiny_llama_config

    cfg = tiny_llama_config(hidden=cfg_spec["hidden"], intermediate=cfg_spec["intermediate"], layers=cfg_spec["layers"],
                            heads=cfg_spec["heads"], kv_heads=cfg_spec["kv_heads"], vocab=cfg_spec["vocab"])
    work = HERE / "work"
    root = work / "models" / f"{args.size}-{cfg_spec['layers']}"
    root.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    models = mb.build_models(root, cfg, rebuild=args.rebuild, log=log)
    inputs = mb.shard_files(models["base"]) + mb.shard_files(models["ft1"])
    mb.read_all(inputs)  # warm cache
    runs_dir = work / "peft-runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows, outs = [], {}
    for tool in args.tools.split(","):
        out = runs_dir / f"{tool}-r{args.rank}"
        shutil.rmtree(out, ignore_errors=True)
        if tool == "mergequant":
            cmd = [sys.executable, "-m", "mergequant", "extract-lora", str(models["ft1"]), "--base", str(models["base"]),
                   "-o", str(out), "--rank", str(args.rank), "--quiet", *args.mergequant_args.split()]
        else:
            cmd = [mb._script("mergekit-extract-lora"), "--model", str(models["ft1"]), "--base-model", str(models["base"]),
                   "--out-path", str(out), "--max-rank", str(args.rank), "--embed-lora"]
        mb.read_all(inputs)
        log(f"running {tool}: {' '.join(cmd)}")
        res = mb.run_measured(cmd, runs_dir / f"{tool}.log", env=env)
        ok = (out / "adapter_model.safetensors").exists()
        res.update(tool=tool, ok=ok, out_bytes=sum(p.stat().st_size for p in out.glob("*") if p.is_file()) if ok else 0)
        log(f"{tool}: {res['wall_s']:.1f} s, peak RssAnon {res['peak_rss_anon'] / GiB:.2f} GiB, rc {res['returncode']}"
            + ("" if ok else " (no adapter written!)"))
        rows.append(res)
        if ok:
            outs[tool] = out
    check = None if args.no_verify else check_outputs(models, outs, cfg, args.rank)
    result = {"size": args.size, "config": cfg_spec, "rank": args.rank, "machine": mb.machine_info(work),
              "loadavg": mb.loadavg(), "table": [{k: r[k] for k in ("tool", "wall_s", "peak_rss_anon", "peak_vmrss",
                                                                       "out_bytes", "returncode", "ok")} for r in rows],
              "runs": rows, "check": check, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    dest = HERE / "results" / f"peft-extract-{args.size}-{cfg_spec['layers']}.json"
    dest.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(fmt_table(rows))
    if check:
        print("\n| module | shape | optimum | " + " | ".join(outs) + " |\n|---|---|--:|" + "--:|" * len(outs))
        for r in check["modules"]:
            print(f"| {r['module']} | {r['shape']} | {r['optimum']:.4f} | "
                  + " | ".join(f"{r[t]:.4f}" if r[t] is not None else "-" for t in outs) + " |")
    print(f"\nwrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
