"""Give freed memory back to the OS between decoder layers (glibc ``malloc_trim``).

Why this exists: torch allocates CPU tensors with ``malloc``. glibc's mmap threshold is dynamic:
each time an mmapped block is freed the threshold rises to its size (up to 32 MiB), so after the
first large temporary every tensor below 32 MiB comes from the heap, and freed heap memory stays
resident unless it sits at the top of the heap. A layer-by-layer quantizer allocates and frees
thousands of 1-30 MiB temporaries, so the resident set ratchets up layer after layer.
``malloc_trim(0)`` between layers hands every free heap page back.

Measured on a 2-layer copy of a 1B Llama (GPTQ w4g128, 16 x 512 tokens): pinning the mmap threshold
at 1 MiB for the whole run (``mallopt``) lowered the peak by another ~80 MiB but cost 17% wall time
(and 50% on the tiny Llama) in page faults: the forward passes allocate and free the same
activation-sized blocks thousands of times, which the heap recycles for free. So the threshold is
lowered only around the GPTQ solve (``mapped_allocations``): a few dozen large temporaries, whose
memory then goes straight back to the OS instead of staying in the heap (-10 to -40 MiB at the peak
for +0.3 s per 1B down_proj solve).
No-op where glibc is not the allocator (macOS, Windows, musl).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
# glibc's own upper bound for its dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX), i.e.
# where the dynamic threshold ends up after the first large free: restored after a scoped change
MMAP_THRESHOLD_DYNAMIC_MAX = 32 * 2**20


@functools.lru_cache(maxsize=1)
def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def _glibc_malloc_trim():
    libc = _glibc()
    return None if libc is None else libc.malloc_trim


@contextlib.contextmanager
def mapped_allocations(threshold: int = 2**20):
    """Within the block, every allocation of ``threshold`` bytes or more gets its own mmap, so freeing
    it returns the memory to the OS at once (glibc; a no-op elsewhere). Afterwards the threshold is
    set to glibc's dynamic maximum, where a long-running process's threshold sits anyway."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_DYNAMIC_MAX)


def steady_heap() -> None:
    """Fix glibc's mmap threshold at its dynamic maximum (32 MiB) and the top-of-heap trim threshold at
    twice that, where a long-running process's thresholds end up anyway (a no-op elsewhere).

    Why: the dynamic thresholds start at 128 KiB / 256 KiB and follow the sizes of freed mmapped
    blocks, and the first ``mapped_allocations`` freezes them wherever they were. A quantizer's
    passes over a small model free activation-sized blocks at the top of the heap after every pass;
    with a trim threshold frozen at a few MiB, glibc handed each of them back and the next pass
    faulted them in again: on the tiny Mixtral's GPTQ run 0.6-1.2 million minor page faults, 2-4 s of
    system time in a 15 s run. Explicit ``release_free_memory`` calls still return everything."""
    libc = _glibc()
    if libc is None:
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_DYNAMIC_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_DYNAMIC_MAX)


def release_free_memory() -> None:
    """Return free heap memory to the OS (glibc ``malloc_trim(0)``); a no-op elsewhere."""
    trim = _glibc_malloc_trim()
    if trim is not None:
        trim(0)
