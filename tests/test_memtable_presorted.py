"""The in-memory map's presorted path: adds already in key order skip the sort.

Every test compares with the reference order of tests/test_memtable.py (key order; among
identical keys higher seq, then later add, then later row first), so the fast path must give
exactly what the sort gives, including identical keys within an add and across adds. The
counters show which path ran.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from lithify.compaction.merge import merge_sorted
from lithify.data.key import COLUMN_FIELDS, SORT_KEYS, neighbour_order, sort_tuple
from lithify.tablet.memtable import InMemoryMap
from tests.test_memtable import Entry, as_tuples, random_entries, reference, table_of


def strictly_increasing(table: pa.Table) -> bool:
    """Whether each entry's key is strictly greater than the one before it."""
    return bool(neighbour_order(table, SORT_KEYS)[0].all())


def _key_sorted(rows: list[Entry]) -> list[Entry]:
    return sorted(rows, key=lambda e: sort_tuple(*e[:6]))


def _entry(row: bytes, ts: int = 5, deleted: bool = False, value: bytes = b"v") -> Entry:
    return (row, b"f", b"q", b"", ts, deleted, value)


def _read(m: InMemoryMap) -> tuple[list[Entry], int, int]:
    """The map's entries in order, and how many sorts (and presorted ones) the read added."""
    sorts, presorted = m.sort_count, m.presorted_count
    out = as_tuples(m.sorted_table())
    return out, m.sort_count - sorts, m.presorted_count - presorted


def _read_adds(adds: list[tuple[list[Entry], int]]) -> tuple[list[Entry], int, int]:
    """`_read` of a fresh map given `adds` (rows, sequence number) in that order."""
    m = InMemoryMap()
    for rows, seq in adds:
        m.add(table_of(rows), seq)
    return _read(m)


# -- which path runs ---------------------------------------------------------------------------


def test_sorted_disjoint_adds_skip_the_sort_in_any_arrival_order() -> None:
    chunks = [[_entry(b"r%03d" % i) for i in range(k * 10, k * 10 + 10)] for k in range(3)]
    adds = [(chunks[1], 1), (chunks[0], 2), (chunks[2], 3)]
    out, sorts, presorted = _read_adds(adds)
    assert out == reference(adds)
    assert (sorts, presorted) == (1, 1)


def test_overlapping_sorted_adds_take_the_sort() -> None:
    adds = [([_entry(b"a"), _entry(b"c")], 1), ([_entry(b"b"), _entry(b"d")], 2)]
    out, sorts, presorted = _read_adds(adds)
    assert out == reference(adds)
    assert (sorts, presorted) == (1, 0)


def test_an_unsorted_add_takes_the_sort() -> None:
    adds = [([_entry(b"b"), _entry(b"a")], 1)]
    out, _, presorted = _read_adds(adds)
    assert out == reference(adds) and presorted == 0


def test_identical_keys_within_an_add_take_the_sort_and_the_later_row_wins() -> None:
    rows = [_entry(b"a"), _entry(b"k", value=b"first"), _entry(b"k", value=b"second")]
    out, _, presorted = _read_adds([(rows, 1)])
    assert presorted == 0
    assert out == reference([(rows, 1)])
    assert [e[6] for e in out if e[0] == b"k"] == [b"second", b"first"]


def test_identical_key_across_adds_takes_the_sort_and_the_higher_seq_wins() -> None:
    older = [_entry(b"a"), _entry(b"k", value=b"old")]
    newer = [_entry(b"k", value=b"new"), _entry(b"z")]
    out, _, presorted = _read_adds([(older, 1), (newer, 2)])
    assert presorted == 0
    assert [e[6] for e in out if e[0] == b"k"] == [b"new", b"old"]


def test_versions_of_one_column_are_sorted_by_timestamp_then_delete_first() -> None:
    in_order = [_entry(b"k", ts=9), _entry(b"k", ts=5, deleted=True), _entry(b"k", ts=5)]
    assert strictly_increasing(table_of(in_order))
    assert not strictly_increasing(table_of(in_order[::-1]))
    out, _, presorted = _read_adds([(in_order, 1)])
    assert presorted == 1 and out == in_order


def test_disjoint_runs_merge_without_sort() -> None:
    """Runs made by earlier reads are concatenated when their ranges do not overlap."""
    low = [_entry(b"a%02d" % i) for i in range(8)]
    high = [_entry(b"b%02d" % i) for i in range(8)]
    m = InMemoryMap()
    m.add(table_of(high), 1)
    m.sorted_table()
    m.add(table_of(low), 2)
    out, sorts, presorted = _read(m)  # sorts the new add, then merges the two runs
    assert out == low + high
    assert sorts == presorted == 2


# -- the fast path gives what the sort gives -----------------------------------------------------


@st.composite
def sorted_slices(draw: st.DrawFn) -> list[tuple[list[Entry], int]]:
    """Adds cut from key-sorted entries (identical keys and equal rows common), in a shuffled
    order, some reversed (unsorted), seqs increasing and sometimes repeated."""
    gen = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pool = _key_sorted(random_entries(gen, draw(st.integers(0, 80)), keys=draw(st.integers(2, 60))))
    if not draw(st.booleans()):  # distinct keys only: the fast path's usual case
        pool = list({sort_tuple(*e[:6]): e for e in pool}.values())
    cuts = sorted(draw(st.lists(st.integers(0, len(pool)), max_size=6)))
    chunks = [pool[a:b] for a, b in zip([0, *cuts], [*cuts, len(pool)], strict=True)]
    order = draw(st.permutations(range(len(chunks))))
    adds, seq = [], 1
    for k in order:
        rows = chunks[k][::-1] if draw(st.integers(0, 9)) == 9 else chunks[k]
        seq += draw(st.integers(0, 1))
        adds.append((rows, seq))
    return adds


@settings(max_examples=200, deadline=None)
@given(sorted_slices(), st.integers(0, 6))
def test_presorted_path_equals_the_sort(adds: list[tuple[list[Entry], int]], read_at: int) -> None:
    m = InMemoryMap()
    for i, (rows, seq) in enumerate(adds):
        m.add(table_of(rows), seq)
        if i == read_at:  # an early read leaves a run to merge with the later adds
            assert as_tuples(m.sorted_table()) == reference(adds[: i + 1])
    assert as_tuples(m.sorted_table()) == reference(adds)


# -- neighbour comparison and the flush shortcut -------------------------------------------------


def test_neighbour_ties_compares_every_key_field() -> None:
    """Pairs in key order that differ in one field only: each is strictly increasing, and
    reversed it is not."""
    base: Entry = (b"r", b"f", b"q", b"v", 5, False, b"x")
    pairs = [
        (base, (b"s", *base[1:])),
        (base, (b"r", b"g", *base[2:])),
        (base, (*base[:2], b"r", *base[3:])),
        (base, (*base[:3], b"w", *base[4:])),
        ((*base[:4], 9, False, b"x"), base),  # newer timestamp first
        ((*base[:4], 5, True, b"x"), base),  # at one timestamp the delete first
    ]
    for first, second in pairs:
        assert strictly_increasing(table_of([first, second])), (first, second)
        assert not strictly_increasing(table_of([second, first])), (first, second)
    assert not strictly_increasing(table_of([base, base]))  # identical keys
    other: Entry = (b"q", *base[1:])
    before, tied = neighbour_order(table_of([base, base, other, base]), [("row", "ascending")])
    assert list(before) == [False, False, True] and list(tied) == [True, False, False]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 50), st.integers(1, 3))
def test_same_column_detection_is_exact_and_a_flush_of_distinct_columns_changes_nothing(
    seed: int, n: int, versions: int
) -> None:
    gen = np.random.default_rng(seed)
    rows = _key_sorted(random_entries(gen, n, keys=int(gen.integers(1, 200))))
    run = table_of(rows)
    columns = [e[: len(COLUMN_FIELDS)] for e in rows]
    once = len(set(columns)) == len(columns)
    column_keys = SORT_KEYS[: len(COLUMN_FIELDS)]
    assert (not neighbour_order(run, column_keys, order=False)[1].any()) == once
    if once:
        merged = pa.Table.from_batches(
            list(merge_sorted([run.to_batches()], versions=versions, propagate_deletes=True)),
            schema=run.schema,
        )
        assert as_tuples(merged) == rows
