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
