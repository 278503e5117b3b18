"""The one streaming k-way merge, used by scans and compactions alike.

Sources are sorted runs of entries (Arrow record batches in ENTRY_SCHEMA), listed newest first.
The merge works in rounds so that memory is bounded by about (number of sources x batch_size)
entries whatever the input size:

1. every source buffers at least half a batch of entries (or all it has left); its window is
   the first half batch of them;
2. the cut-off is the smallest "last key" among the windows: every entry <= cut-off that any
   source will ever produce is now buffered, because each source is sorted;
3. the part <= cut-off of every buffer (found by binary search) is merged with one stable sort
   of byte-string keys (`sort_key`; ties keep source order, so the newest source's copy of a
   duplicate comes first), then duplicates, versions and deletes are resolved with vectorised
   numpy operations and every column is gathered once;
4. the state of the last column (its key, puts and deletes seen) carries into the next round,
   because a column's versions may straddle the cut-off.

Visibility rule: a delete at T hides every version of its column with timestamp <= T; in key
order a delete comes before everything it hides, so "hidden" is "a delete was seen earlier in
the column". `versions` keeps the newest puts of each column; `propagate_deletes` keeps the
newest delete marker of each column (partial compactions must, lest an older file resurface).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lithify.compaction import sort_key
from lithify.compaction.iterators import CompactionIterator, load_iterators
from lithify.data import gather
from lithify.data.key import (
    COLUMN_FIELDS,
    ENTRY_SCHEMA,
    SORT_KEYS,
    BatchKeys,
    bools,
    neighbour_order,
)
from lithify.errors import CompactionCancelledError
from lithify.files.writer import WORK_MEMORY_POOL

KeyTuple = tuple[bytes, bytes, bytes, bytes, int, bool]

#: Pool for the merge's short-lived buffers (see `WORK_MEMORY_POOL`).
MEMORY_POOL: pa.MemoryPool = WORK_MEMORY_POOL


@dataclass(slots=True)
class _Carry:
    """What the merge remembers of the last column of the previous round."""

    col: tuple[bytes, bytes, bytes, bytes] | None = None
    timestamp: int = 0
    deleted: bool = False
    deletes: int = 0
    puts: int = 0


class _Source:
    """One sorted run and its buffered batches (the unconsumed entries read so far)."""

    __slots__ = ("it", "bufs", "rows", "done")

    def __init__(self, it: Iterator[pa.RecordBatch]) -> None:
        self.it = it
        self.bufs: list[pa.RecordBatch] = []
        self.rows = 0
        self.done = False

    def fill(self, want: int, check: Callable[[], None]) -> None:
        """Buffer at least `want` entries, or all that are left (then the source is done).

        Keeping every source's buffer full keeps the rounds large: a round takes each source's
        entries up to the smallest "last key", and a source holding only the leftover of its
        previous batch would make that cut-off, and the round, tiny.
        """
        while not self.done and self.rows < want:
            check()
            try:
                b = next(self.it)
            except StopIteration:
                self.done = True
                return
            if isinstance(b, pa.Table):
                b = b.combine_chunks().to_batches()[0] if b.num_rows else None
                if b is None:
                    continue
            if b.num_rows == 0:
                continue
            if b.schema != ENTRY_SCHEMA:
                b = pa.RecordBatch.from_arrays(b.columns, schema=ENTRY_SCHEMA)
            self.bufs.append(b)
            self.rows += b.num_rows

    def window_last(self, limit: int) -> KeyTuple:
        """The key of the last entry among the first `limit` buffered ones."""
        seen = 0
        for b in self.bufs:
            if seen + b.num_rows >= limit:
                return BatchKeys(b)[limit - seen - 1]
            seen += b.num_rows
        return BatchKeys(self.bufs[-1])[-1]

    def take_through(self, cutoff: KeyTuple) -> list[pa.RecordBatch]:
        """Remove and return the buffered entries whose keys are <= `cutoff`."""
        out: list[pa.RecordBatch] = []
        while self.bufs:
            b = self.bufs[0]
            keys = BatchKeys(b)
            if keys[-1] <= cutoff:
                out.append(b)
                self.bufs.pop(0)
                self.rows -= b.num_rows
                continue
            cut = 0 if keys[0] > cutoff else bisect.bisect_right(keys, cutoff)
            if cut:
                out.append(b.slice(0, cut))
                self.bufs[0] = b.slice(cut)
                self.rows -= cut
            break
        return out


def merge_sorted(
    sources: Sequence[Iterable[pa.RecordBatch]],
    *,
    versions: int | None,
    propagate_deletes: bool,
    batch_size: int = 65536,
    iterators: Sequence[CompactionIterator | tuple[str, dict[str, str]]] = (),
    on_progress: Callable[[int, int], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Merge sorted `sources` (newest first) into key-ordered batches of <= batch_size entries.

    Raises CompactionCancelledError as soon as `is_cancelled()` (asked before every batch read
    and every round) returns true. `on_progress(entries_read, entries_written)` is called after
    every round.
    """
    if versions is not None and versions < 1:
        raise ValueError(f"versions must be None or >= 1, got {versions}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    its: list[CompactionIterator] = [
        it for it in iterators if isinstance(it, CompactionIterator)
    ] + load_iterators([it for it in iterators if not isinstance(it, CompactionIterator)])

    def check() -> None:
        if is_cancelled is not None and is_cancelled():
            raise CompactionCancelledError("merge cancelled")

    srcs = [_Source(iter(s)) for s in sources]
    carry = _Carry()
    read = written = 0
    # A bounded loop: every round consumes at least one entry from some source.
    # Half a batch per source: enough for large rounds, while a source holds 1.5 batches at most
    # (its reader's batches are `batch_size`), so memory stays within the callers' budgets.
    window = (batch_size + 1) // 2
    while True:
        for s in srcs:
            s.fill(window, check)
        live = [s for s in srcs if s.rows]
        if not live:
            break
        check()
        # Every entry <= cutoff that any source will ever produce is buffered now (each source
        # is sorted), and the source that set it gives its whole window: the round is not empty.
        cutoff = min(s.window_last(window) for s in live)
        parts = [p for s in live for p in s.take_through(cutoff)]
        n_in = sum(p.num_rows for p in parts)
        read += n_in
        out = _merge_round(parts, versions, propagate_deletes, carry)
        for it in its:
            if out.num_rows:
                out = it.apply(out)
        written += out.num_rows
        for start in range(0, out.num_rows, batch_size):
            yield out.slice(start, batch_size) if out.num_rows > batch_size else out
        if on_progress is not None:
            on_progress(read, written)


def _merge_round(
    parts: list[pa.RecordBatch], versions: int | None, propagate: bool, carry: _Carry
) -> pa.RecordBatch:
    """Sort the parts (each sorted) into key order and resolve duplicates/versions/deletes."""
    batch = parts[0] if len(parts) == 1 else pa.concat_batches(parts, memory_pool=MEMORY_POOL)
    order, same_col = _order(batch, presorted=len(parts) == 1)
    ts = batch.column(4).to_numpy()
    dl = bools(batch.column(5))
    if order is not None:
        ts, dl = ts[order], dl[order]
    first = 0 if order is None else int(order[0])
    last = batch.num_rows - 1 if order is None else int(order[-1])
    keys = BatchKeys(batch)
    first_col, last_col = keys[first][:4], keys[last][:4]
    keep = _resolve(same_col, ts, dl, first_col, last_col, versions, propagate, carry)
    if keep is None:
        return batch if order is None else gather.take(batch, order, MEMORY_POOL)
    chosen = np.flatnonzero(keep) if order is None else order[keep]
    return gather.take(batch, chosen, MEMORY_POOL)


def _order(batch: pa.RecordBatch, presorted: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """(permutation into key order or None if already in order, same-column flags in key order:
    [i] tells whether entry i is a version of entry i-1's column, [0] is false).

    Byte-string sort keys (see `sort_key`) make this one run-adaptive sort; keys too wide to
    encode fall back to Arrow's multi-column sort. Entries already in order (one source) need
    no keys: comparing neighbours column by column is cheaper than encoding them.
    """
    n = batch.num_rows
    keys = None if presorted else sort_key.encode(batch)
    if keys is not None:
        order = sort_key.merge_order(keys)
        return order, sort_key.same_column(keys.keys[order], keys.column_bytes)
    order = None
    cols = batch
    if not presorted:
        idx = pc.sort_indices(batch, sort_keys=SORT_KEYS, memory_pool=MEMORY_POOL)
        order = idx.to_numpy()
        cols = pc.take(batch.select(list(COLUMN_FIELDS)), idx, memory_pool=MEMORY_POOL)
    same_col = np.zeros(n, dtype=bool)
    same_col[1:] = neighbour_order(cols, SORT_KEYS[: len(COLUMN_FIELDS)], order=False)[1]
    return order, same_col


def _resolve(
    same_col: np.ndarray,
    ts: np.ndarray,
    dl: np.ndarray,
    first_col: tuple[bytes, bytes, bytes, bytes],
    last_col: tuple[bytes, bytes, bytes, bytes],
    versions: int | None,
    propagate: bool,
    carry: _Carry,
) -> np.ndarray | None:
    """Mask of entries to keep (None: keep all), for entries in key order; updates `carry`.

    `same_col` says whether entry i is a version of entry i-1's column; `ts` and
    `dl` are the timestamps and delete flags in key order; `first_col`/`last_col` the column keys
    of the first and last entry, to continue the column carried over from the previous round.
    """
    n = len(ts)
    continuing = carry.col is not None and first_col == carry.col
    if not continuing and not same_col[1:].any():
        # Every entry is the only one of its column (a flush, usually): nothing hides anything,
        # so each put is kept and each delete kept only when deletes propagate.
        _carry_last_column(carry, last_col, int(ts[-1]), bool(dl[-1]), int(dl[-1]), int(not dl[-1]))
        return None if propagate or not dl.any() else ~dl
    same_col = same_col.copy()
    same_col[0] = continuing
    same_key = same_col.copy()
    same_key[1:] &= (ts[1:] == ts[:-1]) & (dl[1:] == dl[:-1])
    if continuing:
        same_key[0] = bool(ts[0] == carry.timestamp and dl[0] == carry.deleted)
    live = ~same_key
    is_del = live & dl
    is_put = live & ~dl
    new_group = ~same_col

    def before_in_group(flags: np.ndarray, carried: int) -> np.ndarray:
        excl = np.cumsum(flags, dtype=np.int64) - flags
        base = np.maximum.accumulate(np.where(new_group, excl, 0))
        out = excl - base
        if continuing and carried:
            first_new = int(np.argmax(new_group)) if new_group.any() else n
            out[:first_new] += carried
        return out

    del_before = before_in_group(is_del, carry.deletes)
    put_rank = before_in_group(is_put, carry.puts)
    keep = is_put & (del_before == 0)
    if versions is not None:
        keep &= put_rank < versions
    if propagate:
        keep |= is_del & (del_before == 0)

    _carry_last_column(
        carry,
        last_col,
        int(ts[-1]),
        bool(dl[-1]),
        int(del_before[-1] + is_del[-1]),
        int(put_rank[-1] + is_put[-1]),
    )
    if keep.all():
        return None
    return keep


def _carry_last_column(
    carry: _Carry,
    col: tuple[bytes, bytes, bytes, bytes],
    timestamp: int,
    deleted: bool,
    deletes: int,
    puts: int,
) -> None:
    """Remember the round's last column for the next round: its key, its last entry's
    timestamp and delete flag, and the deletes and puts of it seen so far."""
    carry.col = col
    carry.timestamp = timestamp
    carry.deleted = deleted
    carry.deletes = deletes
    carry.puts = puts


def merged_table(
    sources: Sequence[Iterable[pa.RecordBatch]],
    *,
    versions: int | None,
    propagate_deletes: bool,
    **kwargs: object,
) -> pa.Table:
    """All of `merge_sorted`'s output as one table (small inputs: tests, tools)."""
    batches = list(
        merge_sorted(sources, versions=versions, propagate_deletes=propagate_deletes, **kwargs)  # type: ignore[arg-type]
    )
    return pa.Table.from_batches(batches, schema=ENTRY_SCHEMA)


__all__ = ["merge_sorted", "merged_table", "COLUMN_FIELDS"]
