"""Compaction threads run at a lower CPU priority than the threads that serve writes and scans.

A tablet server's compactions are background work: when the cores are busy, a write waiting
behind a merge costs a client latency now, while a compaction that ends a little later costs
nothing until files pile up (and the planner bounds that). RocksDB lowers its compaction
threads the same way. Linux keeps a nice value per thread and a new thread inherits its
creator's, so the subcompaction and read-ahead threads a lowered worker starts are lowered too.
"""

from __future__ import annotations

import os
import sys
import threading

#: Nice increment of internal compaction threads (a thread at +5 gets about a third of the CPU
#: of a thread at 0 when both want the same core).
NICE_INCREMENT = 5
_MAX_NICE = 19


def lower_current_thread(increment: int = NICE_INCREMENT) -> bool:
    """Raise the calling thread's nice value by `increment` (capped at 19); False where the
    platform has no per-thread priorities or refuses."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(_MAX_NICE, now + increment))
    except OSError:
        return False
    return True
