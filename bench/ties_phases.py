#!/usr/bin/env python
"""Where does a mergequant TIES merge spend its time? Per-tensor phase timings, measured in-process.

Runs ``mergequant.merge.run.run_merge`` on a recipe (e.g. one written by merge_bench.py under
bench/work/runs/<tag>/ties.yaml) with timers wrapped, at runtime, around the engine's phases when the
installed mergequant has them (nothing under mergequant/ is modified):

- ``kernels.topk_threshold``          exact top-k selection for one (tensor, model): bracket passes + select
- ``kernels._bracket_pass``           one chunk of the candidate-collecting pass (counted per call)
- ``kernels._select_from_candidates`` picking the threshold among the collected candidates (+ candidate count)
- ``kernels.combine_chunk``           the fused per-chunk combine
- ``engine._sample_abs_delta``        the |delta| sample that brackets the threshold

Times are per thread and summed (two workers run concurrently, so sums exceed wall time).

    python bench/ties_phases.py bench/work/runs/1b-22/ties.yaml [--workers 1] [--top 10]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import tempfile
import threading
import time
from pathlib import Path

STATS = collections.defaultdict(lambda: collections.defaultdict(float))
CURRENT = threading.local()
LOCK = threading.Lock()


def _add(tensor: str, key: str, value: float) -> None:
    with LOCK:
        STATS[tensor][key] += value


def _timed(fn, key, extra=None):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            name = getattr(CURRENT, "name", "?")
            _add(name, key + "_s", time.perf_counter() - t0)
            _add(name, key + "_calls", 1)
            if extra:
                for k, v in extra(*a, **kw).items():
                    _add(name, k, v)
    return wrapper


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", type=Path, help="also write the per-tensor table here")
    args = ap.parse_args()

    from mergequant.merge import engine as E
    from mergequant.merge import run as R

    K = getattr(E, "K", None)
    wrapped = []
    if K is not None:
        for attr, key, extra in [
            ("topk_threshold", "topk", lambda chunks, n, k, sample: {"n": n}),
            ("_select_from_candidates", "select", lambda vals, idx, rank: {"candidates": len(vals)}),
            ("combine_chunk", "combine", None),
        ]:
            if hasattr(K, attr):
                setattr(K, attr, _timed(getattr(K, attr), key, extra))
                wrapped.append(f"kernels.{attr}")
        if hasattr(K, "_bracket_pass"):  # numba dispatcher: wrap the Python-level name the caller looks up
            K._bracket_pass = _timed(K._bracket_pass, "bracket_chunk")
            wrapped.append("kernels._bracket_pass")
    if hasattr(E, "_sample_abs_delta"):
        E._sample_abs_delta = _timed(E._sample_abs_delta, "sample")
        wrapped.append("engine._sample_abs_delta")
    orig = E.merge_tensor

    def merge_tensor(plan, tp, *a, **kw):
        CURRENT.name = tp.name
        t0 = time.perf_counter()
        try:
            return orig(plan, tp, *a, **kw)
        finally:
            _add(tp.name, "tensor_s", time.perf_counter() - t0)
            _add(tp.name, "numel", tp.numel)
            CURRENT.name = "?"
    R.merge_tensor = merge_tensor
    print("wrapped:", ", ".join(wrapped) or "nothing (no kernels module)")

    with tempfile.TemporaryDirectory(dir=Path(__file__).parent / "work") as tmp:
        t0 = time.perf_counter()
        R.run_merge(args.recipe, R.MergeOptions(out=Path(tmp) / "out", device="cpu", quiet=True, workers=args.workers),
                    log=lambda m: None)
        wall = time.perf_counter() - t0

    rows = sorted(STATS.items(), key=lambda kv: -kv[1].get("tensor_s", 0))
    total = collections.defaultdict(float)
    for _, s in rows:
        for k, v in s.items():
            total[k] += v
    print(f"run_merge wall {wall:.1f} s with {args.workers} worker(s); summed over threads:")
    for k in ("tensor_s", "topk_s", "select_s", "bracket_chunk_s", "combine_s", "sample_s"):
        if k in total:
            print(f"  {k:18s} {total[k]:8.1f} s  ({total[k] / max(total['tensor_s'], 1e-9) * 100:5.1f}% of tensor time)")
    if "bracket_chunk_calls" in total:
        print(f"  bracket-pass chunk calls: {int(total['bracket_chunk_calls'])}")
    print(f"\n{'tensor':48s} {'numel':>11s} {'total s':>8s} {'topk s':>7s} {'select s':>8s} {'cand':>11s} "
          f"{'cand/n':>7s} {'bracket':>8s} {'combine':>8s}")
    for name, s in rows[: args.top]:
        n = s.get("numel", 0)
        cand = s.get("candidates", 0)
        print(f"{name:48s} {int(n):11d} {s.get('tensor_s', 0):8.2f} {s.get('topk_s', 0):7.2f} {s.get('select_s', 0):8.2f} "
              f"{int(cand):11d} {cand / max(2 * n, 1):7.3f} {s.get('bracket_chunk_s', 0):8.2f} {s.get('combine_s', 0):8.2f}")
    kinds = collections.defaultdict(lambda: collections.defaultdict(float))
    for name, st in rows:
        kind = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        kinds[kind]["count"] += 1
        for k, v in st.items():
            kinds[kind][k] += v
    print(f"\nby kind:\n{'kind':34s} {'count':>5s} {'numel':>11s} {'total s':>8s} {'topk s':>7s} {'select s':>8s} "
          f"{'cand/n':>7s} {'combine':>8s}")
    for kind, st in sorted(kinds.items(), key=lambda kv: -kv[1].get("tensor_s", 0)):
        print(f"{kind:34s} {int(st['count']):5d} {int(st['numel']):11d} {st.get('tensor_s', 0):8.2f} {st.get('topk_s', 0):7.2f} "
              f"{st.get('select_s', 0):8.2f} {st.get('candidates', 0) / max(2 * st['numel'], 1):7.3f} {st.get('combine_s', 0):8.2f}")
    print("cand/n: candidates handed to the selection, per (tensor, model), as a fraction of the tensor's elements")
    if args.json:
        args.json.write_text(json.dumps({"wall_s": wall, "workers": args.workers, "totals": total,
                                         "tensors": {k: dict(v) for k, v in rows}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
