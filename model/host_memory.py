"""Keep freed host memory in the process instead of handing it back to the kernel (glibc malloc).

Why: glibc serves every allocation above its mmap threshold (at most 32 MiB; in threads other than
the main one, far smaller ones too, from per-thread arenas) with a fresh `mmap` and unmaps it on free.
The kernel then page-faults and zeroes each page of the next such tensor again. A VAE decode is a
chain of large activations (a 64-channel 512x512 float32 map is 64 MiB), so on CPU it spent more
time in the kernel than in some of its convolutions: measured on the tiny official-format VAE at
512x512, 550k page faults and 0.85 s of system time per reference decode (1.1 s wall), 135k for the
fast decoder; none with the memory kept, and the decodes take 0.64 and 0.49 s (docs/benchmarks.md).
PyTorch's CUDA allocator caches for the same reason; on CPU it leaves this to malloc.

`retain_freed_memory()` tells glibc to serve large blocks from the heap (no mmap), to never trim the
heap, and to use one arena for every thread, so a worker thread reuses what the last request freed.
The price: the process's resident memory stays at its peak instead of falling back between requests,
as it does with a caching GPU allocator. Nothing changes on a libc without `mallopt` (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

# glibc's <malloc.h> parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def retain_freed_memory() -> bool:
    """Configure glibc malloc as described above; True if it took. Call it early, before the threads
    that will allocate start (the arena limit applies to threads that have none yet)."""
    mallopt = _mallopt()
    if mallopt is None:
        log.info("host memory: no glibc mallopt here; freed memory goes back to the system")
        return False
    # mallopt returns 1 on success. -1 disables trimming (mallopt(3)); 0 mmaps: large blocks from the heap.
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    ok = all(mallopt(param, value) == 1 for param, value in settings)
    log.info("host memory: freed memory kept for reuse (glibc malloc: one arena, no mmap, no trim): %s", ok)
    return ok


def _mallopt() -> Callable[[int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return fn
