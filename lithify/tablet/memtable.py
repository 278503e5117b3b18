"""The in-memory map of a tablet: the entries written since its last flush.

Writes must be cheap, so `add` only appends the Arrow table it is given; sorting is deferred to
the first read. A read sorts only the adds that arrived since the previous read and keeps the
result as a sorted run; runs are merged geometrically (a new run is merged into the next older
one while it is at least half that run's size), so a map built from many small adds holds
O(log n) runs and sorts each entry O(log n) times in all, however reads and writes interleave.
A full-range read merges all runs into one and keeps it, so repeated scans after a batch of
writes sort nothing. A bounded read slices each run by binary search on the row and merges only
the slices.

Order among identical keys (all six key fields): higher sequence number first, and at an equal
sequence number the later add, and within one add the later row, first. A merge that keeps the
first of identical keys therefore makes the last write win, even when a tablet re-adds entries
with an older sequence number (for example after a failed flush).

Thread-safety: adds and reads may come from different threads. State changes take a short lock;
sorting runs outside it (under a separate lock that serialises sorters), so adds are never
blocked behind a sort. Every table handed out is an immutable Arrow table.

Flushing: `freeze()` moves the current contents into a new, frozen map (which refuses adds) and
leaves this map empty and taking writes. A tablet that prefers to swap maps itself
(`frozen, self.map = self.map, InMemoryMap()` under its lock) may do so; it must then stop
adding to the old map.
"""

from __future__ import annotations

import bisect
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lithify.data.key import ENTRY_SCHEMA, SORT_KEYS
from lithify.data.ranges import FULL_RANGE, RowRange
from lithify.tablet.clock import TabletClock

__all__ = ["InMemoryMap", "TabletClock"]

_SEQ = "_seq"
_ORD = "_ord"
_KEY_NAMES = [name for name, _ in SORT_KEYS]
#: Runs carry the sequence number of each entry so that merges can order identical keys by it.
_RUN_SORT_KEYS = [*SORT_KEYS, (_SEQ, "descending")]
_EMPTY = ENTRY_SCHEMA.empty_table()
#: Below this many rows a take is fast enough on one thread.
_PARALLEL_TAKE_ROWS = 100_000
_take_pool: ThreadPoolExecutor | None = None
_take_pool_lock = threading.Lock()


@dataclass(slots=True)
class _State:
    """Everything a map holds; replaced wholesale by `freeze`, so sorters can detect it."""

    pending: list[tuple[pa.Table, int]] = field(default_factory=list)
    runs: list[pa.Table] = field(default_factory=list)  # newest first, each sorted
    entries: int = 0
    size_bytes: int = 0
    min_seq: int | None = None
    max_seq: int | None = None


class InMemoryMap:
    """A tablet's buffer of unflushed entries, sorted lazily on read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sort_lock = threading.Lock()
        self._state = _State()
        self._frozen = False
        self._sorts = 0

    # -- writes -------------------------------------------------------------------------------

    def add(self, table: pa.Table, seq: int) -> None:
        """Append entries (ENTRY_SCHEMA, timestamps assigned) written with log sequence `seq`.

        Constant work per call, none per entry: validation looks at the schema and null count.
        """
        if table.schema.names != ENTRY_SCHEMA.names:
            raise ValueError(
                f"entries have columns {table.schema.names}, expected {ENTRY_SCHEMA.names}"
            )
        if table.column("timestamp").null_count:
            raise ValueError("entries added to an in-memory map must have timestamps assigned")
        if not table.schema.equals(ENTRY_SCHEMA):
            table = table.cast(ENTRY_SCHEMA)
        if table.num_rows == 0:
            return
        nbytes = table.nbytes
        with self._lock:
            if self._frozen:
                raise RuntimeError("add to a frozen in-memory map")
            st = self._state
            st.pending.append((table, seq))
            st.entries += table.num_rows
            st.size_bytes += nbytes
            st.min_seq = seq if st.min_seq is None else min(st.min_seq, seq)
            st.max_seq = seq if st.max_seq is None else max(st.max_seq, seq)

    # -- counters -----------------------------------------------------------------------------

    @property
    def entries(self) -> int:
        return self._state.entries

    @property
    def size_bytes(self) -> int:
        """Bytes of the entries as added (Arrow buffer sizes), the measure flush limits use."""
        return self._state.size_bytes

    @property
    def min_seq(self) -> int | None:
        return self._state.min_seq

    @property
    def max_seq(self) -> int | None:
        return self._state.max_seq

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def sort_count(self) -> int:
        """How many times adds were sorted or runs merged (lets tests see the cache work)."""
        return self._sorts

    # -- reads --------------------------------------------------------------------------------

    def sorted_table(self, rng: RowRange = FULL_RANGE) -> pa.Table:
        """The entries whose row is inside `rng`, in key order (ENTRY_SCHEMA)."""
        if rng.is_empty():
            return _EMPTY
        runs = self._sorted_runs(full=rng.is_unbounded())
        if not rng.is_unbounded():
            runs = [s for s in (_slice_run(r, rng) for r in runs) if s.num_rows]
        if not runs:
            return _EMPTY
        if len(runs) == 1:
            return runs[0].drop_columns([_SEQ])
        return _merge_runs(runs).drop_columns([_SEQ])

    def freeze(self) -> InMemoryMap:
        """Move everything into a new frozen map (for a flush); this map goes on empty.

        The frozen map keeps the sorted runs already computed, so a flush after a scan does not
        sort again.
        """
        snapshot = InMemoryMap()
        snapshot._frozen = True
        with self._lock:
            snapshot._state, self._state = self._state, _State()
        return snapshot

    # -- sorting ------------------------------------------------------------------------------

    def _sorted_runs(self, *, full: bool) -> list[pa.Table]:
        """The sorted runs covering every add so far (one run when `full`), newest first.

        Sorting happens outside `_lock`; the result is installed only if the map was not frozen
        meanwhile (the caller gets a consistent point-in-time view either way).
        """
        with self._lock:
            st = self._state
            if not st.pending and (len(st.runs) <= 1 or not full):
                return list(st.runs)
        with self._sort_lock:
            with self._lock:
                st = self._state
                taken = len(st.pending)
                pending = st.pending[:taken]
                runs = list(st.runs)
            if pending:
                runs.insert(0, _sort_adds(pending))
                self._sorts += 1
                while len(runs) >= 2 and runs[0].num_rows * 2 >= runs[1].num_rows:
                    runs[0:2] = [_merge_runs(runs[0:2])]
                    self._sorts += 1
            if full and len(runs) > 1:
                runs = [_merge_runs(runs)]
                self._sorts += 1
            with self._lock:
                if self._state is st:
                    del st.pending[:taken]
                    st.runs = runs
            return runs


def _sort_adds(adds: list[tuple[pa.Table, int]]) -> pa.Table:
    """One sorted run (ENTRY_SCHEMA + `_seq`) of unsorted adds.

    Identical keys are ordered by sequence number, then by position (later first); the position
    is a temporary sort key rather than a stored column, so it costs nothing after the sort.
    """
    tables = [
        t.append_column(_SEQ, pa.array(np.full(t.num_rows, seq, np.int64))) for t, seq in adds
    ]
    table = pa.concat_tables(tables)
    keys = table.select([*_KEY_NAMES, _SEQ]).append_column(
        _ORD, pa.array(np.arange(table.num_rows, dtype=np.int64))
    )
    order = pc.sort_indices(keys, sort_keys=[*_RUN_SORT_KEYS, (_ORD, "descending")])
    return _take(table, order)


def _merge_runs(runs: list[pa.Table]) -> pa.Table:
    """One sorted run from runs listed newest first (stable: at an equal key and seq, the newer
    run's entry stays first)."""
    table = pa.concat_tables(runs)
    keys = table.select([*_KEY_NAMES, _SEQ])
    return _take(table, pc.sort_indices(keys, sort_keys=_RUN_SORT_KEYS))


def _take(table: pa.Table, indices: pa.Array) -> pa.Table:
    """`table.take(indices)`, one column per thread for large tables.

    Gathering rows in sorted order is as costly as the sort itself (random access into the
    value buffers), and Arrow's take runs on one thread; columns are independent.
    """
    workers = min(table.num_columns, os.cpu_count() or 1)
    if table.num_rows < _PARALLEL_TAKE_ROWS or workers < 2:
        return table.take(indices)
    global _take_pool
    with _take_pool_lock:
        if _take_pool is None:
            _take_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="memtable-take")
        pool = _take_pool
    columns = list(pool.map(lambda col: col.take(indices), table.columns))
    return pa.Table.from_arrays(columns, schema=table.schema)


def _slice_run(run: pa.Table, rng: RowRange) -> pa.Table:
    """The part of a sorted run whose rows are inside `rng` (contiguous, found by bisection)."""
    rows = run.column("row")
    n = run.num_rows

    def row_at(i: int) -> bytes:
        return rows[i].as_py()

    lo, hi = 0, n
    if rng.start is not None:
        find = bisect.bisect_right if not rng.start_inclusive else bisect.bisect_left
        lo = find(range(n), rng.start, key=row_at)
    if rng.end is not None:
        find = bisect.bisect_right if rng.end_inclusive else bisect.bisect_left
        hi = find(range(n), rng.end, key=row_at)
    return run.slice(lo, max(hi - lo, 0))
