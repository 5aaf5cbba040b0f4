#!/usr/bin/env python
"""Benchmark `mergequant merge` against `mergekit-yaml` on synthetic Llama-shaped bf16 checkpoints.

This is a benchmark, not a test. One invocation:

1. builds (or reuses, from bench/work/models/) three bf16 checkpoints with the same Llama layout --
   a base and two "fine-tunes" with different seeded perturbations -- in 2 shards each, generating one
   tensor at a time so building never needs RAM for a whole model;
2. warms the page cache by reading every input shard once, then measures the *disk floor*: the time to
   read all input shards (large buffered reads) plus the time to write and fsync one file of the output's
   size (sampled before each round and at the end; the floor is the fastest read + the fastest write);
3. runs `mergequant merge` and `mergekit-yaml` as subprocesses for a linear and a TIES recipe, polling the
   process tree's /proc/PID/status (RssAnon, RssFile, VmRSS) every ~20 ms for peak memory, taking
   storage bytes read/written from the kernel's I/O accounting (wait4 rusage, i.e. /proc/PID/io
   read_bytes/write_bytes including reaped threads) and rchar/wchar from /proc/PID/io polling;
4. checks the outputs: the two tools against each other (fraction of elements that differ, max |diff|),
   and both against an independent float64 implementation of the two formulas on 21 tensors (TIES:
   exact top-k with ties at the threshold kept in flat-index order);
5. prints a table and writes bench/results/merge-<size>-<layers>.json.

The table shows each contender's fastest run (``--repeat``) and the highest memory peak seen in any run.

Examples::

    python bench/merge_bench.py --size small            # ~100M params, about two minutes
    python bench/merge_bench.py                         # ~1.1B params (TinyLlama shapes), ~8 min on 2 cores
    python bench/merge_bench.py --layers 11 --repeat 2  # half the layers: peak memory should not change
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.metadata as md
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from mergequant.demo import llama_tensor_shapes, tiny_llama_config, write_checkpoint

HERE = Path(__file__).resolve().parent
GiB = 1024**3

SIZES = {
    # TinyLlama-1.1B shapes: 1.10e9 parameters, 2.05 GiB per bf16 checkpoint at 22 layers.
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    # ~100M parameters (0.19 GiB per checkpoint): for developing / smoke-testing the benchmark.
    "small": dict(hidden=768, intermediate=2048, layers=8, heads=12, kv_heads=4, vocab=32000),
}
SHARDS = 2  # shard files per synthetic checkpoint
GENERATOR_VERSION = 2  # bump when the synthetic weights change, so cached checkpoints are rebuilt

RECIPES = {
    "linear": """\
merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.4}}
  - model: {ft1}
    parameters: {{weight: 0.3}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
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
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.5}}
parameters:
  normalize: true
dtype: bfloat16
""",
}


# ---------------------------------------------------------------------------------------------------
# synthetic checkpoints
# ---------------------------------------------------------------------------------------------------
def _seed_for(*parts) -> int:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _LazyTensor:
    """Stands in for a tensor in ``write_checkpoint``'s dict: dtype and shape up front (for the shard plan),
    the data only when the writer asks for it (``contiguous()``), so one tensor is in memory at a time."""

    def __init__(self, make, shape, dtype):
        self._make, self.shape, self.dtype = make, tuple(shape), dtype

    def contiguous(self) -> torch.Tensor:
        t = self._make()
        assert t.dtype == self.dtype and tuple(t.shape) == self.shape
        return t.contiguous()


def _base_tensor(name: str, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_seed_for("base", name))
    if name.endswith("norm.weight"):
        return (1.0 + 0.05 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    return (torch.randn(shape, generator=gen) / math.sqrt(shape[-1])).to(torch.bfloat16)


def _finetune_tensor(base: torch.Tensor, name: str, seed: int, scale: float = 0.02) -> torch.Tensor:
    """Same perturbation as mergequant.demo.finetune_of: 30% of weights move by ~0.2 mean|x|, the rest by 5% of that."""
    gen = torch.Generator().manual_seed(_seed_for("ft", seed, name))
    x = base.float()
    noise = torch.randn(x.shape, generator=gen)
    noise.mul_(x.abs().mean() * scale * 10)
    keep = torch.rand(x.shape, generator=gen) < 0.3
    noise = torch.where(keep, noise, noise * 0.05)
    return x.add_(noise).to(torch.bfloat16)


def _sync_dir(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _shards_arg(shapes: dict, want: int) -> float:
    """The ``shards`` value for ``write_checkpoint`` that yields exactly ``want`` files: it caps shards at
    total/shards bytes and packs greedily, so an exact split can spill into one more file; a little
    headroom avoids that."""
    from mergequant.io.writer import PlannedTensor, plan_shards

    planned = [PlannedTensor(n, torch.bfloat16, s) for n, s in shapes.items()]
    total = sum(p.nbytes for p in planned)
    for tenth in range(0, 10):
        arg = want - tenth / 10
        if len(plan_shards(planned, max(1, math.ceil(total / arg)))) == want:
            return arg
    return want


def build_models(root: Path, cfg: dict, *, rebuild: bool, log) -> dict[str, Path]:
    """base, ft1, ft2 under ``root`` (reused when a previous run built the same spec)."""
    from mergequant.io.checkpoint import Checkpoint

    spec = {"generator": GENERATOR_VERSION, "config": cfg, "shards": SHARDS}
    shapes = llama_tensor_shapes(cfg)
    shards_arg = _shards_arg(shapes, SHARDS)
    paths = {m: root / m for m in ("base", "ft1", "ft2")}
    for m, path in paths.items():
        marker = path / "bench_spec.json"
        if not rebuild and marker.exists() and json.loads(marker.read_text()) == spec:
            continue
        t0 = time.perf_counter()
        tmp = root / f".{m}.building"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        if m == "base":
            tensors = {n: _LazyTensor(lambda n=n, s=s: _base_tensor(n, s), s, torch.bfloat16) for n, s in shapes.items()}
        else:
            base_ck = Checkpoint.open(paths["base"])
            seed = {"ft1": 1, "ft2": 2}[m]
            tensors = {n: _LazyTensor(lambda n=n: _finetune_tensor(base_ck.get(n), n, seed), s, torch.bfloat16)
                       for n, s in shapes.items()}
        write_checkpoint(tmp, cfg, tensors, shards=shards_arg)
        if len(shard_files(tmp)) != SHARDS:
            raise SystemExit(f"expected {SHARDS} shard files in {tmp}, got {len(shard_files(tmp))}")
        _sync_dir(tmp)  # no dirty pages from the build left to be written back during the timed runs
        (tmp / "bench_spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        os.rename(tmp, path)
        log(f"built {path} in {time.perf_counter() - t0:.1f} s")
    return paths


def shard_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------------
# disk floor
# ---------------------------------------------------------------------------------------------------
def read_all(files: list[Path], bufsize: int = 64 << 20, stats: dict | None = None) -> tuple[int, float]:
    """Read ``files`` fully with large buffered reads; ``stats`` gets how much of it came from storage
    (this thread's read_bytes delta: ~0 when the page cache held every page)."""
    buf = bytearray(bufsize)
    view = memoryview(buf)
    total = 0
    before = _thread_read_bytes()
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    dt = time.perf_counter() - t0
    if stats is not None:
        stats["storage_read_bytes"] = _thread_read_bytes() - before
    return total, dt


def _thread_read_bytes() -> int:
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def write_fsync(path: Path, nbytes: int, bufsize: int = 64 << 20) -> float:
    chunk = os.urandom(bufsize)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left:
            left -= os.write(fd, memoryview(chunk)[: min(left, bufsize)])
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


# ---------------------------------------------------------------------------------------------------
# measured subprocess
# ---------------------------------------------------------------------------------------------------
STATUS_KEYS = ("RssAnon", "RssFile", "RssShmem", "VmRSS")
IO_KEYS = ("rchar", "wchar", "read_bytes", "write_bytes")


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                try:
                    with open(f"/proc/{p}/task/{tid}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
                except OSError:
                    pass
        except OSError:
            pass
    return out


def _status(pid: int) -> dict[str, int]:
    vals = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in STATUS_KEYS:
                    vals[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return vals


def _io(pid: int) -> dict[str, int]:
    vals = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in IO_KEYS:
                    vals[key] = int(rest)
    except OSError:
        pass
    return vals


def run_measured(cmd: list[str], log_path: Path, poll_s: float = 0.02, env: dict | None = None) -> dict:
    """Run ``cmd``, polling memory of its process tree; returns wall time, peaks and I/O counters."""
    ended = {}
    with open(log_path, "w") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)

        def reap():  # blocks in wait4 so the end time and the rusage (incl. all threads, reaped children) are exact
            _, status, ru = os.wait4(proc.pid, 0)
            ended.update(t=time.perf_counter(), status=status, ru=ru)

        reaper = threading.Thread(target=reap, daemon=True)
        reaper.start()
        peak = {k: 0 for k in STATUS_KEYS}
        peak_at = 0.0
        io_last: dict[int, dict[str, int]] = {}
        samples = 0
        while reaper.is_alive():
            totals = {k: 0 for k in STATUS_KEYS}
            for p in _tree(proc.pid):
                st = _status(p)
                for k in STATUS_KEYS:
                    totals[k] += st.get(k, 0)
                io = _io(p)
                if io:
                    io_last[p] = io
            samples += 1
            if totals["RssAnon"] > peak["RssAnon"]:
                peak_at = time.perf_counter() - t0
            for k in STATUS_KEYS:
                peak[k] = max(peak[k], totals[k])
            reaper.join(poll_s)
        reaper.join()
    proc.returncode = os.waitstatus_to_exitcode(ended["status"])
    ru = ended["ru"]
    return {
        "cmd": cmd,
        "returncode": proc.returncode,
        "wall_s": ended["t"] - t0,
        "peak_rss_anon": peak["RssAnon"],
        "peak_rss_file": peak["RssFile"],
        "peak_rss_shmem": peak["RssShmem"],
        "peak_vmrss": peak["VmRSS"],
        "peak_rss_anon_at_s": peak_at,
        "ru_maxrss": ru.ru_maxrss * 1024,  # kernel's high-water mark of RSS (anon + file) of the largest process
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "read_bytes": ru.ru_inblock * 512,  # = /proc/PID/io read_bytes incl. exited threads (storage reads)
        "write_bytes": ru.ru_oublock * 512,  # = /proc/PID/io write_bytes (bytes dirtied for storage)
        "rchar": sum(v.get("rchar", 0) for v in io_last.values()),  # last poll: read()/pread() bytes, not mmap
        "wchar": sum(v.get("wchar", 0) for v in io_last.values()),
        "major_faults": ru.ru_majflt,
        "minor_faults": ru.ru_minflt,
        "samples": samples,
    }


def dir_bytes(path: Path) -> tuple[int, int]:
    """(apparent size, allocated size) of the files under ``path``."""
    apparent = allocated = 0
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


# ---------------------------------------------------------------------------------------------------
# output comparison
# ---------------------------------------------------------------------------------------------------
def _open_model(path: Path):
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    files = sorted({*json.loads(index.read_text())["weight_map"].values()}) if index.exists() else ["model.safetensors"]
    handles = {f: safe_open(str(path / f), framework="pt", device="cpu") for f in files}
    where = {k: h for h in handles.values() for k in h.keys()}
    return where


def compare_outputs(a_dir: Path, b_dir: Path) -> dict:
    """Element-wise agreement of two merged models, one tensor at a time."""
    a, b = _open_model(a_dir), _open_model(b_dir)
    res = {"same_names": sorted(a) == sorted(b), "tensors": 0, "elements": 0, "differing": 0, "max_abs_diff": 0.0,
           "max_rel_diff": 0.0, "dtype_mismatch": [], "shape_mismatch": [], "worst_tensor": None,
           "worst_fraction_tensor": None, "worst_fraction": 0.0}
    for name in sorted(set(a) & set(b)):
        x, y = a[name].get_tensor(name), b[name].get_tensor(name)
        if x.dtype != y.dtype:
            res["dtype_mismatch"].append(name)
        if x.shape != y.shape:
            res["shape_mismatch"].append(name)
            continue
        x, y = x.reshape(-1), y.reshape(-1)
        numel = x.numel()
        if x.dtype == y.dtype and x.element_size() == 2:  # cheap bitwise pre-filter, then values where bits differ
            where = (x.view(torch.int16) != y.view(torch.int16)).nonzero().reshape(-1)
            xf, yf = x[where].float(), y[where].float()
        else:
            xf, yf = x.float(), y.float()
        nd = int((xf != yf).sum())
        res["tensors"] += 1
        res["elements"] += numel
        res["differing"] += nd
        if nd:
            m = float((xf - yf).abs().max())
            rel = m / max(float(y.abs().max().float()), 1e-30)  # relative to the tensor's largest magnitude
            if m > res["max_abs_diff"]:
                res["max_abs_diff"], res["worst_tensor"] = m, name
            res["max_rel_diff"] = max(res["max_rel_diff"], rel)
            if nd / numel > res["worst_fraction"]:
                res["worst_fraction"], res["worst_fraction_tensor"] = nd / numel, name
    res["fraction_differing"] = res["differing"] / max(1, res["elements"])
    return res


def _reference_tensor(method: str, xs: list[torch.Tensor]) -> torch.Tensor:
    """The recipes' merge of one tensor, written from the papers' formulas (not mergequant's code), in float64.

    linear: sum_i w_i x_i / sum_i w_i.  TIES: d_i = x_i - base; keep the k = int(0.5 n) largest |d_i|, ties at
    the threshold kept in flat-index order; elected sign = sign(sum_i w_i d_i) (0 -> +); average the
    agreeing w_i d_i over the agreeing weights; add to base.
    """
    xs = [x.double().reshape(-1) for x in xs]
    if method == "linear":
        w = [0.4, 0.3, 0.3]
        out = xs[0] * w[0]
        for x, wi in zip(xs[1:], w[1:]):
            out = out + x * wi
        return out / sum(w)
    base, w, kept = xs[0], 0.5, []
    for x in xs[1:]:
        d = x - base
        a = d.abs()
        n = a.numel()
        k = max(1, int(0.5 * n))
        thr = torch.kthvalue(a, n - k + 1).values
        keep = a > thr
        eq = a == thr
        keep |= eq & (torch.cumsum(eq, 0) <= k - int(keep.sum()))
        kept.append(torch.where(keep, d, 0) * w)
    total = kept[0] + kept[1]
    positive = total >= 0
    mixed = torch.zeros_like(base)
    div = torch.zeros_like(base)
    for d in kept:
        agree = (d != 0) & ((d > 0) == positive)
        mixed += torch.where(agree, d, 0)
        div += agree.double() * w
    div[div == 0] = 1
    return base + mixed / div


def _ulps(y: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> float:
    """Largest |y - ref| in units of the bf16 spacing at the largest input magnitude of that element (1 = one rounding
    step of the inputs; measuring at the output's own magnitude would blow up where inputs cancel to ~0)."""
    mag = torch.maximum(torch.maximum(y.abs(), ref.abs()), scale).clamp_min(2.0**-126)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)
    return float(((y - ref).abs() / ulp).max())


def reference_check(method: str, models: dict[str, Path], outs: dict[str, Path], cfg: dict) -> dict:
    """Compare each tool's output with ``_reference_tensor`` on a sample of tensors: every tensor kind of the
    first and last layer, the embeddings, lm_head and the final norm."""
    from mergequant.io.checkpoint import Checkpoint

    last = cfg["num_hidden_layers"] - 1
    names = [n for n in llama_tensor_shapes(cfg)
             if not n.startswith("model.layers.") or n.startswith(("model.layers.0.", f"model.layers.{last}."))]
    ins = [Checkpoint.open(models[m]) for m in ("base", "ft1", "ft2")]
    got = {t: _open_model(p) for t, p in outs.items()}
    res = {"tensors": names, "elements": 0}
    for t in outs:
        res[t] = {"differing": 0, "max_abs_diff": 0.0, "max_ulps": 0, "worst_tensor": None}
    for name in names:
        xs = [c.get(name).reshape(-1) for c in ins]
        scale = torch.stack([x.float().abs() for x in xs]).amax(0)
        ref = _reference_tensor(method, xs).to(torch.bfloat16).float()
        res["elements"] += ref.numel()
        for t, handles in got.items():
            y = handles[name].get_tensor(name).reshape(-1).float()
            nd = int((y != ref).sum())
            res[t]["differing"] += nd
            if nd:
                res[t]["max_ulps"] = max(res[t]["max_ulps"], _ulps(y, ref, scale))
                m = float((y - ref).abs().max())
                if m > res[t]["max_abs_diff"]:
                    res[t]["max_abs_diff"], res[t]["worst_tensor"] = m, name
    for t in outs:
        res[t]["fraction_differing"] = res[t]["differing"] / max(1, res["elements"])
    return res


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
def source_digest() -> str:
    """A digest of mergequant's source files: ties each run's numbers to the code it measured."""
    src = Path(__import__("mergequant").__file__).parent
    digest = hashlib.sha256()
    for f in sorted(src.rglob("*.py")):
        digest.update(f.relative_to(src).as_posix().encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def machine_info(work: Path) -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass

    def ver(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    src = Path(__import__("mergequant").__file__).parent
    git = lambda *a: subprocess.run(["git", "-C", str(src), *a], capture_output=True, text=True).stdout.strip()
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(work)], capture_output=True, text=True).stdout.strip()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(), "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)), "cpu_model": cpu, "mem_total_gib": round(mem / GiB, 2),
        "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "mergekit": ver("mergekit"), "mergequant": ver("mergequant"),
        "safetensors": ver("safetensors"), "transformers": ver("transformers"), "numba": ver("numba"),
        "filesystem": fs, "mergequant_source_sha256": source_digest(), "git_head": git("rev-parse", "--short", "HEAD"),
        "git_dirty_mergequant": bool(git("status", "--porcelain", "--", ".")),
    }


def _script(name: str) -> str:
    """The console script installed next to this interpreter (bypassing pyenv-style shims, which add a
    bash + `pyenv exec` hop to every start), else whatever is on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        sys.exit(f"{name} is not installed")
    return found


def startup_cost(env: dict, poll_s: float, log_dir: Path) -> dict:
    """Interpreter start + imports of each tool's merge path (a fixed cost inside every wall time below)."""
    snippets = {"mergequant": "import mergequant.cli, mergequant.merge.run",
                "mergekit": "import mergekit.scripts.run_yaml, mergekit.merge"}
    out = {}
    for tool, code in snippets.items():
        r = run_measured([sys.executable, "-c", code], log_dir / f"startup-{tool}.log", poll_s, env)
        out[tool] = {"wall_s": r["wall_s"], "peak_rss_anon": r["peak_rss_anon"], "code": code}
    return out


def loadavg() -> list[float]:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def fmt_table(rows: list[dict]) -> str:
    head = ["method", "tool", "wall s", "RssAnon GiB", "RSS GiB", "read GiB", "written GiB", "out GiB",
            "vs mergekit", "vs floor"]
    lines = [head]
    for r in rows:
        lines.append([r["method"], r["tool"], f"{r['wall_s']:.2f}", f"{r['peak_rss_anon'] / GiB:.2f}",
                      f"{r['peak_vmrss'] / GiB:.2f}", f"{r['read_gib']:.2f}", f"{r['write_bytes'] / GiB:.2f}",
                      f"{r['out_bytes'] / GiB:.2f}",
                      f"{r['speedup_vs_mergekit']:.2f}x faster" if r.get("speedup_vs_mergekit") else "-",
                      f"{r['ratio_vs_floor']:.2f}x"])
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    out = []
    for j, l in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(l, widths))) + " |")
        if j == 0:
            out.append("|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--layers", type=int, help="override the layer count (same widths)")
    ap.add_argument("--methods", default="linear,ties")
    ap.add_argument("--tools", default="mergequant,mergekit")
    ap.add_argument("--repeat", type=int, default=1, help="runs per contender (interleaved); the table shows the "
                    "fastest run's time and the highest peak memory seen over all runs")
    ap.add_argument("--poll-ms", type=float, default=20.0)
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--rebuild", action="store_true", help="regenerate the synthetic checkpoints")
    ap.add_argument("--mergequant-args", default="", help="extra arguments for `mergequant merge` (e.g. '--workers 1')")
    ap.add_argument("--mergekit-args", default="", help="extra arguments for `mergekit-yaml`")
    ap.add_argument("--no-verify", action="store_true", help="skip comparing the two tools' outputs")
    ap.add_argument("--mergekit-dtype-check", action="store_true",
                    help="also run `mergequant --mergekit-dtype` (untabulated; slow for TIES) and compare its output "
                         "with mergekit's, to tell rounding differences from real ones")
    args = ap.parse_args(argv)

    shape = dict(SIZES[args.size])
    if args.layers:
        shape["layers"] = args.layers
    cfg = tiny_llama_config(**shape)
    tag = f"{args.size}-{shape['layers']}"
    methods = [m for m in args.methods.split(",") if m]
    tools = [t for t in args.tools.split(",") if t]

    def log(msg):
        print(msg, flush=True)

    work = args.work.resolve()
    models = build_models(work / "models" / f"{args.size}-L{shape['layers']}", cfg, rebuild=args.rebuild, log=log)
    run_dir = work / "runs" / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    recipes = {}
    for m in methods:
        recipes[m] = run_dir / f"{m}.yaml"
        recipes[m].write_text(RECIPES[m].format(**{k: str(v) for k, v in models.items()}))

    inputs = [f for p in models.values() for f in shard_files(p)]
    input_bytes = sum(f.stat().st_size for f in inputs)
    n_params = sum(math.prod(s) for s in llama_tensor_shapes(cfg).values())
    out_data_bytes = n_params * 2
    info = machine_info(work)
    log(f"models: 3 x {n_params / 1e9:.3f}B params ({input_bytes / 3 / GiB:.2f} GiB bf16 each, "
        f"{len(inputs)} shard files, {input_bytes / GiB:.2f} GiB in all) at {models['base'].parent}")
    log(f"machine: {info['cpu_count']} CPUs ({info['cpu_model']}), {info['mem_total_gib']} GiB RAM, torch "
        f"{info['torch']}, mergekit {info['mergekit']}, mergequant {info['mergequant']}, load {loadavg()}")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    mq, mk = _script("mergequant"), _script("mergekit-yaml")

    def command(tool, method, out):
        if tool == "mergequant":
            return [mq, "merge", str(recipes[method]), "-o", str(out), "--device", "cpu", "--quiet", "--force",
                    *args.mergequant_args.split()]
        # mergekit defaults (CPU, no lazy-unpickle: it only affects pickled .bin inputs; ours are safetensors).
        return [mk, str(recipes[method]), str(out), "--quiet", *args.mergekit_args.split()]

    # warm-up: every contender (and the floor) sees the inputs in the page cache
    io = {}
    nbytes, dt = read_all(inputs, stats=io)
    log(f"warm-up read of the inputs: {nbytes / GiB:.2f} GiB in {dt:.2f} s ({io['storage_read_bytes'] / GiB:.2f} GiB "
        "from storage); the page cache is warm for all timings below")

    startup = startup_cost(env, args.poll_ms / 1000, run_dir)
    log("startup (python + imports): " + ", ".join(f"{t} {v['wall_s']:.2f} s / {v['peak_rss_anon'] / GiB:.2f} GiB anon"
                                                  for t, v in startup.items()))
    floors, runs = [], []
    outs = run_dir / "out"
    outs.mkdir(exist_ok=True)
    def measure_floor(label: str) -> None:
        io = {}
        nbytes, read_s = read_all(inputs, stats=io)
        write_s = write_fsync(run_dir / "floor.bin", out_data_bytes)
        floors.append({"when": label, "read_s": read_s, "read_bytes": nbytes, "write_s": write_s,
                       "write_bytes": out_data_bytes, "total_s": read_s + write_s,
                       "read_from_storage_bytes": io["storage_read_bytes"]})
        log(f"{label} disk floor: read {nbytes / GiB:.2f} GiB in {read_s:.2f} s ({nbytes / GiB / read_s:.1f} GiB/s, "
            f"{io['storage_read_bytes'] / GiB:.2f} GiB of it from storage) + write+fsync {out_data_bytes / GiB:.2f} GiB "
            f"in {write_s:.2f} s = {read_s + write_s:.2f} s")

    for rep in range(args.repeat):
        measure_floor(f"[{rep + 1}/{args.repeat}]")
        for method in methods:
            for tool in tools:
                out = outs / f"{method}-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                io = {}
                read_all(inputs, stats=io)  # keep the inputs hot (cheap when they already are)
                la = loadavg()
                src = source_digest()
                r = run_measured(command(tool, method, out), run_dir / f"{method}-{tool}.log", args.poll_ms / 1000, env)
                if r["returncode"] != 0:
                    log((run_dir / f"{method}-{tool}.log").read_text()[-3000:])
                    raise SystemExit(f"{tool} {method} failed with exit code {r['returncode']}")
                t0 = time.perf_counter()
                _sync_dir(out)  # flush what the tool left dirty (mergekit does not fsync) before the next contender
                r["post_fsync_s"] = time.perf_counter() - t0
                r["out_bytes"], r["out_allocated_bytes"] = dir_bytes(out)
                r.update(method=method, tool=tool, repeat=rep, loadavg_before=la, mergequant_source=src,
                         rewarm_storage_read_bytes=io["storage_read_bytes"])
                if src != source_digest():
                    log(f"warning: mergequant's source changed during this run ({src} -> {source_digest()})")
                runs.append(r)
                log(f"[{rep + 1}/{args.repeat}] {method:6s} {tool:10s} {r['wall_s']:7.2f} s  "
                    f"RssAnon {r['peak_rss_anon'] / GiB:.2f} GiB (at {r['peak_rss_anon_at_s']:.1f} s)  "
                    f"VmRSS {r['peak_vmrss'] / GiB:.2f} GiB  user {r['user_s']:.1f} s sys {r['sys_s']:.1f} s  "
                    f"flush after {r['post_fsync_s']:.2f} s  load {la[0] if la else '?'}")

    measure_floor("[end]")  # the floor is sampled before each round and once more at the end
    sources = sorted({r["mergequant_source"] for r in runs if r["tool"] == "mergequant"})
    if len(sources) > 1:
        log(f"warning: mergequant's source changed between runs ({', '.join(sources)}): the numbers mix versions")
    # The floor: the fastest input read plus the fastest write+fsync seen (the disk and CPUs are shared, so each
    # sample is noisy; the minima make the floor as low, and the ratios against it as unflattering, as measured).
    floor_read = min(f["read_s"] for f in floors)
    floor_write = min(f["write_s"] for f in floors)
    floor = floor_read + floor_write
    rows = []
    for method in methods:
        for tool in tools:
            mine = [r for r in runs if r["method"] == method and r["tool"] == tool]
            best = min(mine, key=lambda r: r["wall_s"])
            row = {k: best[k] for k in ("method", "tool", "wall_s", "user_s", "sys_s", "read_bytes", "write_bytes",
                                        "rchar", "wchar", "out_bytes", "post_fsync_s")}
            row["walls_s"] = [r["wall_s"] for r in mine]
            for k in ("peak_rss_anon", "peak_vmrss", "peak_rss_file", "ru_maxrss"):
                row[k] = max(r[k] for r in mine)  # memory: the worst run (it should not vary much)
            row["read_gib"] = (best["read_bytes"] + best["rchar"]) / GiB
            row["ratio_vs_floor"] = best["wall_s"] / floor
            rows.append(row)
    for row in rows:
        mkrow = next((r for r in rows if r["method"] == row["method"] and r["tool"] == "mergekit"), None)
        row["speedup_vs_mergekit"] = mkrow["wall_s"] / row["wall_s"] if mkrow else None

    verify = {}
    if not args.no_verify and {"mergequant", "mergekit"} <= set(tools):
        for method in methods:
            t0 = time.perf_counter()
            verify[method] = compare_outputs(outs / f"{method}-mergequant", outs / f"{method}-mergekit")
            v = verify[method]
            log(f"verify {method}: {v['tensors']} tensors, names equal {v['same_names']}, "
                f"{v['fraction_differing'] * 100:.4f}% of elements differ, max |diff| {v['max_abs_diff']:.3g} "
                f"(max rel {v['max_rel_diff']:.3g}; worst tensor {v['worst_tensor']}) [{time.perf_counter() - t0:.1f} s]")
            t0 = time.perf_counter()
            ref = reference_check(method, models, {t: outs / f"{method}-{t}" for t in tools}, cfg)
            verify[f"{method} vs reference"] = ref
            log(f"reference {method} ({len(ref['tensors'])} tensors, {ref['elements']} elements, "
                f"{time.perf_counter() - t0:.1f} s): " + ", ".join(
                    f"{t} {ref[t]['differing']} elements ({ref[t]['fraction_differing'] * 100:.4f}%) differ (max "
                    f"{ref[t]['max_ulps']:.3g} ulp, "
                    f"|diff| {ref[t]['max_abs_diff']:.3g})"
                    for t in tools))
            if not args.mergekit_dtype_check:
                continue
            out = outs / f"{method}-mergequant-mkdtype"
            shutil.rmtree(out, ignore_errors=True)
            r = run_measured(command("mergequant", method, out) + ["--mergekit-dtype"],
                             run_dir / f"{method}-mergequant-mkdtype.log", args.poll_ms / 1000, env)
            r.update(method=method, tool="mergequant --mergekit-dtype")
            if r["returncode"] != 0:
                log(f"mergequant --mergekit-dtype {method} failed (exit {r['returncode']}), see its log")
                continue
            v = compare_outputs(out, outs / f"{method}-mergekit")
            v["run"] = r
            verify[f"{method} (mergequant --mergekit-dtype)"] = v
            log(f"verify {method} with mergequant --mergekit-dtype ({r['wall_s']:.2f} s, RssAnon "
                f"{r['peak_rss_anon'] / GiB:.2f} GiB): {v['fraction_differing'] * 100:.4f}% of elements differ, "
                f"max |diff| {v['max_abs_diff']:.3g} (worst tensor {v['worst_tensor']})")

    print()
    print(f"## {args.size} ({shape['layers']} layers, {n_params / 1e9:.3f}B params/model, 3 inputs = "
          f"{input_bytes / GiB:.2f} GiB, output {out_data_bytes / GiB:.2f} GiB), best of {args.repeat}, warm page cache")
    print(f"disk floor {floor:.2f} s = read inputs {floor_read:.2f} s + write+fsync output {floor_write:.2f} s "
          f"(fastest of {len(floors)} samples each)")
    print(fmt_table(rows))
    print("wall: fastest run; RssAnon/RSS: highest peak over all runs (process tree, polled every "
          f"{args.poll_ms:g} ms); read: storage read_bytes + read() syscall bytes (mmap'd page-cache reads count as 0); "
          "written: storage write_bytes; mergequant fsyncs its output, mergekit does not (its flush is untimed).")
    print("startup (interpreter + imports, included in the wall times): " +
          ", ".join(f"{t} {v['wall_s']:.2f} s" for t, v in startup.items()))
    for method, v in verify.items():
        if method.endswith("vs reference"):
            print(f"{method} (independent float64 formula; TIES: exact top-k, threshold ties kept in index order; "
                  f"{len(v['tensors'])} tensors): " + ", ".join(
                      f"{t} {v[t]['differing']} elements ({v[t]['fraction_differing'] * 100:.4f}%) differ (max "
                      f"{v[t]['max_ulps']:.3g} bf16 ulp, "
                      f"|diff| {v[t]['max_abs_diff']:.3g})"
                      for t in tools))
            continue
        print(f"agreement with mergekit, {method}: {v['fraction_differing'] * 100:.4f}% of elements differ, "
              f"max |diff| {v['max_abs_diff']:.3g} ({v['max_rel_diff']:.3g} of the tensor's max |x|; "
              f"worst: {v['worst_tensor']})")

    result = {
        "size": args.size, "layers": shape["layers"], "config": cfg, "params_per_model": n_params,
        "input_bytes": input_bytes, "output_data_bytes": out_data_bytes, "repeat": args.repeat,
        "poll_ms": args.poll_ms, "page_cache": "warm (inputs read once before any timing, and again before each run)",
        "machine": info, "recipes": {m: RECIPES[m] for m in methods},
        "commands": {f"{m}-{t}": command(t, m, outs / f"{m}-{t}") for m in methods for t in tools},
        "disk_floor": {"total_s": floor, "read_s": floor_read, "write_fsync_s": floor_write,
                       "how": "fastest input read + fastest write+fsync over all samples", "samples": floors},
        "startup": startup, "table": rows, "runs": runs, "verify": verify,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"merge-{tag}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
