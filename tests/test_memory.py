"""release_free_memory really hands freed heap memory back (Linux/glibc only)."""

from __future__ import annotations

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


@pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc_malloc_trim() is None, reason="glibc only")
def test_mapped_allocations_free_without_a_trim():
    """Inside ``mapped_allocations`` blocks above the threshold are mmapped: freeing them returns the
    memory at once, even where the same pattern on the heap (above) stays resident until a trim."""
    from mergequant.memory import mapped_allocations

    big = torch.ones(20 * 2**20 // 4)  # raise glibc's dynamic threshold, as in the test above
    del big
    with mapped_allocations(2**20):
        blocks = [torch.ones(2 * 2**20 // 4) for _ in range(96)]
        keep = torch.ones(2 * 2**20 // 4)
        before = _rss_anon_mib()
        del blocks
        after = _rss_anon_mib()
    assert before - after > 150, (before, after)
    assert keep.sum() > 0
