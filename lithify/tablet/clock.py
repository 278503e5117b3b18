"""Server-assigned timestamps, monotonic per tablet.

A write without a timestamp gets the tablet's time (SYSTEM.md 1). Two writes to one tablet must
never get timestamps that go backwards, even if the wall clock does (NTP steps, a restart on a
host whose clock is behind), or a later write could be hidden behind an earlier one. So each
assignment is max(now, last + 1). Recovery and bulk import move the clock past the timestamps
they bring in that the clock could have handed out itself (at most `FOLLOW_AHEAD_MS` ahead of
the wall clock or of the tablet's time); a timestamp further ahead was supplied by a client and,
as when it is written, must not drag the tablet's time along with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from lithify.data.key import ENTRY_SCHEMA
from lithify.errors import LithifyError

#: The largest timestamp (a signed 64-bit integer).
MAX_TIMESTAMP = 2**63 - 1

#: How far ahead of max(wall clock, tablet time) a replayed or imported timestamp may be and
#: still move the clock. The clock gets past the wall clock only by one tick per write (many
#: writes in one millisecond) or by a wall clock that was ahead before a restart; an hour covers
#: both. A timestamp further ahead was written by a client, and following it could leave the
#: tablet's time stuck in the future, or at MAX_TIMESTAMP where no write can be stamped.
FOLLOW_AHEAD_MS = 60 * 60 * 1000


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
            if ts > MAX_TIMESTAMP:
                raise LithifyError(
                    f"the tablet's time is {self._last}, the largest timestamp, and cannot "
                    "advance: a write without a timestamp cannot be given one"
                )
            self._last = ts
            return ts

    def observe(self, ts: int) -> None:
        """Move the clock to at least `ts`, uncapped: for a time the tablet itself recorded
        (its persisted time). Entries replayed or imported go through `follow` instead."""
        with self._lock:
            if ts > self._last:
                self._last = ts

    def follow(self, timestamps: pa.Array | pa.ChunkedArray | Iterable[int | None]) -> None:
        """Move the clock to the largest of `timestamps` (replayed from a log or read in an
        imported file) that it could have handed out: at most `FOLLOW_AHEAD_MS` past the wall
        clock or the clock's own time. Larger ones were client-supplied and are ignored, as
        are nulls; a batch may mix both kinds."""
        if not isinstance(timestamps, pa.Array | pa.ChunkedArray):
            timestamps = pa.array(list(timestamps), pa.int64())
        if not len(timestamps):
            return
        with self._lock:
            limit = min(max(self._now_ms(), self._last) + FOLLOW_AHEAD_MS, MAX_TIMESTAMP)
            kept = pc.filter(timestamps, pc.less_equal(timestamps, pa.scalar(limit, pa.int64())))
            top = pc.max(kept).as_py()
            if top is not None and top > self._last:
                self._last = top

    def observe_table(self, table: pa.Table) -> None:
        """`follow` the timestamps of an entry table."""
        self.follow(table.column("timestamp"))

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
