"""Server-assigned timestamps, monotonic per tablet.

A write without a timestamp gets the tablet's time (SYSTEM.md 1). Two writes to one tablet must
never get timestamps that go backwards, even if the wall clock does (NTP steps, a restart on a
host whose clock is behind), or a later write could be hidden behind an earlier one. So each
assignment is max(now, last + 1), and recovery moves the clock past every timestamp it replays.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from lithify.data.key import ENTRY_SCHEMA


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class TabletClock:
    """Hands out one timestamp per write call; thread-safe."""

    def __init__(self, last: int = 0, now_ms: Callable[[], int] = _now_ms) -> None:
        """`last`: a timestamp already used (for example the tablet's persisted time);
        `now_ms`: the wall clock in milliseconds (injectable for tests)."""
        self._lock = threading.Lock()
        self._last = last
        self._now_ms = now_ms

    @property
    def last(self) -> int:
        """The latest timestamp assigned or observed."""
        return self._last

    def next(self) -> int:
        """A fresh timestamp: later than every one assigned or observed before."""
        with self._lock:
            ts = max(self._now_ms(), self._last + 1)
            self._last = ts
            return ts

    def observe(self, ts: int) -> None:
        """Move the clock to at least `ts` (a timestamp replayed from a log or read in a file)."""
        with self._lock:
            if ts > self._last:
                self._last = ts

    def observe_table(self, table: pa.Table) -> None:
        """Observe the largest timestamp of an entry table (nulls ignored)."""
        if table.num_rows:
            top = pc.max(table.column("timestamp")).as_py()
            if top is not None:
                self.observe(top)

    def assign(self, table: pa.Table) -> pa.Table:
        """The entries with every null timestamp set to one fresh timestamp, in ENTRY_SCHEMA.

        Client-supplied timestamps are kept and do not move the clock: one client writing a
        timestamp far in the future must not drag the tablet's time along with it. A table
        without nulls consumes no timestamp.
        """
        ts_col = table.column("timestamp")
        if ts_col.null_count:
            filled = pc.fill_null(ts_col, pa.scalar(self.next(), pa.int64()))
            table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp", filled)
        if not table.schema.equals(ENTRY_SCHEMA):
            table = table.select(ENTRY_SCHEMA.names).cast(ENTRY_SCHEMA)
        return table
