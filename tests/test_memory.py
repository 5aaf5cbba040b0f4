"""release_free_memory really hands freed heap memory back (Linux/glibc only)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mergequant.memory import _glibc_malloc_trim, release_free_memory


def _rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon")


@pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc_malloc_trim() is None, reason="glibc only")
def test_trim_returns_freed_heap_memory():
    big = torch.ones(20 * 2**20 // 4)  # freeing a 20 MB mmapped block raises glibc's mmap threshold...
    del big
    keep = torch.ones(1)
    blocks = [torch.ones(2 * 2**20 // 4) for _ in range(96)]  # ...so these 2 MB blocks come from the heap
    keep = torch.ones(2 * 2**20 // 4)  # allocated last: pins the top of the heap, so free() cannot shrink it
    before = _rss_anon_mib()
    del blocks
    freed_without_trim = before - _rss_anon_mib()
    release_free_memory()
    after = _rss_anon_mib()
    assert before - after > 150, (before, after, freed_without_trim)
    assert keep.sum() > 0


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc_malloc_trim() is None, reason="glibc only")
def test_mapped_allocations_free_without_a_trim():
    """Inside ``mapped_allocations`` blocks above the threshold are mmapped: freeing them returns the
    memory at once, where the same pattern on the heap stays resident until a trim. Run in a fresh
    interpreter: blocks are taken from free heap chunks left by earlier tests before anything is mapped."""
    code = """
import torch
from mergequant.memory import mapped_allocations

def anon():
    return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon:')).split()[1]) / 1024

def pattern():
    blocks = [torch.ones(2 * 2**20 // 4) for _ in range(96)]
    keep = torch.ones(2 * 2**20 // 4)  # pins the top of the heap
    before = anon()
    del blocks
    return before - anon(), keep

with mapped_allocations(2**20):  # first: later, the heap's free chunks would serve these blocks
    mapped_freed, k2 = pattern()
heap_freed, k1 = pattern()  # the threshold is now glibc's dynamic maximum: 2 MB blocks come from the heap
print(heap_freed, mapped_freed)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    heap_freed, mapped_freed = map(float, out[-2:])
    assert heap_freed < 50, heap_freed  # the premise: on the heap, freed blocks stay resident
    assert mapped_freed > 150, mapped_freed



def test_steady_heap_fixes_glibcs_thresholds_where_a_long_run_ends_up(monkeypatch):
    """``steady_heap`` sets the mmap threshold to glibc's dynamic maximum (32 MiB) and the top-of-heap trim
    threshold to twice that (glibc's own rule), so a pass's freed top of heap stays for the next pass.
    (A measurement of the freed top of heap in a subprocess was not deterministic: whether a block pattern
    ends at the top of the heap depends on the interpreter's allocations around it.)"""
    import mergequant.memory as memory

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(memory, "_glibc", lambda: FakeLibc())
    memory.steady_heap()
    assert dict(calls) == {-3: 32 * 2**20, -1: 64 * 2**20}  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    calls.clear()
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    memory.steady_heap()  # not glibc: nothing to set, no error
    assert calls == []


def test_trims_inside_a_layer_only_ahead_of_large_hessians(monkeypatch):
    """GPTQ returns freed memory before a capture or solve only when its Hessian is at least
    TRIM_BEFORE_HESSIAN_BYTES (large mapped solve temporaries would stack on resident free memory);
    small ones skip the trim whose memory the next pass would fault in again."""
    from mergequant.quant import gptq_method

    calls = []
    monkeypatch.setattr(gptq_method, "release_free_memory", lambda: calls.append(1))
    k_min = next(k for k in range(1, 1 << 16) if 4 * k * k >= gptq_method.TRIM_BEFORE_HESSIAN_BYTES)
    gptq_method._release_before(k_min - 1)
    gptq_method._release_before(384)
    assert calls == []
    gptq_method._release_before(k_min)
    gptq_method._release_before(5632)
    assert calls == [1, 1]
