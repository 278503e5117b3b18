"""glibc malloc settings for the merge's large, short-lived buffers.

Every merge round allocates and frees buffers of tens of megabytes (sort keys, permutations,
gathered columns; numpy and Arrow's system pool both use malloc). With glibc's defaults a freed
buffer that size goes back to the kernel (munmap, or trimming the top of the heap) and the next
round faults fresh zeroed pages in: a two-part compaction of the benchmark spent about a quarter
of its CPU in the kernel that way, and page faults of one process serialise on its memory map,
so the two threads also waited on each other. Keeping such buffers in the process halves the
kernel time; the price is that the process keeps up to its peak merge memory (which the
compaction's memory budget bounds) instead of returning it between rounds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger(__name__)

#: mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: The largest mmap threshold glibc accepts on 64-bit (allocations above it are mmapped).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of the heap kept before trimming it back to the kernel.
TRIM_THRESHOLD = 1 << 30

_lock = threading.Lock()
_applied: bool | None = None


def keep_merge_buffers() -> bool:
    """Apply the settings once per process; False where malloc is not glibc's (nothing done)."""
    global _applied
    with _lock:
        if _applied is not None:
            return _applied
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            mallopt = getattr(libc, "mallopt", None)
        except OSError:
            mallopt = None
        if mallopt is None:
            _applied = False
            return False
        ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
        if not ok:
            log.debug("mallopt refused the merge buffer settings")
        _applied = ok
        return ok
