"""The in-memory map of a tablet: the entries written since its last flush.

Writes must be cheap, so `add` only appends the Arrow table it is given; sorting is deferred to
the first read. A read sorts only the adds that arrived since the previous read and keeps the
result as a sorted run; runs are merged geometrically (a new run is merged into the next older
one while it is at least half that run's size), so a map built from many small adds holds
O(log n) runs and sorts each entry O(log n) times in all, however reads and writes interleave.
A full-range read merges all runs into one and keeps it, so repeated scans after a batch of
writes sort nothing. A bounded read slices each run by binary search on the row and merges only
the slices.

Presorted input skips the sort: clients often write batches that are already in key order (bulk
loads, slices of sorted runs, log replay), and a flush spent most of its time re-sorting them.
When every add is strictly increasing in key order (checked with vectorised comparisons of
neighbours, about 1 ms per 100,000 entries) and the adds' key ranges do not overlap, their
concatenation ordered by first key *is* the sorted run, so no sort runs; the same holds for
merging runs whose ranges are disjoint. Strictness matters: with all keys distinct the key order
is total, so the result is exactly what the sort would give; identical keys (which must be
ordered by sequence number and position) always take the sort.

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
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lithify.data.key import ENTRY_SCHEMA, SORT_KEYS, neighbour_order, sort_tuple, sort_tuple_at
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
#: Runs whose chunks average fewer rows than this are combined into one chunk.
_MIN_CHUNK_ROWS = 16_384
#: Adds out of arrival order are put in key order without a sort only up to this many.
_MAX_REORDERED_ADDS = 256
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
        self._presorted = 0

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

    @property
    def presorted_count(self) -> int:
        """How many of `sort_count` needed no sort because the input was already in order."""
        return self._presorted

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
        return _merge_runs(runs)[0].drop_columns([_SEQ])

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
                runs.insert(0, self._counted(_sort_adds(pending)))
                while len(runs) >= 2 and runs[0].num_rows * 2 >= runs[1].num_rows:
                    runs[0:2] = [self._counted(_merge_runs(runs[0:2]))]
            if full and len(runs) > 1:
                runs = [self._counted(_merge_runs(runs))]
            with self._lock:
                if self._state is st:
                    del st.pending[:taken]
                    st.runs = runs
            return runs

    def _counted(self, result: tuple[pa.Table, bool]) -> pa.Table:
        """Count one sort (and whether the presorted path served it); return the run."""
        run, presorted = result
        self._sorts += 1
        self._presorted += presorted
        return run


def _sort_adds(adds: list[tuple[pa.Table, int]]) -> tuple[pa.Table, bool]:
    """One sorted run (ENTRY_SCHEMA + `_seq`) of unsorted adds, and whether it was presorted.

    Identical keys are ordered by sequence number, then by position (later first); the position
    is a temporary sort key rather than a stored column, so it costs nothing after the sort.
    """
    lengths = np.array([t.num_rows for t, _ in adds], dtype=np.int64)
    seqs = np.repeat(np.array([seq for _, seq in adds], dtype=np.int64), lengths)
    table = _defragment(pa.concat_tables([t for t, _ in adds]))
    table = table.append_column(_SEQ, pa.array(seqs))
    presorted = _presorted(table, lengths)
    if presorted is not None:
        return presorted, True
    keys = table.select([*_KEY_NAMES, _SEQ]).append_column(
        _ORD, pa.array(np.arange(table.num_rows, dtype=np.int64))
    )
    order = pc.sort_indices(keys, sort_keys=[*_RUN_SORT_KEYS, (_ORD, "descending")])
    return _take(table, order), False


def _merge_runs(runs: list[pa.Table]) -> tuple[pa.Table, bool]:
    """One sorted run from runs listed newest first (stable: at an equal key and seq, the newer
    run's entry stays first), and whether their ranges were disjoint (no sort needed)."""
    firsts = [sort_tuple_at(r, 0) for r in runs]
    lasts = [sort_tuple_at(r, r.num_rows - 1) for r in runs]
    order = _disjoint_order(firsts, lasts)
    if order is not None:
        return _defragment(pa.concat_tables([runs[i] for i in order])), True
    table = pa.concat_tables(runs)
    keys = table.select([*_KEY_NAMES, _SEQ])
    return _take(table, pc.sort_indices(keys, sort_keys=_RUN_SORT_KEYS)), False


def _presorted(table: pa.Table, lengths: np.ndarray) -> pa.Table | None:
    """`table` (the adds of `lengths` rows, concatenated) in key order without sorting, or None.

    Possible when every add is strictly increasing in key order and the adds' key ranges are
    disjoint: the adds ordered by first key then form the sorted run. One vectorised pass over
    the neighbours of the concatenation decides both (the pairs that straddle two adds are
    exempt); usually the adds arrived in order and the concatenation is the answer as it is.
    Otherwise the adds are ordered by their first keys in Python, for a bounded number of adds.
    """
    before, _ = neighbour_order(table, SORT_KEYS)
    if before.all():
        return table
    if len(lengths) > _MAX_REORDERED_ADDS:
        return None  # ordering many small adds in Python costs more than the sort saves
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    inside = before.copy()
    inside[starts[1:] - 1] = True  # pair (last of an add, first of the next)
    if not inside.all():
        return None
    ends = starts + lengths - 1
    firsts = _sort_keys(table, starts)
    lasts = _sort_keys(table, ends)
    order = _disjoint_order(firsts, lasts)
    if order is None:
        return None
    return _defragment(pa.concat_tables([table.slice(starts[i], lengths[i]) for i in order]))


def _disjoint_order(firsts: list[tuple], lasts: list[tuple]) -> list[int] | None:
    """The order (by first key) of sorted runs with these first and last keys, if their key
    ranges are disjoint: each run's last key strictly below the next run's first key. Then
    their concatenation in that order is sorted, with every key distinct across runs, so it
    is exactly what a stable sort of them gives."""
    order = sorted(range(len(firsts)), key=firsts.__getitem__)
    for a, b in itertools.pairwise(order):
        if not lasts[a] < firsts[b]:
            return None
    return order


def _sort_keys(table: pa.Table, rows: np.ndarray) -> list[tuple]:
    """The keys of the given entries as tuples in key order (one gather for all of them)."""
    picked = table.select(_KEY_NAMES).take(pa.array(rows))
    return [sort_tuple(*k) for k in zip(*picked.to_pydict().values(), strict=True)]


def _defragment(table: pa.Table) -> pa.Table:
    """`table` in one chunk per column if its chunks are small on average.

    Many small adds (a few mutations each) would otherwise leave thousands of chunks, and every
    later step (comparisons, slicing, merges, the flush's writer) pays per chunk.
    """
    chunks = table.column(0).num_chunks if table.num_columns else 0
    if chunks > 1 and table.num_rows < chunks * _MIN_CHUNK_ROWS:
        return table.combine_chunks()
    return table


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
