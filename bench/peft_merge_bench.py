#!/usr/bin/env python
"""Benchmark `mergequant merge` with a `BASE+ADAPTER` input against the same merge without one, and against
mergekit's `model+lora` (issue 12's merge benchmark), on the synthetic Llama checkpoints of bench/merge_bench.py.

This is a benchmark, not a test. One invocation:

1. builds (or reuses) the synthetic bf16 base / ft1 / ft2 of ``bench/merge_bench.py`` (same generator, same
   cache as ``bench/peft_bench.py``: bench/work/models/<size>-<layers>/), and a seeded rank-``--rank`` (64)
   LoRA on every Linear of the base's decoder layers (q, k, v, o, gate, up, down; ``lora_alpha = 2 r``,
   float32 factors) written directly as a PEFT folder (adapter_config.json + adapter_model.safetensors);
2. for each recipe (linear: ``base`` + ``ft1``; TIES: ``base_model: base``, ``ft1`` + ``ft2``) runs, interleaved
   and ``--repeat`` times:
     (a) ``mergequant merge`` of the recipe without an adapter,
     (b) ``mergequant merge`` of the same recipe with ``base+adapter`` in place of one model
         (linear: in place of ``base``; TIES: in place of ``ft2``),
     (c) ``mergekit-yaml`` with mergekit's ``model+lora`` syntax for (b)'s recipe; mergekit first writes a merged
         copy of the model into ``--lora-merge-cache`` (peft's ``merge_and_unload`` + ``save_pretrained``): the
         cache folder's size and when its last file was written are recorded, and it is deleted before each run,
   polling the process tree's RssAnon/RssFile/VmRSS every ~20 ms exactly as merge_bench does, with CPU time
   (user + sys) from wait4 and, as a cross-check, from ``resource.getrusage(RUSAGE_CHILDREN)`` deltas;
3. checks, on every tensor of the first and last layer plus embeddings / lm_head / final norm:
   (b) against an independent float64 reference (``W + s B A`` in float64, rounded once to bf16 -- the
   ``BASE+ADAPTER`` model -- then the recipe's formula in float64, rounded to bf16), (c) against the same
   reference and against (b), how much (b) differs from (a) (the adapter's effect is really there), and
   mergekit's peft-merged cache against ``W + s B A`` (so peft loads and applies this adapter as we do);
4. prints a table and writes bench/results/peft-merge-<size>-<layers>.json.

The table shows each contender's fastest run and the highest memory peak seen in any run.

Examples::

    python bench/peft_merge_bench.py --size small --repeat 2      # hidden 768, 8 layers: a few minutes
    python bench/peft_merge_bench.py --size 1b --repeat 2         # TinyLlama shapes
    python bench/peft_merge_bench.py --size 1b --methods linear   # without mergekit's slow TIES
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import merge_bench as mb  # noqa: E402  (the synthetic checkpoints and the measuring code are shared)

GiB = 1024**3
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_VERSION = 1  # bump when the synthetic adapter changes

RECIPES = {
    "linear": """\
merge_method: linear
models:
  - model: {m}
    parameters: {{weight: 0.5}}
  - model: {ft1}
    parameters: {{weight: 0.5}}
parameters:
  normalize: true
dtype: bfloat16
""",
    "ties": """\
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {m}
    parameters: {{weight: 0.5, density: 0.5}}
parameters:
  normalize: true
dtype: bfloat16
""",
}
# which model the adapted one replaces in (b)/(c), per recipe
REPLACES = {"linear": "base", "ties": "ft2"}


# ---------------------------------------------------------------------------------------------------
# the synthetic adapter
# ---------------------------------------------------------------------------------------------------
def lora_modules(cfg: dict) -> dict[str, tuple[int, int]]:
    """module name -> (out, in) for every targeted Linear of the decoder layers."""
    from mergequant.demo import llama_tensor_shapes

    out = {}
    for name, shape in llama_tensor_shapes(cfg).items():
        if name.startswith("model.layers.") and name.endswith(".weight") and name.split(".")[-2] in TARGETS:
            out[name.removesuffix(".weight")] = tuple(shape)
    return out


def lora_factors(module: str, shape: tuple[int, int], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded A [r, in] ~ N(0, 1/in), B [out, r] ~ N(0, sigma): with s = 2, s B A has elements of about 0.1 of
    the base weights' (~1/sqrt(in)), i.e. a LoRA that moves the model about as much as the synthetic fine-tunes."""
    out, inp = shape
    gen = torch.Generator().manual_seed(mb._seed_for("lora", rank, module))
    A = torch.randn(rank, inp, generator=gen) / math.sqrt(inp)
    B = torch.randn(out, rank, generator=gen) * (0.1 / (2 * math.sqrt(rank)))
    return A, B


def build_adapter(path: Path, base: Path, cfg: dict, rank: int, *, rebuild: bool, log) -> Path:
    from safetensors.torch import save_file

    spec = {"version": ADAPTER_VERSION, "rank": rank, "config": cfg, "base": str(base)}
    marker = path / "bench_spec.json"
    if not rebuild and marker.exists() and json.loads(marker.read_text()) == spec:
        return path
    t0 = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    tensors = {}
    for mod, shape in lora_modules(cfg).items():
        A, B = lora_factors(mod, shape, rank)
        tensors[f"base_model.model.{mod}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{mod}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": rank,
        "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": list(TARGETS), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "inference_mode": True, "revision": None,
    }, indent=2) + "\n")
    mb._sync_dir(path)
    marker.write_text(json.dumps(spec, indent=2) + "\n")
    log(f"built adapter {path} ({len(tensors) // 2} modules, rank {rank}) in {time.perf_counter() - t0:.1f} s")
    return path


# ---------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------
def _ref_merge(method: str, xs: list[torch.Tensor]) -> torch.Tensor:
    """float64 formula of the recipe (linear: 0.5/0.5 normalized; TIES: merge_bench's independent reference)."""
    if method == "linear":
        return (xs[0].double() * 0.5 + xs[1].double() * 0.5) / 1.0
    return mb._reference_tensor("ties", xs)


def _diff_stats(y: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, acc: dict) -> None:
    nd = int((y != ref).sum())
    acc["differing"] += nd
    acc["elements"] += ref.numel()
    if nd:
        acc["max_ulps"] = max(acc["max_ulps"], mb._ulps(y, ref, scale))
        acc["max_abs_diff"] = max(acc["max_abs_diff"], float((y - ref).abs().max()))


def _new_acc() -> dict:
    return {"differing": 0, "elements": 0, "max_ulps": 0.0, "max_abs_diff": 0.0}


def check_outputs(method: str, models: dict[str, Path], adapter: Path, outs: dict[str, Path], cfg: dict,
                  rank: int, lora_cache: Path | None) -> dict:
    from mergequant.io.checkpoint import Checkpoint

    last = cfg["num_hidden_layers"] - 1
    from mergequant.demo import llama_tensor_shapes

    names = [n for n in llama_tensor_shapes(cfg)
             if not n.startswith("model.layers.") or n.startswith(("model.layers.0.", f"model.layers.{last}."))]
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    s = acfg["lora_alpha"] / acfg["r"]
    from safetensors import safe_open

    fa = safe_open(str(adapter / "adapter_model.safetensors"), "pt")
    cks = {m: Checkpoint.open(p) for m, p in models.items()}
    got = {t: mb._open_model(p) for t, p in outs.items()}
    sub = sorted(p for p in lora_cache.iterdir() if p.is_dir()) if lora_cache is not None and lora_cache.exists() else []
    cache = mb._open_model(sub[0]) if sub else None  # mergekit's peft-merged copy: <cache>/<model>_<lora>/
    res = {"tensors": names, "scale": s, "adapted_tensors": 0}
    for t in outs:
        if t != "a":  # (a) is the recipe without the adapter: only compared with (b), below
            res[f"{t} vs reference"] = _new_acc()
            res[f"{t} vs unrounded reference"] = _new_acc()
    res["mergekit-cache vs W+sBA"] = _new_acc()
    res["cache_dtype"] = None
    res["b vs c"] = _new_acc()
    res["b vs a (adapted tensors)"] = _new_acc()
    for name in names:
        mod = name.removesuffix(".weight")
        key = f"base_model.model.{mod}.lora_A.weight"
        base = cks["base"].get(name)
        if key in fa.keys():
            A = fa.get_tensor(key).double()
            B = fa.get_tensor(f"base_model.model.{mod}.lora_B.weight").double()
            adapted64 = base.double() + s * (B @ A)
            res["adapted_tensors"] += 1
        else:
            adapted64 = base.double()
        adapted = adapted64.to(torch.bfloat16)
        if cache is not None:
            c = cache[name].get_tensor(name)
            res["cache_dtype"] = str(c.dtype)
            c = c.float().reshape(-1)
            _diff_stats(c.to(torch.bfloat16).float(), adapted.float().reshape(-1), adapted.float().abs().reshape(-1),
                        res["mergekit-cache vs W+sBA"])
        others = {m: cks[m].get(name) for m in ("base", "ft1", "ft2")}
        if method == "linear":
            xs, xs64 = [adapted, others["ft1"]], [adapted64, others["ft1"]]
        else:
            xs, xs64 = [base, others["ft1"], adapted], [base, others["ft1"], adapted64]
        xs = [x.reshape(-1) for x in xs]
        xs64 = [x.reshape(-1) for x in xs64]
        scale = torch.stack([x.float().abs() for x in xs]).amax(0)
        ref = _ref_merge(method, xs).to(torch.bfloat16).float()
        ref_unrounded = _ref_merge(method, xs64).to(torch.bfloat16).float()
        outs_t = {}
        for t, handles in got.items():
            y = handles[name].get_tensor(name).reshape(-1).float()
            outs_t[t] = y
            if t == "a":
                continue
            _diff_stats(y, ref, scale, res[f"{t} vs reference"])
            _diff_stats(y, ref_unrounded, scale, res[f"{t} vs unrounded reference"])
        if "b" in outs_t and "c" in outs_t:
            _diff_stats(outs_t["c"], outs_t["b"], scale, res["b vs c"])
        if "a" in outs_t and "b" in outs_t and key in fa.keys():
            _diff_stats(outs_t["b"], outs_t["a"], scale, res["b vs a (adapted tensors)"])
    for k, v in res.items():
        if isinstance(v, dict) and "elements" in v:
            v["fraction_differing"] = v["differing"] / max(1, v["elements"])
    return res


def peft_load_check(base: Path, adapter: Path, cfg: dict) -> dict:
    """Load the adapter with peft onto the base (transformers, bf16), merge_and_unload, compare two tensors with
    W + s B A computed here: the adapter is a valid PEFT folder that peft applies as mergequant does."""
    import peft
    from transformers import AutoModelForCausalLM

    from mergequant.io.checkpoint import Checkpoint

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(adapter))
    n_lora = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    merged = model.merge_and_unload()
    sd = merged.state_dict()
    ck = Checkpoint.open(base)
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    s = acfg["lora_alpha"] / acfg["r"]
    from safetensors import safe_open

    fa = safe_open(str(adapter / "adapter_model.safetensors"), "pt")
    worst = 0.0
    checked = []
    last = cfg["num_hidden_layers"] - 1
    for mod in ("model.layers.0.self_attn.q_proj", f"model.layers.{last}.mlp.down_proj"):
        A = fa.get_tensor(f"base_model.model.{mod}.lora_A.weight").double()
        B = fa.get_tensor(f"base_model.model.{mod}.lora_B.weight").double()
        ref = ck.get(mod + ".weight").double() + s * (B @ A)
        got = sd[mod + ".weight"].double()
        rel = float((got - ref).norm() / ref.norm())
        worst = max(worst, rel)
        checked.append({"module": mod, "rel_err": rel})
    return {"peft": peft.__version__, "lora_modules_loaded": n_lora, "checked": checked, "max_rel_err": worst,
            "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
LABELS = {"a": "mergequant, no adapter", "b": "mergequant, base+adapter", "c": "mergekit 0.1.5, model+lora"}


def fmt_table(rows: list[dict]) -> str:
    out = ["| recipe | contender | wall s | CPU s (user+sys) | peak RssAnon GiB | peak RSS GiB | wall vs (a) | CPU vs (a) "
           "| lora cache GiB | cache written by s |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        out.append(f"| {r['method']} | ({r['contender']}) {LABELS[r['contender']]} | {r['wall_s']:.2f} | {r['cpu_s']:.1f} | "
                   f"{r['peak_rss_anon'] / GiB:.2f} | {r['peak_vmrss'] / GiB:.2f} | {r['wall_vs_a']:.2f}× | "
                   f"{r['cpu_vs_a']:.2f}× | "
                   + (f"{r['cache_bytes'] / GiB:.2f} | {r['cache_written_by_s']:.1f} |" if r.get("cache_bytes") else "– | – |"))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(mb.SIZES), default="small")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--methods", default="linear,ties")
    ap.add_argument("--contenders", default="a,b,c", help="a: mergequant without adapter, b: with, c: mergekit")
    ap.add_argument("--mk-methods", default=None, help="recipes mergekit (c) runs (default: all of --methods)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--poll-ms", type=float, default=20.0)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--peft-check", action="store_true", help="also load the adapter with peft in-process (float32)")
    ap.add_argument("--mergequant-args", default="")
    ap.add_argument("--verify-only", action="store_true", help="no runs: check the outputs a previous run left")
    ap.add_argument("--run-suffix", default="", help="suffix of the work folder bench/work/peft-merge-runs/<size>-<layers>")
    ap.add_argument("--out", type=Path, help="results JSON (default bench/results/peft-merge-<size>-<layers>.json)")
    args = ap.parse_args(argv)

    shape = dict(mb.SIZES[args.size])
    if args.layers:
        shape["layers"] = args.layers
    from mergequant.demo import tiny_llama_config, llama_tensor_shapes

    cfg = tiny_llama_config(**shape)
    tag = f"{args.size}-{shape['layers']}"
    methods = [m for m in args.methods.split(",") if m]
    mk_methods = set(methods if args.mk_methods is None else [m for m in args.mk_methods.split(",") if m])
    contenders = [c for c in args.contenders.split(",") if c]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    work = HERE / "work"
    root = work / "models" / tag
    root.mkdir(parents=True, exist_ok=True)
    models = mb.build_models(root, cfg, rebuild=args.rebuild, log=log)
    adapter = build_adapter(root / f"lora-r{args.rank}", models["base"], cfg, args.rank, rebuild=args.rebuild, log=log)
    run_dir = work / "peft-merge-runs" / (tag + args.run_suffix)
    run_dir.mkdir(parents=True, exist_ok=True)
    outs_dir = run_dir / "out"
    outs_dir.mkdir(exist_ok=True)
    cache_dir = run_dir / "mk-lora-cache"

    recipes = {}
    for m in methods:
        for c in contenders:
            sub = {k: str(v) for k, v in models.items()}
            if c == "a":
                sub["m"] = str(models[REPLACES[m]])
            else:
                sub["m"] = f"{models['base']}+{adapter}"
            recipes[m, c] = run_dir / f"{m}-{c}.yaml"
            recipes[m, c].write_text(RECIPES[m].format(**sub))

    n_params = sum(math.prod(s) for s in llama_tensor_shapes(cfg).values())
    inputs = [f for p in models.values() for f in mb.shard_files(p)] + [adapter / "adapter_model.safetensors"]
    info = mb.machine_info(work)
    log(f"models: {n_params / 1e9:.3f}B params, adapter {(adapter / 'adapter_model.safetensors').stat().st_size / 2**20:.1f} MiB "
        f"(rank {args.rank}, {len(lora_modules(cfg))} modules); torch {info['torch']}, mergekit {info['mergekit']}, "
        f"load {mb.loadavg()}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    mq, mk = mb._script("mergequant"), mb._script("mergekit-yaml")

    def command(method, c, out):
        if c in ("a", "b"):
            return [mq, "merge", str(recipes[method, c]), "-o", str(out), "--device", "cpu", "--quiet", "--force",
                    *args.mergequant_args.split()]
        return [mk, str(recipes[method, c]), str(out), "--quiet", "--lora-merge-cache", str(cache_dir)]

    mb.read_all(inputs)  # warm the page cache
    runs = []
    for rep in range(0 if args.verify_only else args.repeat):
        for method in methods:
            for c in contenders:
                if c == "c" and method not in mk_methods:
                    continue
                out = outs_dir / f"{method}-{c}"
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(cache_dir, ignore_errors=True)
                mb.read_all(inputs)
                la = mb.loadavg()
                ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                wall0 = time.time()
                r = mb.run_measured(command(method, c, out), run_dir / f"{method}-{c}.log", args.poll_ms / 1000, env)
                ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                if r["returncode"] != 0:
                    log((run_dir / f"{method}-{c}.log").read_text()[-3000:])
                    raise SystemExit(f"({c}) {method} failed with exit code {r['returncode']}")
                t0 = time.perf_counter()
                mb._sync_dir(out)
                r["post_fsync_s"] = time.perf_counter() - t0
                r["out_bytes"], _ = mb.dir_bytes(out)
                r["rusage_children_user_s"] = ru1.ru_utime - ru0.ru_utime
                r["rusage_children_sys_s"] = ru1.ru_stime - ru0.ru_stime
                r["cpu_s"] = r["rusage_children_user_s"] + r["rusage_children_sys_s"]
                if c == "c" and cache_dir.exists():
                    files = [p for p in cache_dir.rglob("*") if p.is_file()]
                    r["cache_bytes"], r["cache_allocated_bytes"] = mb.dir_bytes(cache_dir)
                    r["cache_written_by_s"] = max(p.stat().st_mtime for p in files) - wall0 if files else None
                    r["cache_files"] = len(files)
                r.update(method=method, contender=c, repeat=rep, loadavg_before=la)
                runs.append(r)
                log(f"[{rep + 1}/{args.repeat}] {method:6s} ({c}) {r['wall_s']:7.2f} s  CPU {r['cpu_s']:6.1f} s  "
                    f"RssAnon {r['peak_rss_anon'] / GiB:.2f} GiB (at {r['peak_rss_anon_at_s']:.1f} s)  VmRSS "
                    f"{r['peak_vmrss'] / GiB:.2f} GiB  load {la[0] if la else '?'}"
                    + (f"  lora cache {r['cache_bytes'] / GiB:.2f} GiB written by {r['cache_written_by_s']:.1f} s"
                       if r.get("cache_bytes") else ""))

    rows = []
    for method in methods:
        for c in contenders:
            mine = [r for r in runs if r["method"] == method and r["contender"] == c]
            if not mine:
                continue
            best = min(mine, key=lambda r: r["wall_s"])
            row = {"method": method, "contender": c, "label": LABELS[c], "wall_s": best["wall_s"],
                   "walls_s": [r["wall_s"] for r in mine], "cpu_s": min(r["cpu_s"] for r in mine),
                   "cpus_s": [r["cpu_s"] for r in mine],
                   "wait4_cpu_s": min(r["user_s"] + r["sys_s"] for r in mine)}
            for k in ("peak_rss_anon", "peak_vmrss", "peak_rss_file", "out_bytes"):
                row[k] = max(r[k] for r in mine)
            if c == "c":
                row["cache_bytes"] = max(r.get("cache_bytes", 0) for r in mine)
                row["cache_written_by_s"] = min(r.get("cache_written_by_s") or 0 for r in mine)
            rows.append(row)
    for row in rows:
        a = next((r for r in rows if r["method"] == row["method"] and r["contender"] == "a"), None)
        row["wall_vs_a"] = row["wall_s"] / a["wall_s"] if a else float("nan")
        row["cpu_vs_a"] = row["cpu_s"] / a["cpu_s"] if a else float("nan")

    verify = {}

    def write_result():
        result = {
            "size": args.size, "layers": shape["layers"], "config": cfg, "params_per_model": n_params, "rank": args.rank,
            "adapter": str(adapter), "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
            "repeat": args.repeat, "poll_ms": args.poll_ms, "machine": info, "loadavg_end": mb.loadavg(),
            "mergequant_source_end": mb.source_digest(),
            "recipes": {f"{m}-{c}": recipes[m, c].read_text() for (m, c) in recipes},
            "commands": {f"{m}-{c}": command(m, c, outs_dir / f"{m}-{c}") for (m, c) in recipes},
            "table": rows, "runs": runs, "verify": verify,
        }
        dest = args.out or HERE / "results" / f"peft-merge-{tag}.json"
        if args.verify_only:
            dest = run_dir / "verify-only.json"
        dest.write_text(json.dumps(result, indent=2, default=str) + "\n")
        return dest

    if not args.verify_only:
        log(f"runs done, wrote {write_result()} (verification follows)")
        log(fmt_table(rows))
    if not args.no_verify:
        for method in methods:
            outs = {c: outs_dir / f"{method}-{c}" for c in contenders if (outs_dir / f"{method}-{c}").exists()
                    and (c != "c" or method in mk_methods)}
            t0 = time.perf_counter()
            v = check_outputs(method, models, adapter, outs, cfg, args.rank, cache_dir)  # the cache is base+adapter
            verify[method] = v
            log(f"verify {method} ({len(v['tensors'])} tensors, {v['adapted_tensors']} adapted, "
                f"{time.perf_counter() - t0:.1f} s): " + "; ".join(
                    f"{k}: {d['fraction_differing'] * 100:.4f}% differ (max {d['max_ulps']:.3g} ulp)"
                    for k, d in v.items() if isinstance(d, dict) and d.get("elements")))
        if args.peft_check:
            verify["peft_load"] = peft_load_check(models["base"], adapter, cfg)
            log(f"peft load check: {verify['peft_load']}")

    print()
    print(f"## {tag}: {n_params / 1e9:.3f}B params/model, rank-{args.rank} LoRA on {len(lora_modules(cfg))} Linears "
          f"({(adapter / 'adapter_model.safetensors').stat().st_size / 2**20:.1f} MiB); best of {args.repeat}, warm page cache")
    print(fmt_table(rows))
    dest = write_result()
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
