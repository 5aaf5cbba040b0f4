#!/usr/bin/env python
"""The GPU check (issue 16): mergequant's CUDA paths on a real accelerator, timed against GPTQModel.

Run it through ``bench/gpu_check.sh`` on the GPU machine (that script installs what is missing first),
or ``python bench/gpu_check.py --dry-run`` anywhere: the dry run goes through the same code paths on the
CPU with tiny shapes (2 layers, hidden 256), prints what it would run on the GPU and writes its JSON under
``bench/work/gpu-check-dry/`` (never over the real results).

Phases, in this order (``--phases`` picks some); each writes ``bench/results/gpu-<phase>.json`` and
``gpu-check.json`` holds them all:

1. **tests**: ``pytest -m gpu`` on the test files that hold ``gpu``-marked tests (``tests/test_gpu.py``: CUDA vs
   CPU equality of the merge kernels' torch path, GPTQ on one layer, GPTQ and AWQ of a tiny Llama, routed
   MoE, the shard writer from CUDA tensors), counted from JUnit XML.
2. **merge**: three synthetic TinyLlama-shaped checkpoints (1.1B parameters, bf16, drawn on the GPU) merged
   with TIES and linear (``bench/merge_bench.py``'s recipes) by ``mergequant merge --device cpu`` and
   ``--device cuda``; the two outputs are compared tensor by tensor: bytes, values, max |diff|, bf16 ulps.
   Expected: TIES equal in value (the CUDA torch path and the CPU numba kernel do the same float32
   operations in the same order); linear within one bf16 ulp (CUDA contracts ``out + w * x`` into one FMA,
   the kernel rounds the product first, so a float32 sum can differ in its last bit and, rarely, flip
   the bf16 rounding).
3. **moe**: ``mergequant quantize --method gptq`` of a tiny Mixtral (``shared/models/moe-mixtral/base`` when
   found, else a random one) on CUDA with all-token calibration, on the CPU for comparison (fraction of
   4-bit codes that differ; float tensors byte-equal), and on CUDA with routed calibration and
   ``--moe-min-share 0.9``, which sends starved experts to the round-to-nearest fallback.
4. **quant**: a synthetic Mistral-7B-shaped Llama (32 layers, hidden 4096, MLP 14336, vocab 32000; 7.24B
   parameters, bf16, drawn on the GPU, 4 shards, the bundled tokenizer) quantized w4g128 from 128 x 2048
   calibration tokens (the text shipped in ``mergequant/data/``) by mergequant GPTQ, GPTQModel 7.7 GPTQ
   (same model files, same token windows from ``calibration_batch``, same batch, desc_act off,
   ``act_group_aware=False``, damp 0.01) and mergequant AWQ, in that order (GPTQModel can be left out with
   ``--skip-gptqmodel``; AWQ's CUDA path is also covered by the tests phase, so this run is for its timing).

Measurement (as ``bench/quant_bench.py``): every tool runs as its own subprocess; wall time from start to
exit; peak RssAnon of the process tree polled every 20 ms; GPU memory both device-wide (NVML, peak minus
the level before the run: includes the CUDA context and the caching allocator's reserve) and from inside
the process (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``, printed at exit by a small
wrapper). The wrapper also prints a timestamp when each decoder layer is done (mergequant: the runner's
``free_layer``; GPTQModel: a forward pre-hook when each layer starts), so a run stopped at its time cap
still gives layers done, time per layer, and a projection for the whole model.

Budget: the GPU machine is lent for minutes, so the whole check runs under ``--budget-s`` (default 480 s)
and every quantization under its own cap (``--gptq-cap-s`` etc.). A run that hits its cap is stopped
(SIGTERM, then SIGKILL): its wall time is a lower bound, and the projection says what the whole model
would take at the measured per-layer rate. The phases run cheapest-first so that the correctness checks
always finish; the 8B runs take whatever time is left, up to their caps.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import gpu_synth  # noqa: E402
from merge_bench import RECIPES, _status, _tree, loadavg, source_digest  # noqa: E402

MiB = 2**20
GiB = 2**30
PHASES = ("tests", "merge", "moe", "quant")
MARK = "GPUCHECK "

# --------------------------------------------------------------------------------------------- profiles


@dataclasses.dataclass
class Profile:
    """Everything that differs between the GPU run and the CPU dry run."""

    name: str
    device: str  # where the "accelerator" side runs: cuda, or cpu in the dry run
    merge_shape: dict
    quant_shape: dict
    quant_shards: int
    samples: int
    seqlen: int
    batch_size: int  # calibration windows per forward, the same for every tool
    moe_samples: int
    moe_seqlen: int
    budget_s: float
    caps: dict  # seconds per run: tests, merge, moe, gptq, gptqmodel, awq
    tests: list[str]  # pytest targets (empty: every test file with gpu-marked tests)


GPU = Profile(
    "gpu", "cuda", gpu_synth.SHAPES["1b"], gpu_synth.SHAPES["8b"], 4, samples=128, seqlen=2048, batch_size=8,
    moe_samples=32, moe_seqlen=256, budget_s=480,
    caps={"tests": 120, "merge": 150, "moe": 90, "gptq": 120, "gptqmodel": 90, "awq": 60},
    tests=[])  # the files of tests/ that hold gpu-marked tests (gpu_test_files)
DRY = Profile(
    "dry-run", "cpu", gpu_synth.SHAPES["tiny"], gpu_synth.SHAPES["tiny"], 2, samples=4, seqlen=128, batch_size=2,
    moe_samples=4, moe_seqlen=64, budget_s=600,
    caps={"tests": 120, "merge": 120, "moe": 120, "gptq": 120, "gptqmodel": 300, "awq": 120},
    tests=["tests/test_gpu.py"])  # the gpu-marked tests only (they skip here); the whole suite is collected on the GPU

RESERVE_S = 8  # kept back from the budget for writing the results
MIN_RUN_S = 20  # a capped run shorter than this measures nothing useful: skipped instead (GPU profile)

# --------------------------------------------------------------------------------------------- wrappers

# Runs `mergequant ARGS...` in-process and prints a GPUCHECK line (JSON) when each decoder layer is done and
# at exit (CUDA allocator peaks). mergequant turns SIGTERM into a clean exit (status 143), so a run stopped
# at its cap still prints its exit line.
MERGEQUANT_WRAPPER = r"""
import atexit, json, sys, time
T0 = time.time()
def mark(event, **kw):
    print("GPUCHECK " + json.dumps({"event": event, "t": round(time.time() - T0, 3), **kw}), flush=True)
def cuda_mem():
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return {"cuda_max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                    "cuda_max_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1)}
    except Exception:
        pass
    return {}
atexit.register(lambda: mark("exit", **cuda_mem()))
if sys.argv[1:2] == ["quantize"]:
    import mergequant.quant.runner as R
    _free_layer = R.LayerRunner.free_layer
    def free_layer(self, i):
        _free_layer(self, i)
        mark("layer", i=i, n=self.num_layers, **cuda_mem())
    R.LayerRunner.free_layer = free_layer
sys.argv = ["mergequant", *sys.argv[1:]]
from mergequant.cli import main
main()
"""

# GPTQModel on the same files and token windows as mergequant (bench/quant_bench.py's script, on any device,
# with the same GPUCHECK lines: one when each decoder layer is first called, and at exit).
GPTQMODEL_SCRIPT = r"""
import atexit, json, os, shutil, signal, sys, time
T0 = time.time()
def mark(event, **kw):
    print("GPUCHECK " + json.dumps({"event": event, "t": round(time.time() - T0, 3), **kw}), flush=True)
def cuda_mem():
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return {"cuda_max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                    "cuda_max_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1)}
    except Exception:
        pass
    return {}
signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
atexit.register(lambda: mark("exit", **cuda_mem()))
model_dir, calib, out, bits, gs, samples, seqlen, seed, batch, device = sys.argv[1:11]
bits, gs, samples, seqlen, seed, batch = int(bits), int(gs), int(samples), int(seqlen), int(seed), int(batch)
if device == "cpu":
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
from transformers import AutoTokenizer
from mergequant.quant.calib import calibration_batch
from gptqmodel import GPTQModel, QuantizeConfig
mark("imported")
tok = AutoTokenizer.from_pretrained(model_dir)
windows = calibration_batch(calib, tok, samples=samples, seqlen=seqlen, seed=seed)
data = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in windows]
qcfg = QuantizeConfig(bits=bits, group_size=gs, desc_act=False, sym=True, damp_percent=0.01, act_group_aware=False)
model = GPTQModel.load(model_dir, qcfg, device=device)
mark("loaded", **cuda_mem())
started = set()
def layer_start(i, n):
    if i not in started:
        started.add(i)
        mark("layer_start", i=i, n=n, **cuda_mem())
try:  # GPTQModel 7.7's per-layer loop iterates a progress bar: mark each layer index as it starts
    import gptqmodel.looper.module_looper as ML
    _run_layer_stage = ML.run_layer_stage
    class MarkedBar:
        def __init__(self, pb, n):
            self._pb, self._n = pb, n
        def __iter__(self):
            for i in self._pb:
                layer_start(i, self._n)
                yield i
        def __len__(self):
            return len(self._pb)
        def __getattr__(self, name):
            return getattr(self._pb, name)
    def run_layer_stage(looper, *a, pb=None, layer_count=None, **kw):
        return _run_layer_stage(looper, *a, pb=MarkedBar(pb, layer_count), layer_count=layer_count, **kw)
    ML.run_layer_stage = run_layer_stage
except Exception as e:
    mark("no_loop_marks", error=repr(e)[:200])
try:  # and, as a fallback, the first call of each decoder layer
    layers = model.model.model.layers
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i, n=len(layers): layer_start(i, n))
except Exception as e:
    mark("no_layer_hooks", error=repr(e)[:200])
t1 = time.time()
model.quantize(data, batch_size=batch)
mark("quantized", quantize_s=round(time.time() - t1, 2), **cuda_mem())
shutil.rmtree(out, ignore_errors=True)
model.save(out)
mark("saved")
"""

# --------------------------------------------------------------------------------------------- measuring


class GpuMemory:
    """Device-wide used memory of GPU 0 through NVML (pynvml), or nothing where there is none."""

    def __init__(self):
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            self.handle = None

    def used_mib(self) -> float | None:
        if self.handle is None:
            return None
        try:
            return self._nvml.nvmlDeviceGetMemoryInfo(self.handle).used / MiB
        except Exception:
            return None


GPU_MEM = None


def _rss_anon_kb(pid: int) -> int:
    return _status(pid).get("RssAnon", 0) // 1024


def run_measured(cmd: list[str], *, log: Path, timeout_s: float | None, env: dict | None = None,
                 echo=None) -> dict:
    """Run ``cmd`` (own process group, cwd = the repo); returns wall time, whether it was stopped at
    ``timeout_s``, peaks (RssAnon of the process tree, GPU memory device-wide and from the process's
    GPUCHECK lines) and the GPUCHECK events with their arrival times. Output goes to ``log``."""
    gpu = GPU_MEM
    base_gpu = gpu.used_mib() if gpu else None
    events: list[dict] = []
    tail: list[str] = []
    peak_kb = 0
    peak_gpu = base_gpu
    done = threading.Event()
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True)

    decoder = json.JSONDecoder()

    def read():
        with open(log, "w") as f:
            for line in proc.stdout:
                f.write(line)
                at = line.find(MARK)  # progress bars (GPTQModel's) may leave text before it on the same line
                if at >= 0:
                    try:
                        ev, _ = decoder.raw_decode(line, at + len(MARK))
                    except ValueError:
                        continue
                    ev["at_s"] = round(time.perf_counter() - t0, 2)
                    events.append(ev)
                    if echo and ev.get("event") in ("layer", "layer_start"):
                        echo(f"    {ev['event']} {ev.get('i')}/{ev.get('n')} at {ev['at_s']:.1f} s")
                else:
                    tail.append(line.rstrip("\n"))
                    del tail[:-40]

    def poll():
        nonlocal peak_kb, peak_gpu
        k = 0
        while not done.is_set():
            peak_kb = max(peak_kb, sum(_rss_anon_kb(p) for p in _tree(proc.pid)))
            if gpu and k % 5 == 0:
                u = gpu.used_mib()
                if u is not None:
                    peak_gpu = max(peak_gpu or 0.0, u)
            k += 1
            time.sleep(0.02)

    reader = threading.Thread(target=read, daemon=True)
    poller = threading.Thread(target=poll, daemon=True)
    reader.start()
    poller.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop(proc)
    except BaseException:
        _stop(proc)
        raise
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    reader.join(timeout=10)
    exit_ev = next((e for e in reversed(events) if e.get("event") == "exit"), {})
    res = {"cmd": [str(c) for c in cmd], "returncode": proc.returncode, "timed_out": timed_out,
           "wall_s": round(wall, 2), "peak_rss_anon_mib": round(peak_kb / 1024, 1),
           "gpu_used_peak_mib": None if base_gpu is None or peak_gpu is None else round(peak_gpu - base_gpu, 1),
           "cuda_max_allocated_mib": exit_ev.get("cuda_max_allocated_mib"),
           "cuda_max_reserved_mib": exit_ev.get("cuda_max_reserved_mib"),
           "events": [e for e in events if e.get("event") != "exit"], "log": str(log)}
    if proc.returncode not in (0, None) and not timed_out:
        res["output_tail"] = tail[-25:]
    return res


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the run's process group (mergequant cleans up its partial output), SIGKILL after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def layer_progress(run: dict, layers_total: int) -> dict:
    """Layers done, time per layer and a whole-model projection from a run's GPUCHECK events.

    mergequant marks each layer when it is done; GPTQModel when each layer starts (so layer i started
    means i layers done). Per-layer time: the median interval between consecutive marks (the first
    interval also holds start-up, imports and calibration capture, so it is left out)."""
    done = [(e["i"], e["at_s"]) for e in run["events"] if e.get("event") == "layer"]
    starts = [(e["i"], e["at_s"]) for e in run["events"] if e.get("event") == "layer_start"]
    if done:
        marks, layers_done = done, len(done)
    elif starts:
        marks = starts
        layers_done = layers_total if run["returncode"] == 0 and not run["timed_out"] else max(i for i, _ in starts)
    else:
        return {"layers_total": layers_total, "layers_done": layers_total if run["returncode"] == 0 else None}
    times = [t for _, t in marks]
    gaps = [b - a for a, b in zip(times, times[1:])]
    per_layer = statistics.median(gaps) if gaps else None
    out = {"layers_total": layers_total, "layers_done": layers_done, "first_mark_s": times[0],
           "per_layer_s": None if per_layer is None else round(per_layer, 2)}
    if per_layer is not None and (run["timed_out"] or run["returncode"] != 0):
        last_i, last_t = marks[-1]
        remaining = layers_total - (last_i + 1) if done else layers_total - last_i
        # never below the time the run was given: that much it took for certain
        out["projected_total_s"] = round(max(last_t + remaining * per_layer, run["wall_s"]), 1)
        out["projection"] = ("time of the last mark + remaining layers x median per-layer time (at least the wall "
                             "time when stopped); excludes anything after the last layer (GPTQModel packs and saves then)")
    return out


# --------------------------------------------------------------------------------------------- context


class Context:
    def __init__(self, args, profile: Profile):
        self.args, self.profile = args, profile
        self.dry = args.dry_run
        self.work: Path = args.work
        self.results: Path = args.results
        self.t0 = time.perf_counter()
        self.budget = args.budget_s if args.budget_s is not None else profile.budget_s
        self.gen_device = torch.device("cuda" if torch.cuda.is_available() and not self.dry else "cpu")
        self.issues: list[str] = []
        self.work.mkdir(parents=True, exist_ok=True)
        self.results.mkdir(parents=True, exist_ok=True)

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {msg}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def cap(self, kind: str) -> float | None:
        """Seconds the next run of ``kind`` may take: its cap, clipped to what is left of the budget; None
        when too little is left for a useful run."""
        cap = getattr(self.args, f"{kind}_cap_s", None) or self.profile.caps[kind]
        left = self.budget - self.elapsed() - RESERVE_S
        floor = 0 if self.dry else MIN_RUN_S
        if left < floor:
            return None
        return max(1.0, min(cap, left))

    def issue(self, msg: str) -> None:
        self.issues.append(msg)
        self.log(f"ISSUE: {msg}")


def python() -> str:
    return sys.executable


def mergequant_cmd(*args) -> list[str]:
    return [python(), "-c", MERGEQUANT_WRAPPER, *map(str, args)]


def quantize_args(model: Path, out: Path, method: str, device: str, calib: Path, samples: int, seqlen: int,
                  batch: int, *extra) -> list[str]:
    a = ["quantize", model, "-o", out, "--method", method, "--bits", "4", "--group-size", "128",
         "--samples", samples, "--seqlen", seqlen, "--seed", "0", "--device", device, "--quiet", "--force",
         "--calib", calib, "--batch-size", batch]
    if method == "gptq":
        a += ["--damp", "0.01"]
    return [*map(str, a), *map(str, extra)]


def gptqmodel_cmd(model: Path, calib: Path, out: Path, samples: int, seqlen: int, batch: int, device: str) -> list[str]:
    return [python(), "-c", GPTQMODEL_SCRIPT, str(model), str(calib), str(out), "4", "128", str(samples), str(seqlen),
            "0", str(batch), device]


def gpu_test_files() -> list[str]:
    """The test files that hold gpu-marked tests (collecting the whole suite would import every module, some
    of them slow or needing packages the GPU image lacks); the whole tests/ folder when none is found."""
    found = sorted(f"tests/{f.name}" for f in (ROOT / "tests").glob("test_*.py")
                   if "mark.gpu" in f.read_text(encoding="utf-8", errors="replace"))
    return found or ["tests"]


def pytest_cmd(targets: list[str], xml: Path) -> list[str]:
    # -n 0: one process (the suite's default is parallel workers), so GPU tests never share the device
    return [python(), "-m", "pytest", "-q", "-n", "0", "-m", "gpu", *targets, "-p", "no:cacheprovider",
            "--continue-on-collection-errors", f"--junitxml={xml}", "-o", "junit_family=xunit1"]


def calib_text(work: Path) -> Path:
    """The calibration text: the demo's prose and verse shipped in mergequant/data/ (~700 KB)."""
    data = ROOT / "mergequant" / "data"
    p = work / "calib.txt"
    text = "\n\n".join((data / f).read_text(encoding="utf-8") for f in ("demo-prose.txt", "demo-verse.txt"))
    if not p.exists() or p.read_text(encoding="utf-8") != text:
        p.write_text(text, encoding="utf-8")
    return p


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# --------------------------------------------------------------------------------------------- phase: tests


def parse_junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfailed": 0}
    cases = []
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return {"counts": counts, "cases": [], "junit_error": str(e)}
    for c in root.iter("testcase"):
        kids = {k.tag: k for k in c}
        if "failure" in kids:
            status = "failed"
        elif "error" in kids:
            status = "error"
        elif "skipped" in kids:
            status = "xfailed" if kids["skipped"].get("type") == "pytest.xfail" else "skipped"
        else:
            status = "passed"
        counts[status] += 1
        case = {"test": f"{c.get('classname')}::{c.get('name')}", "status": status,
                "time_s": round(float(c.get("time") or 0), 2)}
        child = kids.get({"failed": "failure", "error": "error"}.get(status, "skipped"))
        if child is not None and status != "passed":
            case["message"] = (child.get("message") or (child.text or ""))[:400]
        cases.append(case)
    return {"counts": counts, "cases": cases}


def phase_tests(ctx: Context) -> dict:
    cap = ctx.cap("tests")
    if cap is None:
        return {"status": "skipped", "reason": "budget"}
    xml = ctx.work / "gpu-tests.xml"
    xml.unlink(missing_ok=True)
    cmd = pytest_cmd(ctx.profile.tests or gpu_test_files(), xml)
    ctx.log("tests: " + " ".join(cmd[1:]))
    run = run_measured(cmd, log=ctx.work / "logs" / "tests.log", timeout_s=cap)
    parsed = parse_junit(xml)
    text = Path(run["log"]).read_text(errors="replace") if Path(run["log"]).exists() else ""
    summary = next((ln.strip() for ln in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed|skipped|error)", ln)), "")
    res = {"command": cmd, "returncode": run["returncode"], "timed_out": run["timed_out"], "wall_s": run["wall_s"],
           **parsed, "summary": summary,
           "gpu_marker_registered": "Unknown pytest.mark.gpu" not in text,
           "collection_errors": re.findall(r"ERROR collecting (\S+)", text)}
    bad = parsed["counts"]["failed"] + parsed["counts"]["error"]
    res["status"] = "ok" if not bad and not run["timed_out"] and run["returncode"] in (0, 5) else "failed"
    if not res["gpu_marker_registered"]:
        ctx.log("tests: the `gpu` marker is not registered in pyproject.toml (selection by -m gpu works anyway)")
    for c in parsed["cases"]:
        if c["status"] in ("failed", "error"):
            ctx.issue(f"test {c['test']} {c['status']}: {c.get('message', '')[:200]}")
    ctx.log(f"tests: {summary or parsed['counts']} ({run['wall_s']:.1f} s)")
    return res


# --------------------------------------------------------------------------------------------- phase: merge


def _ordered(bits16: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 bit patterns (int16) -> int32 keys whose differences count representable steps (ulps)."""
    b = bits16.to(torch.int32)
    return torch.where(b < 0, -(b & 0x7FFF), b)


def compare_models(a_dir: Path, b_dir: Path, device: torch.device) -> dict:
    """Tensor by tensor: bytes, values (-0.0 == 0.0), max |diff|, max distance in ulps (16-bit dtypes)."""
    from merge_bench import _open_model

    a, b = _open_model(a_dir), _open_model(b_dir)
    res = {"same_names": sorted(a) == sorted(b), "tensors": 0, "tensors_byte_identical": 0, "elements": 0,
           "elements_bytes_differ": 0, "elements_values_differ": 0, "max_abs_diff": 0.0, "max_ulps": 0,
           "worst_tensor": None, "dtype_or_shape_mismatch": []}
    for name in sorted(set(a) & set(b)):
        x, y = a[name].get_tensor(name), b[name].get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            res["dtype_or_shape_mismatch"].append(name)
            continue
        x, y = x.reshape(-1).to(device), y.reshape(-1).to(device)
        res["tensors"] += 1
        res["elements"] += x.numel()
        if x.element_size() == 2:
            xb, yb = x.view(torch.int16), y.view(torch.int16)
            nbytes = int((xb != yb).sum())
            ulps = int((_ordered(xb) - _ordered(yb)).abs().max()) if nbytes else 0
        else:
            nbytes = int((x.view(torch.uint8).reshape(x.numel(), -1) != y.view(torch.uint8).reshape(y.numel(), -1)).any(1).sum())
            ulps = None
        xf, yf = x.float(), y.float()
        nvals = int((xf != yf).sum())
        diff = float((xf - yf).abs().max()) if nvals else 0.0
        res["tensors_byte_identical"] += nbytes == 0
        res["elements_bytes_differ"] += nbytes
        res["elements_values_differ"] += nvals
        if ulps is not None:
            res["max_ulps"] = max(res["max_ulps"], ulps)
        if diff > res["max_abs_diff"]:
            res["max_abs_diff"], res["worst_tensor"] = diff, name
        del x, y, xf, yf
    res["fraction_values_differ"] = res["elements_values_differ"] / max(1, res["elements"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


MERGE_EXPECTED = {
    "ties": ("values equal (max |diff| 0): the same float32 operations in the same order on both paths",
             lambda c: c["elements_values_differ"] == 0),
    "linear": ("within 1 bf16 ulp: CUDA fuses out + w*x into one FMA, the CPU kernel rounds w*x first",
               lambda c: c["max_ulps"] <= 1),
}


def free_gpu() -> None:
    """Hand the driver's cached GPU blocks back (tensors drawn for the synthetic models, comparisons)
    before a measured run, so that they do not sit in the device-wide numbers' baseline."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def warm_numba(ctx: Context) -> float:
    """Compile mergequant's fused CPU merge kernels once, untimed (numba caches them on disk, next to
    kernels.py): on a fresh machine the first CPU merge would otherwise include the compilation."""
    from mergequant.merge.run import MergeOptions, run_merge

    t = time.perf_counter()
    root = ctx.work / "merge-warmup"
    tiny = dict(gpu_synth.SHAPES["tiny"], layers=1)
    models = {v: gpu_synth.build_llama(root / v, tiny, device="cpu", variant=v, shards=1, log=lambda m: None)[0]
              for v in ("base", "ft1", "ft2")}
    for method in ("ties", "linear"):
        recipe = root / f"{method}.yaml"
        recipe.write_text(RECIPES[method].format(**{k: str(v) for k, v in models.items()}))
        run_merge(recipe, MergeOptions(out=root / f"out-{method}", device="cpu", quiet=True, force=True, fsync=False),
                  log=lambda m: None)
    return round(time.perf_counter() - t, 1)


def phase_merge(ctx: Context) -> dict:
    p = ctx.profile
    root = ctx.work / "merge-models" / ("x".join(str(p.merge_shape[k]) for k in ("hidden", "intermediate", "layers")))
    models, build_s = {}, {}
    for v in ("base", "ft1", "ft2"):
        models[v], build_s[v] = gpu_synth.build_llama(root / v, p.merge_shape, device=ctx.gen_device, variant=v,
                                                      shards=2, log=ctx.log)
    cfg = gpu_synth.llama_config(p.merge_shape)
    free_gpu()
    warm = warm_numba(ctx)
    ctx.log(f"numba's merge kernels ready in {warm} s (untimed warm-up)")
    res = {"model": {"shape": p.merge_shape, "parameters": gpu_synth.parameter_count(cfg),
                     "bytes_per_model": dir_bytes(models["base"]), "drawn_on": ctx.gen_device.type,
                     "build_s": build_s},
           "numba_warmup_s": warm, "methods": {}}
    outs = ctx.work / "merge-out"
    for method in ("ties",) if ctx.args.quick else ("ties", "linear"):
        recipe = ctx.work / f"merge-{method}.yaml"
        recipe.write_text(RECIPES[method].format(**{k: v for k, v in zip(("base", "ft1", "ft2"), models.values())}))
        entry = {"recipe": RECIPES[method].format(base="BASE", ft1="FT1", ft2="FT2"), "runs": {}}
        for side, dev in (("cpu", "cpu"), ("cuda", p.device)):
            cap = ctx.cap("merge")
            if cap is None:
                entry["runs"][side] = {"skipped": "budget"}
                continue
            out = outs / f"{method}-{side}"
            cmd = mergequant_cmd("merge", recipe, "-o", out, "--device", dev, "--quiet", "--force")
            ctx.log(f"merge {method} --device {dev}")
            run = run_measured(cmd, log=ctx.work / "logs" / f"merge-{method}-{side}.log", timeout_s=cap)
            run.pop("events")
            run["device"] = dev
            run["out_bytes"] = dir_bytes(out)
            entry["runs"][side] = run
            ctx.log(f"  {run['wall_s']:.1f} s, peak RssAnon {run['peak_rss_anon_mib']:.0f} MiB, GPU "
                    f"{run['gpu_used_peak_mib']} MiB (device-wide), rc {run['returncode']}")
            if run["returncode"] != 0:
                ctx.issue(f"merge {method} --device {dev} failed (rc {run['returncode']}, timed out {run['timed_out']}): "
                          + " | ".join(run.get("output_tail", [])[-3:]))
        ok_runs = all(entry["runs"].get(s, {}).get("returncode") == 0 for s in ("cpu", "cuda"))
        if ok_runs:
            cmp = compare_models(outs / f"{method}-cpu", outs / f"{method}-cuda", ctx.gen_device)
            expect, check = MERGE_EXPECTED[method]
            cmp["expected"] = expect
            cmp["as_expected"] = bool(check(cmp) and cmp["same_names"] and not cmp["dtype_or_shape_mismatch"])
            entry["cpu_vs_cuda"] = cmp
            entry["speedup_cuda_over_cpu"] = round(entry["runs"]["cpu"]["wall_s"] / entry["runs"]["cuda"]["wall_s"], 2)
            ctx.log(f"  cpu vs {p.device}: {cmp['tensors_byte_identical']}/{cmp['tensors']} tensors byte-identical, "
                    f"{cmp['elements_values_differ']} values differ, max |diff| {cmp['max_abs_diff']:.3g}, "
                    f"max {cmp['max_ulps']} ulp -> {'as expected' if cmp['as_expected'] else 'NOT as expected'}")
            if not cmp["as_expected"]:
                ctx.issue(f"merge {method}: CUDA output differs from the CPU output more than expected ({expect})")
        if not ctx.args.keep:
            for side in ("cpu", "cuda"):
                shutil.rmtree(outs / f"{method}-{side}", ignore_errors=True)
        res["methods"][method] = entry
    statuses = [m.get("cpu_vs_cuda", {}).get("as_expected") for m in res["methods"].values()]
    res["status"] = "ok" if all(s is True for s in statuses) else ("partial" if any(s is None for s in statuses) else "failed")
    return res


# --------------------------------------------------------------------------------------------- phase: moe


def find_moe_model(args) -> Path | None:
    cands = [args.moe_model] if args.moe_model else []
    env = os.environ.get("MERGEQUANT_MOE_MODEL")
    cands += [Path(env)] if env else []
    cands += [ROOT.parent / "shared" / "models" / "moe-mixtral" / "base", Path("/work/shared/models/moe-mixtral/base"),
              ROOT / "shared" / "models" / "moe-mixtral" / "base", HERE / "work" / "gpu-carry" / "moe-mixtral-base"]
    return next((Path(c) for c in cands if c and (Path(c) / "config.json").exists()), None)


def compare_quantized(a_dir: Path, b_dir: Path) -> dict:
    """Two GPTQ checkpoints of the same model: fraction of 4-bit codes that differ (and by how much), and
    whether every float tensor (norms, embeddings, routers, scales excluded) is byte-identical."""
    from merge_bench import _open_model
    from mergequant.quant import formats

    a, b = _open_model(a_dir), _open_model(b_dir)
    res = {"same_names": sorted(a) == sorted(b), "modules": 0, "codes": 0, "codes_differ": 0, "max_code_diff": 0,
           "float_tensors": 0, "float_tensors_differ": []}
    for name in sorted(set(a) & set(b)):
        x, y = a[name].get_tensor(name), b[name].get_tensor(name)
        if name.endswith(".qweight"):
            qa = formats.unpack_rows(x, 4, x.shape[0] * 8)
            qb = formats.unpack_rows(y, 4, y.shape[0] * 8)
            d = (qa - qb).abs()
            res["modules"] += 1
            res["codes"] += d.numel()
            res["codes_differ"] += int((d > 0).sum())
            res["max_code_diff"] = max(res["max_code_diff"], int(d.max()))
        elif x.dtype.is_floating_point and not name.endswith(".scales"):
            res["float_tensors"] += 1
            if x.shape != y.shape or not torch.equal(x.view(torch.uint8) if x.dim() else x.reshape(1).view(torch.uint8),
                                                     y.view(torch.uint8) if y.dim() else y.reshape(1).view(torch.uint8)):
                res["float_tensors_differ"].append(name)
    res["fraction_codes_differ"] = res["codes_differ"] / max(1, res["codes"])
    return res


def phase_moe(ctx: Context) -> dict:
    p = ctx.profile
    # the dry run takes a smaller random one unless told otherwise: the shared model's 10M codes take minutes
    # to solve on 2 CPU cores, and only the code paths matter there
    model = find_moe_model(ctx.args) if ctx.args.moe_model or not ctx.dry else None
    source = f"tiny Mixtral at {model}"
    if model is None:
        size = dict(hidden=128, intermediate=128, layers=2, experts=4) if ctx.dry else \
            dict(hidden=256, intermediate=384, layers=4, experts=8)
        model = gpu_synth.build_tiny_mixtral(ctx.work / "moe-random", **size)
        source = f"random tiny Mixtral {size} (gpu_synth.build_tiny_mixtral)"
    calib = calib_text(ctx.work)
    res = {"model": str(model), "source": source, "runs": {}}
    runs = {"cuda-all": (p.device, ()), "cpu-all": ("cpu", ()),
            "cuda-routed": (p.device, ("--moe-calibration", "routed", "--moe-min-share", "0.9"))}
    if ctx.args.quick:  # one run: the comparison and the routed run are left to the full dry run
        runs = {"cuda-all": runs["cuda-all"]}
    for key, (dev, extra) in runs.items():
        cap = ctx.cap("moe")
        if cap is None:
            res["runs"][key] = {"skipped": "budget"}
            continue
        out = ctx.work / "moe-out" / key
        cmd = mergequant_cmd(*quantize_args(model, out, "gptq", dev, calib, p.moe_samples, p.moe_seqlen,
                                            p.batch_size, *extra))
        ctx.log(f"moe: quantize --method gptq --device {dev} {' '.join(extra)}")
        run = run_measured(cmd, log=ctx.work / "logs" / f"moe-{key}.log", timeout_s=cap)
        run["device"] = dev
        run["out_bytes"] = dir_bytes(out)
        log_text = Path(run["log"]).read_text(errors="replace")
        run["starved_expert_lines"] = len(re.findall(r"round-to-nearest for starved expert", log_text))
        run.pop("events")
        res["runs"][key] = run
        ctx.log(f"  {run['wall_s']:.1f} s, rc {run['returncode']}, peak RssAnon {run['peak_rss_anon_mib']:.0f} MiB, "
                f"CUDA max allocated {run['cuda_max_allocated_mib']} MiB")
        if run["returncode"] != 0:
            ctx.issue(f"moe {key} (--device {dev} {' '.join(extra)}) failed (rc {run['returncode']}): "
                      + " | ".join(run.get("output_tail", [])[-3:]))
    if all(res["runs"].get(k, {}).get("returncode") == 0 for k in ("cuda-all", "cpu-all")):
        cmp = compare_quantized(ctx.work / "moe-out" / "cpu-all", ctx.work / "moe-out" / "cuda-all")
        cmp["expected"] = ("float tensors byte-identical; a small fraction of codes may differ: GPTQ rounds each "
                           "column and pushes the error onto later ones, so last-bit differences between CPU and "
                           "CUDA arithmetic (BLAS blocking, FMA) flip codes at rounding ties and the flip cascades")
        cmp["as_expected"] = bool(cmp["same_names"] and not cmp["float_tensors_differ"]
                                  and cmp["fraction_codes_differ"] <= 0.05)
        res["cpu_vs_cuda"] = cmp
        ctx.log(f"  cpu vs {p.device}: {cmp['fraction_codes_differ']:.4%} of {cmp['codes']} codes differ "
                f"(max {cmp['max_code_diff']}), float tensors differing: {len(cmp['float_tensors_differ'])}")
        if not cmp["as_expected"]:
            ctx.issue("moe: CUDA codes differ from CPU codes more than expected")
    if not ctx.args.keep:
        shutil.rmtree(ctx.work / "moe-out", ignore_errors=True)
    rcs = [r.get("returncode") for r in res["runs"].values()]
    compared = res.get("cpu_vs_cuda", {}).get("as_expected") or (ctx.args.quick and "cpu-all" not in runs)
    res["status"] = ("ok" if all(rc == 0 for rc in rcs) and compared
                     else "partial" if any(rc is None for rc in rcs) else "failed")
    return res


# --------------------------------------------------------------------------------------------- phase: quant


def phase_quant(ctx: Context) -> dict:
    p = ctx.profile
    shape = dict(p.quant_shape)
    if ctx.args.quant_layers:
        shape["layers"] = ctx.args.quant_layers
    samples = ctx.args.samples or p.samples
    seqlen = ctx.args.seqlen or p.seqlen
    batch = ctx.args.batch_size or p.batch_size
    name = "x".join(str(shape[k]) for k in ("hidden", "intermediate", "layers"))
    model, build_s = gpu_synth.build_llama(ctx.work / f"quant-model-{name}", shape, device=ctx.gen_device,
                                           shards=p.quant_shards, log=ctx.log)
    cfg = gpu_synth.llama_config(shape)
    calib = calib_text(ctx.work)
    free_gpu()
    res = {"model": {"shape": shape, "parameters": gpu_synth.parameter_count(cfg), "bytes": dir_bytes(model),
                     "shards": p.quant_shards, "drawn_on": ctx.gen_device.type, "build_s": round(build_s, 1),
                     "path": str(model)},
           "settings": {"bits": 4, "group_size": 128, "sym": True, "desc_act": False, "damp": 0.01,
                        "samples": samples, "seqlen": seqlen, "calibration_tokens": samples * seqlen, "seed": 0,
                        "batch_size": batch, "calibration_text": "mergequant/data/demo-prose.txt + demo-verse.txt",
                        "gptqmodel": "QuantizeConfig(bits=4, group_size=128, desc_act=False, sym=True, "
                                     "damp_percent=0.01, act_group_aware=False); same token windows (mergequant's "
                                     "calibration_batch, seed 0) and batch; computes in the model's bf16, mergequant "
                                     "in float32",
                        "device": p.device},
           "runs": {}}
    methods = [m for m in (ctx.args.quant_methods or ("gptq" if ctx.args.quick else "gptq,awq")).split(",") if m]
    order = []
    if "gptq" in methods:
        order.append("mergequant-gptq")
    if not ctx.args.skip_gptqmodel and (not ctx.dry or ctx.args.gptqmodel):
        order.append("gptqmodel-gptq")
    elif not ctx.args.skip_gptqmodel:
        res["runs"]["gptqmodel-gptq"] = {"skipped": "dry run (pass --gptqmodel to include it)",
                                         "cmd": gptqmodel_cmd(model, calib, ctx.work / "quant-out" / "gptqmodel-gptq",
                                                              samples, seqlen, batch, p.device)}
    if "awq" in methods:
        order.append("mergequant-awq")
    for key in order:
        kind = {"mergequant-gptq": "gptq", "gptqmodel-gptq": "gptqmodel", "mergequant-awq": "awq"}[key]
        cap = ctx.cap(kind)
        if cap is None:
            res["runs"][key] = {"skipped": f"budget ({ctx.budget - ctx.elapsed():.0f} s left)"}
            ctx.log(f"quant {key}: skipped, not enough budget left")
            continue
        out = ctx.work / "quant-out" / key
        shutil.rmtree(out, ignore_errors=True)
        if key.startswith("mergequant"):
            cmd = mergequant_cmd(*quantize_args(model, out, kind, p.device, calib, samples, seqlen, batch))
        else:
            cmd = gptqmodel_cmd(model, calib, out, samples, seqlen, batch, p.device)
        ctx.log(f"quant {key} on {p.device} (cap {cap:.0f} s)")
        run = run_measured(cmd, log=ctx.work / "logs" / f"quant-{key}.log", timeout_s=cap, echo=ctx.log)
        run["cap_s"] = round(cap, 1)
        run["completed"] = run["returncode"] == 0 and not run["timed_out"]
        run.update(layer_progress(run, shape["layers"]))
        run["out_bytes"] = dir_bytes(out)
        run["layer_marks"] = [{k: e.get(k) for k in ("i", "at_s", "cuda_max_allocated_mib")}
                              for e in run.pop("events") if e.get("event") in ("layer", "layer_start")]
        res["runs"][key] = run
        state = ("done" if run["completed"] else f"stopped at its cap after {run['layers_done']} layers"
                 if run["timed_out"] else f"FAILED (rc {run['returncode']})")
        ctx.log(f"  {key}: {run['wall_s']:.1f} s, {state}; per layer {run.get('per_layer_s')} s, projected "
                f"{run.get('projected_total_s', run['wall_s'] if run['completed'] else None)} s; peak RssAnon "
                f"{run['peak_rss_anon_mib']:.0f} MiB, GPU {run['gpu_used_peak_mib']} MiB device-wide, CUDA max "
                f"allocated {run['cuda_max_allocated_mib']} MiB")
        if not run["completed"] and not run["timed_out"]:
            ctx.issue(f"quant {key} failed (rc {run['returncode']}): " + " | ".join(run.get("output_tail", [])[-3:]))
        if not ctx.args.keep:
            shutil.rmtree(out, ignore_errors=True)
    res["comparison"] = quant_comparison(res["runs"])
    rs = [r for r in res["runs"].values() if "returncode" in r]
    res["status"] = ("ok" if rs and all(r["completed"] for r in rs) and len(rs) == len(order)
                     else "failed" if any(not r["completed"] and not r["timed_out"] for r in rs) else "partial")
    return res


def _total(run: dict) -> tuple[float | None, str]:
    """A run's whole-model time: measured, or (stopped at its cap) the projection."""
    if not run or "returncode" not in run:
        return None, "not run"
    if run.get("completed"):
        return run["wall_s"], "measured"
    if run.get("projected_total_s"):
        return run["projected_total_s"], "projected"
    return None, "unknown"


def quant_comparison(runs: dict) -> dict:
    ours, theirs = runs.get("mergequant-gptq", {}), runs.get("gptqmodel-gptq", {})
    t_ours, how_ours = _total(ours)
    t_theirs, how_theirs = _total(theirs)
    out = {"mergequant_gptq_s": t_ours, "mergequant_gptq_is": how_ours,
           "gptqmodel_gptq_s": t_theirs, "gptqmodel_gptq_is": how_theirs}
    if t_ours:
        out["mergequant_gptq_under_10_min"] = t_ours < 600
    if t_ours and t_theirs:
        out["speedup_mergequant_over_gptqmodel"] = round(t_theirs / t_ours, 2)
    if theirs.get("timed_out") and ours.get("completed"):
        # GPTQModel stopped at its cap: its whole run takes at least that long
        out["speedup_lower_bound"] = round(theirs["wall_s"] / ours["wall_s"], 2)
    if ours.get("per_layer_s") and theirs.get("per_layer_s"):
        out["per_layer_speedup"] = round(theirs["per_layer_s"] / ours["per_layer_s"], 2)
    return out


# --------------------------------------------------------------------------------------------- plan, machine


def describe_gpu_plan(args) -> list[str]:
    """What the same invocation without --dry-run runs on a CUDA machine (paths under --work)."""
    p, w = GPU, Path("bench/work/gpu-check")
    shape = dict(p.quant_shape)
    if args.quant_layers:
        shape["layers"] = args.quant_layers
    samples, seqlen, batch = args.samples or p.samples, args.seqlen or p.seqlen, args.batch_size or p.batch_size
    model = w / f"quant-model-{shape['hidden']}x{shape['intermediate']}x{shape['layers']}"
    calib = w / "calib.txt"
    mq = "python -c MERGEQUANT_WRAPPER"

    def q(cmd):
        return " ".join(cmd[3:])
    lines = [f"budget {p.budget_s} s; caps (s): {p.caps}",
             f"tests: python -m pytest -q -m gpu {' '.join(p.tests or gpu_test_files())} (JUnit XML)",
             f"merge: 3 synthetic Llamas {p.merge_shape} ({gpu_synth.parameter_count(gpu_synth.llama_config(p.merge_shape)) / 1e9:.2f}B, bf16) drawn on cuda;"]
    for m in ("ties", "linear"):
        for dev in ("cpu", "cuda"):
            lines.append(f"  {mq} merge {w}/merge-{m}.yaml -o {w}/merge-out/{m}-{dev} --device {dev} --quiet --force")
        lines.append(f"  compare {m}: cpu vs cuda ({MERGE_EXPECTED[m][0]})")
    lines.append("moe: tiny Mixtral (shared/models/moe-mixtral/base, else random):")
    for key, dev, extra in (("cuda-all", "cuda", ()), ("cpu-all", "cpu", ()),
                            ("cuda-routed", "cuda", ("--moe-calibration", "routed", "--moe-min-share", "0.9"))):
        lines.append(f"  {mq} " + q(mergequant_cmd(*quantize_args(Path("MOE"), w / "moe-out" / key, "gptq", dev, calib,
                                                                     p.moe_samples, p.moe_seqlen, p.batch_size, *extra))))
    lines.append(f"quant: synthetic Llama {shape} ({gpu_synth.parameter_count(gpu_synth.llama_config(shape)) / 1e9:.2f}B, "
                 f"bf16, {p.quant_shards} shards) drawn on cuda; {samples} x {seqlen} calibration tokens, batch {batch}:")
    lines.append(f"  {mq} " + q(mergequant_cmd(*quantize_args(model, w / "quant-out/mergequant-gptq", "gptq", "cuda",
                                                                 calib, samples, seqlen, batch))) + f"   [cap {p.caps['gptq']} s]")
    if not args.skip_gptqmodel:
        lines.append("  python -c GPTQMODEL_SCRIPT " + " ".join(gptqmodel_cmd(model, calib, w / "quant-out/gptqmodel-gptq",
                                                                                samples, seqlen, batch, "cuda")[3:])
                     + f"   [cap {p.caps['gptqmodel']} s]")
    lines.append(f"  {mq} " + q(mergequant_cmd(*quantize_args(model, w / "quant-out/mergequant-awq", "awq", "cuda",
                                                                 calib, samples, seqlen, batch))) + f"   [cap {p.caps['awq']} s]")
    return lines


def _ver(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def machine_info() -> dict:
    cpu, mem = "", 0
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
        mem = next((int(ln.split()[1]) * 1024 for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu_model": cpu, "mem_total_gib": round(mem / GiB, 1),
            "python": platform.python_version(), "loadavg": loadavg(), "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        info.update({"gpu": prop.name, "gpu_memory_gib": round(prop.total_memory / GiB, 1),
                     "gpu_capability": f"{prop.major}.{prop.minor}", "gpu_count": torch.cuda.device_count()})
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def versions() -> dict:
    import mergequant

    return {"mergequant": mergequant.__version__, "mergequant_source_sha256": source_digest(),
            "torch": torch.__version__, **{p: _ver(p) for p in ("transformers", "gptqmodel", "numba", "safetensors",
                                                                 "accelerate", "torchao", "pytest")}}


# --------------------------------------------------------------------------------------------- main


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def to_out(path: Path) -> None:
    """On the device tool's machine ($OUT set), copy a result there as soon as it exists: a command stopped
    at its time limit still returns what was finished."""
    out = os.environ.get("OUT")
    if out and Path(out).is_dir():
        shutil.copy(path, Path(out) / path.name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, same code paths; prints the GPU plan")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--budget-s", type=float, help="wall-time budget of the whole check (GPU default 480 s)")
    ap.add_argument("--gptq-cap-s", type=float, help="cap of mergequant's 8B GPTQ run (default 120 s)")
    ap.add_argument("--gptqmodel-cap-s", type=float, help="cap of GPTQModel's 8B run (default 90 s)")
    ap.add_argument("--awq-cap-s", type=float, help="cap of mergequant's 8B AWQ run (default 60 s)")
    ap.add_argument("--tests-cap-s", type=float)
    ap.add_argument("--merge-cap-s", type=float)
    ap.add_argument("--moe-cap-s", type=float)
    ap.add_argument("--skip-gptqmodel", action="store_true", help="do not run GPTQModel")
    ap.add_argument("--gptqmodel", action="store_true", help="dry run: also run GPTQModel (slow to import)")
    ap.add_argument("--quant-methods", help="mergequant methods for the 8B model (default gptq,awq)")
    ap.add_argument("--quick", action="store_true", help="fewer runs through the same code (tests/test_gpu.py's "
                    "dry run): merge TIES only, one MoE run (CUDA side, all-token), GPTQ only")
    ap.add_argument("--quant-layers", type=int, help="decoder layers of the 8B-shaped model (default 32)")
    ap.add_argument("--samples", type=int)
    ap.add_argument("--seqlen", type=int)
    ap.add_argument("--batch-size", type=int, help="calibration windows per forward, every tool (GPU default 8)")
    ap.add_argument("--moe-model", type=Path, help="tiny Mixtral folder (default: shared/models/moe-mixtral/base)")
    ap.add_argument("--work", type=Path, help="models, logs, outputs (default bench/work/gpu-check[-dry])")
    ap.add_argument("--results", type=Path, help="JSON folder (default bench/results; dry run: <work>/results)")
    ap.add_argument("--keep", action="store_true", help="keep the merged and quantized outputs")
    args = ap.parse_args(argv)

    profile = DRY if args.dry_run else GPU
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(k, "1")  # nothing here is downloaded; the GPU machine has no network at all
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here (torch.cuda.is_available() is False); use --dry-run", file=sys.stderr)
        return 2
    args.work = args.work or HERE / "work" / ("gpu-check-dry" if args.dry_run else "gpu-check")
    args.results = args.results or (args.work / "results" if args.dry_run else HERE / "results")
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}; choose from {PHASES}")

    global GPU_MEM
    GPU_MEM = GpuMemory() if torch.cuda.is_available() else None
    # a stop from outside (the device tool's time limit) unwinds through run_measured, which stops the run
    # in progress (its own process group) instead of leaving it behind
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    ctx = Context(args, profile)
    plan = describe_gpu_plan(args)
    if args.dry_run:
        print("dry run: CPU, tiny shapes, the same code paths. On a CUDA machine this check runs:")
        print("\n".join("  " + ln for ln in plan), flush=True)
    ctx.log(f"profile {profile.name}: device {profile.device}, budget {ctx.budget:.0f} s, phases {','.join(phases)}, "
            f"work {args.work}, results {args.results}")
    header = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "dry_run": args.dry_run,
              "profile": dataclasses.asdict(profile), "machine": machine_info(), "versions": versions()}
    ctx.log(f"machine: {header['machine'].get('gpu', 'no GPU')}, torch {torch.__version__}, "
            f"gptqmodel {header['versions']['gptqmodel']}")
    funcs = {"tests": phase_tests, "merge": phase_merge, "moe": phase_moe, "quant": phase_quant}
    results: dict[str, dict] = {}
    for name in PHASES:
        if name not in phases:
            continue
        t = time.perf_counter()
        ctx.log(f"=== {name}")
        try:
            r = funcs[name](ctx)
        except Exception as e:  # one phase's crash must not cost the others' results
            import traceback

            traceback.print_exc()
            r = {"status": "error", "error": f"{type(e).__name__}: {e}"}
            ctx.issue(f"phase {name} crashed: {type(e).__name__}: {e}")
        r["phase_wall_s"] = round(time.perf_counter() - t, 1)
        results[name] = r
        write_json(args.results / f"gpu-{name}.json", {"benchmark": f"gpu-{name}", **header, **r})
        to_out(args.results / f"gpu-{name}.json")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    summary = {"benchmark": "gpu-check", **header,
               "budget": {"budget_s": ctx.budget, "elapsed_s": round(ctx.elapsed(), 1)},
               "status": {k: v.get("status") for k, v in results.items()}, "issues": ctx.issues,
               "gpu_plan": plan, "phases": results}
    write_json(args.results / "gpu-check.json", summary)
    to_out(args.results / "gpu-check.json")
    ctx.log(f"done in {ctx.elapsed():.0f} s: " + ", ".join(f"{k} {v}" for k, v in summary["status"].items())
            + f"; {len(ctx.issues)} issue(s); wrote {args.results}/gpu-check.json")
    for msg in ctx.issues:
        print(f"  issue: {msg}")
    return 0 if all(v in ("ok", "partial") for v in summary["status"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
