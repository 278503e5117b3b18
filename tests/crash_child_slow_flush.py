"""tests/crash_child.py with slow flushes and a frozen map per write, so that frozen maps queue.

Run with the arguments of crash_child.py. Every write to a tablet freezes the tablet's map
right after it (as the server does at the memory limit, only far more often), and every flush
of a frozen map first sleeps SLOW_FLUSH_S. So a tablet holds several frozen maps, waiting for
or in a flush, committed one by one oldest first, while writes go on: the kill lands in the
middle of that. Each time a tablet holds two or more frozen maps, ``QUEUED <n>`` goes to
stderr, so the parent can check that the situation it tests did happen.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402

from lithify.tablet.tablet import Tablet  # noqa: E402
from tests import crash_child  # noqa: E402

SLOW_FLUSH_S = 0.05

_write_flush_file = Tablet._write_flush_file
_write = Tablet.write


def _slow_write_flush_file(self: Tablet, frozen, path: str):  # type: ignore[no-untyped-def]
    time.sleep(SLOW_FLUSH_S)
    return _write_flush_file(self, frozen, path)


def _write_and_freeze(self: Tablet, entries: pa.Table) -> int:
    seq = _write(self, entries)
    if self.freeze() and self.frozen_maps >= 2:
        sys.stderr.write(f"QUEUED {self.frozen_maps}\n")
        sys.stderr.flush()
    return seq


Tablet._write_flush_file = _slow_write_flush_file  # type: ignore[method-assign]
Tablet.write = _write_and_freeze  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(crash_child.main(sys.argv))
