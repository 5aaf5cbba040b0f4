#!/usr/bin/env python
"""Where does a mergequant TIES merge spend its time? Per-tensor phase timings, measured in-process.

Runs ``mergequant.merge.run.run_merge`` on a recipe (e.g. one written by merge_bench.py under
bench/work/runs/<tag>/ties.yaml) with timers wrapped, at runtime, around the engine's phases when the
installed mergequant has them (nothing under mergequant/ is modified):

- ``kernels.topk_threshold``          exact top-k selection for one (tensor, model): bracket passes + select
- ``kernels._bracket_pass``           one chunk of the candidate-collecting pass (older, sample-bracket top-k)
- ``kernels._select_from_candidates`` picking the threshold among the collected candidates (+ candidate count)
- ``kernels._hist_high/_hist_low/_nth_equal``  one chunk of each pass of the histogram top-k (newer kernels)
- ``kernels.combine_chunk``           the fused per-chunk combine
- ``engine._sample_abs_delta``        the |delta| sample that brackets the threshold

Times are per thread and summed (two workers run concurrently, so sums exceed wall time).

    python bench/ties_phases.py bench/work/runs/1b-22/ties.yaml [--workers 1] [--top 10]

The wrapped names follow mergequant's internals and change with them; whatever is absent is skipped.
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
        # Python-level names the engine/kernels look up at call time (numba dispatchers included); each is wrapped
        # only when this version of mergequant has it. Extras pick counts out of the arguments where known.
        for attr, key, extra in [
            ("topk_threshold", "topk", lambda chunks, n, *a, **kw: {"n": n}),
            ("_select_from_candidates", "select", lambda vals, *a, **kw: {"candidates": len(vals)}),
            ("combine_chunk", "combine", None),
            ("linear_chunk", "linear", None),
            ("_bracket_pass", "bracket_chunk", None),  # sample-bracket top-k (older kernels)
            ("_hist_high", "hist_high_chunk", None),   # two-level histogram top-k (newer kernels)
            ("_hist_low", "hist_low_chunk", None),
            ("_nth_equal", "nth_equal_chunk", None),
        ]:
            if hasattr(K, attr):
                setattr(K, attr, _timed(getattr(K, attr), key, extra))
                wrapped.append(f"kernels.{attr}")
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
    for k in ("tensor_s", "topk_s", "select_s", "bracket_chunk_s", "hist_high_chunk_s", "hist_low_chunk_s",
              "nth_equal_chunk_s", "combine_s", "linear_s", "sample_s"):
        if k in total:
            print(f"  {k:18s} {total[k]:8.1f} s  ({total[k] / max(total['tensor_s'], 1e-9) * 100:5.1f}% of tensor time)")
    for k in ("bracket_chunk_calls", "hist_high_chunk_calls", "hist_low_chunk_calls", "nth_equal_chunk_calls"):
        if k in total:
            print(f"  {k}: {int(total[k])}")
    cols = [k for k in ("topk_s", "select_s", "bracket_chunk_s", "hist_high_chunk_s", "hist_low_chunk_s",
                        "nth_equal_chunk_s", "combine_s", "linear_s") if k in total]
    show_cand = "candidates" in total

    def line(label, width, st, count=None):
        cells = [f"{label:{width}s}"] + ([f"{int(count):5d}"] if count is not None else [])
        cells += [f"{int(st.get('numel', 0)):11d}", f"{st.get('tensor_s', 0):8.2f}"]
        cells += [f"{st.get(k, 0):{max(8, len(k) - 2)}.2f}" for k in cols]
        if show_cand:  # candidates per (tensor, model) as a fraction of the tensor (2 models in merge_bench's recipe)
            cells.append(f"{st.get('candidates', 0) / max(2 * st.get('numel', 0), 1):7.3f}")
        return " ".join(cells)

    heads = [f"{k[:-2]:>{max(8, len(k) - 2)}s}" for k in cols] + ([f"{'cand/n':>7s}"] if show_cand else [])
    print(f"\n{'tensor':48s} {'numel':>11s} {'total s':>8s} " + " ".join(heads))
    for name, st in rows[: args.top]:
        print(line(name, 48, st))
    kinds = collections.defaultdict(lambda: collections.defaultdict(float))
    for name, st in rows:
        kind = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        kinds[kind]["count"] += 1
        for k, v in st.items():
            kinds[kind][k] += v
    print(f"\nby kind (seconds summed over the tensors of that kind):\n{'kind':34s} {'count':>5s} {'numel':>11s} "
          f"{'total s':>8s} " + " ".join(heads))
    for kind, st in sorted(kinds.items(), key=lambda kv: -kv[1].get("tensor_s", 0)):
        print(line(kind, 34, st, st["count"]))
    if show_cand:
        print("cand/n: candidates handed to the selection per (tensor, model), as a fraction of the tensor's elements")
    if args.json:
        args.json.write_text(json.dumps({"wall_s": wall, "workers": args.workers, "totals": total,
                                         "tensors": {k: dict(v) for k, v in rows}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
