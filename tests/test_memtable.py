"""The in-memory map (order, last write wins, ranges, the sort cache, freezing) and the clock."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lithify.data.key import ENTRY_SCHEMA, sort_tuple
from lithify.data.mutation import INPUT_SCHEMA
from lithify.data.ranges import FULL_RANGE, RowRange
from lithify.errors import LithifyError
from lithify.tablet.clock import FOLLOW_AHEAD_MS, MAX_TIMESTAMP
from lithify.tablet.memtable import InMemoryMap, TabletClock

Entry = tuple[bytes, bytes, bytes, bytes, int, bool, bytes]


def table_of(rows: list[Entry]) -> pa.Table:
    cols = list(zip(*rows, strict=True)) if rows else [[] for _ in ENTRY_SCHEMA.names]
    return pa.table(
        {name: list(col) for name, col in zip(ENTRY_SCHEMA.names, cols, strict=True)},
        schema=ENTRY_SCHEMA,
    )


def as_tuples(table: pa.Table) -> list[Entry]:
    d = table.to_pydict()
    return list(zip(*(d[name] for name in ENTRY_SCHEMA.names), strict=True))


def reference(adds: list[tuple[list[Entry], int]], rng: RowRange = FULL_RANGE) -> list[Entry]:
    """Key order; among identical keys higher seq, then later add, then later row first."""
    tagged = []
    for a, (rows, seq) in enumerate(adds):
        for i, e in enumerate(rows):
            if rng.contains(e[0]):
                tagged.append((sort_tuple(*e[:6]), -seq, -a, -i, e))
    tagged.sort(key=lambda t: t[:4])
    return [t[4] for t in tagged]


def random_entries(gen: np.random.Generator, n: int, keys: int = 40) -> list[Entry]:
    """Entries from a small key space, so identical keys and equal rows are common."""
    out = []
    for _ in range(n):
        k = int(gen.integers(0, keys))
        out.append(
            (
                b"r%02d" % (k % 13),
                b"f%d" % (k % 3),
                b"q%d" % (k % 2),
                b"" if k % 5 else b"vis",
                int(gen.integers(0, 3)),
                bool(gen.integers(0, 2)),
                gen.bytes(4),
            )
        )
    return out


# -- order -----------------------------------------------------------------------------------


def test_sorted_order_equals_reference() -> None:
    gen = np.random.default_rng(7)
    m = InMemoryMap()
    adds = []
    for seq in range(1, 30):
        rows = random_entries(gen, int(gen.integers(0, 60)))
        adds.append((rows, seq))
        m.add(table_of(rows), seq)
        if seq % 4 == 0:
            assert as_tuples(m.sorted_table()) == reference(adds)
    out = m.sorted_table()
    assert out.schema.equals(ENTRY_SCHEMA)
    assert as_tuples(out) == reference(adds)
    assert m.entries == sum(len(r) for r, _ in adds)


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, object]]:
    """Adds with increasing (sometimes repeated) seqs, interleaved with full and ranged reads."""
    entry = st.tuples(
        st.sampled_from([b"a", b"b", b"bb", b"c"]),
        st.sampled_from([b"", b"f"]),
        st.sampled_from([b"", b"q"]),
        st.sampled_from([b"", b"v"]),
        st.integers(0, 2),
        st.booleans(),
        st.binary(max_size=3),
    )
    bound = st.one_of(st.none(), st.sampled_from([b"a", b"b", b"ba", b"bb", b"c"]))
    ops: list[tuple[str, object]] = []
    seq = 1
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["add", "add", "add", "read"]))
        if kind == "add":
            seq += draw(st.integers(0, 1))
            ops.append(("add", (draw(st.lists(entry, max_size=8)), seq)))
        else:
            rng = RowRange(draw(bound), draw(bound), draw(st.booleans()), draw(st.booleans()))
            ops.append(("read", rng))
    ops.append(("read", FULL_RANGE))
    return ops


@settings(max_examples=100, deadline=None)
@given(operations())
def test_map_matches_reference_under_any_interleaving(ops: list[tuple[str, object]]) -> None:
    m = InMemoryMap()
    adds: list[tuple[list[Entry], int]] = []
    for kind, arg in ops:
        if kind == "add":
            rows, seq = arg  # type: ignore[misc]
            adds.append((rows, seq))
            m.add(table_of(rows), seq)
        else:
            assert as_tuples(m.sorted_table(arg)) == reference(adds, arg)  # type: ignore[arg-type]


def test_last_write_wins_among_identical_keys() -> None:
    key = (b"row", b"f", b"q", b"", 5, False)
    m = InMemoryMap()
    m.add(table_of([(*key, b"first")]), 1)
    m.add(table_of([(*key, b"second"), (*key, b"third")]), 2)
    assert [e[6] for e in as_tuples(m.sorted_table())] == [b"third", b"second", b"first"]
    m.sorted_table()
    m.add(table_of([(*key, b"fourth")]), 3)
    assert as_tuples(m.sorted_table())[0][6] == b"fourth"


def test_a_re_added_older_sequence_does_not_win() -> None:
    """A tablet re-adds a failed flush's entries with their old sequence number: newer writes
    already in the map must still come first."""
    key = (b"row", b"f", b"q", b"", 5, False)
    m = InMemoryMap()
    m.add(table_of([(*key, b"new")]), 10)
    m.add(table_of([(*key, b"old")]), 4)
    assert [e[6] for e in as_tuples(m.sorted_table())] == [b"new", b"old"]


def test_range_filter() -> None:
    gen = np.random.default_rng(3)
    m = InMemoryMap()
    adds = []
    for seq in range(1, 6):
        rows = random_entries(gen, 50)
        adds.append((rows, seq))
        m.add(table_of(rows), seq)
        if seq == 2:
            m.sorted_table()  # leaves two runs: a merged one and the later adds
    ranges = [
        FULL_RANGE,
        RowRange(b"r03", b"r07"),
        RowRange.rows(b"r03", b"r07"),
        RowRange(b"r03", b"r07", start_inclusive=True, end_inclusive=False),
        RowRange(None, b"r05"),
        RowRange(b"r05", None),
        RowRange(b"r050", b"r051"),
        RowRange(b"r99", None),
        RowRange(b"r07", b"r03"),
        RowRange.rows(b"r04", b"r04"),
    ]
    for rng in ranges:
        assert as_tuples(m.sorted_table(rng)) == reference(adds, rng), rng


# -- the sort cache --------------------------------------------------------------------------


def test_sorted_result_is_cached_until_the_next_add() -> None:
    gen = np.random.default_rng(5)
    m = InMemoryMap()
    for seq in range(1, 11):
        m.add(table_of(random_entries(gen, 100)), seq)
    first = m.sorted_table()
    sorts = m.sort_count
    assert sorts == 1  # ten adds, one sort
    for _ in range(5):
        assert m.sorted_table().equals(first)
        m.sorted_table(RowRange(b"r02", b"r08"))
    assert m.sort_count == sorts

    m.add(table_of(random_entries(gen, 10)), 11)
    m.sorted_table(RowRange(b"r02", b"r08"))
    assert m.sort_count == sorts + 1  # the new add alone: no merge with the big run
    m.sorted_table(RowRange(b"r00", b"r04"))
    assert m.sort_count == sorts + 1
    full = m.sorted_table()
    assert m.sort_count == sorts + 2  # the full read merges the two runs, once
    assert m.sorted_table().equals(full)
    assert m.sort_count == sorts + 2


def test_many_small_adds_keep_few_runs() -> None:
    gen = np.random.default_rng(11)
    m = InMemoryMap()
    adds = []
    for seq in range(1, 200):
        rows = random_entries(gen, 5)
        adds.append((rows, seq))
        m.add(table_of(rows), seq)
        m.sorted_table(RowRange(b"r05", b"r06"))
    assert len(m._state.runs) <= 10
    assert as_tuples(m.sorted_table()) == reference(adds)


# -- counters, validation, freezing ----------------------------------------------------------


def test_counters_and_empty_adds() -> None:
    m = InMemoryMap()
    assert (m.entries, m.size_bytes, m.min_seq, m.max_seq) == (0, 0, None, None)
    assert m.sorted_table().num_rows == 0
    assert m.sorted_table().schema.equals(ENTRY_SCHEMA)
    m.add(ENTRY_SCHEMA.empty_table(), 3)
    assert (m.entries, m.min_seq) == (0, None)
    t = table_of(random_entries(np.random.default_rng(1), 20))
    m.add(t, 8)
    m.add(t, 5)
    assert (m.entries, m.min_seq, m.max_seq) == (40, 5, 8)
    assert m.size_bytes == 2 * t.nbytes


def test_add_validates_schema_and_timestamps() -> None:
    m = InMemoryMap()
    with pytest.raises(ValueError, match="timestamps"):
        m.add(pa.table({"row": [b"r"], "family": [b""], "qualifier": [b""], "visibility": [b""],
                        "timestamp": pa.array([None], pa.int64()), "deleted": [False],
                        "value": [b""]}, schema=INPUT_SCHEMA), 1)  # fmt: skip
    with pytest.raises(ValueError, match="columns"):
        m.add(pa.table({"row": [b"r"]}), 1)
    # INPUT_SCHEMA without nulls is accepted and stored as ENTRY_SCHEMA.
    ok = table_of([(b"r", b"", b"", b"", 1, False, b"v")]).cast(INPUT_SCHEMA)
    m.add(ok, 1)
    assert m.sorted_table().schema.equals(ENTRY_SCHEMA)


def test_freeze_moves_contents_and_the_map_goes_on() -> None:
    gen = np.random.default_rng(9)
    m = InMemoryMap()
    before = random_entries(gen, 30)
    m.add(table_of(before), 1)
    m.sorted_table()
    frozen = m.freeze()
    assert frozen.frozen and not m.frozen
    assert (frozen.entries, frozen.max_seq, m.entries, m.max_seq) == (30, 1, 0, None)
    sorts = frozen.sort_count
    assert as_tuples(frozen.sorted_table()) == reference([(before, 1)])
    assert frozen.sort_count == sorts  # the run sorted before freezing is reused
    with pytest.raises(RuntimeError, match="frozen"):
        frozen.add(table_of(before), 2)
    after = random_entries(gen, 10)
    m.add(table_of(after), 2)
    assert as_tuples(m.sorted_table()) == reference([(after, 2)])


def test_concurrent_adds_and_reads() -> None:
    m = InMemoryMap()
    gen = np.random.default_rng(13)
    batches = [table_of(random_entries(gen, 50, keys=10_000)) for _ in range(40)]
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for seq, t in enumerate(batches, 1):
                m.add(t, seq)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            done.set()

    def reader() -> None:
        seen = 0
        try:
            for _ in range(10_000):
                finished = done.is_set()
                out = m.sorted_table(RowRange(b"r02", b"r09") if seen % 2 else FULL_RANGE)
                keys = [sort_tuple(*e[:6]) for e in as_tuples(out)]
                assert keys == sorted(keys)
                seen += 1
                if finished:
                    return
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert m.sorted_table().num_rows == 40 * 50


# -- the clock -------------------------------------------------------------------------------


def _input(timestamps: list[int | None]) -> pa.Table:
    n = len(timestamps)
    return pa.table(
        {
            "row": [b"r%d" % i for i in range(n)],
            "family": [b""] * n,
            "qualifier": [b""] * n,
            "visibility": [b""] * n,
            "timestamp": pa.array(timestamps, pa.int64()),
            "deleted": [False] * n,
            "value": [b"v"] * n,
        },
        schema=INPUT_SCHEMA,
    )


def test_clock_fills_only_null_timestamps_with_one_timestamp_per_call() -> None:
    clock = TabletClock(now_ms=lambda: 1000)
    out = clock.assign(_input([None, 7, None]))
    assert out.schema.equals(ENTRY_SCHEMA)
    assert out.column("timestamp").to_pylist() == [1000, 7, 1000]
    assert clock.assign(_input([3, 4])).column("timestamp").to_pylist() == [3, 4]
    assert clock.last == 1000  # no nulls, no timestamp consumed
    assert clock.assign(_input([None])).column("timestamp").to_pylist() == [1001]


def test_clock_never_goes_backwards() -> None:
    now = [5000]
    clock = TabletClock(now_ms=lambda: now[0])
    seen = []
    for wall in [5000, 5000, 4000, 6000, 100, 6000]:
        now[0] = wall
        seen.append(clock.assign(_input([None])).column("timestamp")[0].as_py())
    assert seen == [5000, 5001, 5002, 6000, 6001, 6002]


def test_clock_observe_moves_it_forward_only() -> None:
    clock = TabletClock(now_ms=lambda: 10)
    clock.observe(500)
    clock.observe(20)
    assert clock.last == 500
    clock.observe_table(_input([None, 900, 30]))
    assert clock.next() == 901
    assert TabletClock(last=50, now_ms=lambda: 10).next() == 51


def test_clock_does_not_follow_far_future_client_timestamps() -> None:
    hour = FOLLOW_AHEAD_MS
    clock = TabletClock(now_ms=lambda: 1000)
    clock.observe_table(_input([MAX_TIMESTAMP]))
    clock.observe_table(_input([1000 + hour + 1]))
    clock.follow([None, MAX_TIMESTAMP])
    assert clock.last == 0
    clock.follow([1000 + hour])  # slightly ahead: could be the clock's own
    assert clock.last == 1000 + hour
    # A mixed batch (a log record may hold both kinds): the largest followable one wins; the
    # limit is measured from the clock's time when it is ahead of the wall clock.
    clock.observe_table(_input([5, None, 1000 + 2 * hour + 1, 1000 + 2 * hour - 7, 2**62]))
    assert clock.last == 1000 + 2 * hour - 7
    clock.follow([])
    assert clock.next() == 1000 + 2 * hour - 6
    # The tablet's own persisted time is not capped, and nothing overflows near the top.
    clock.observe(MAX_TIMESTAMP - 1)
    clock.follow([MAX_TIMESTAMP])
    assert clock.last == MAX_TIMESTAMP


def test_clock_next_past_the_largest_timestamp_raises() -> None:
    clock = TabletClock(last=MAX_TIMESTAMP - 1, now_ms=lambda: 10)
    assert clock.next() == MAX_TIMESTAMP
    with pytest.raises(LithifyError, match=f"tablet's time is {MAX_TIMESTAMP}.*cannot advance"):
        clock.next()
    with pytest.raises(LithifyError):
        clock.assign(_input([None]))
    assert clock.last == MAX_TIMESTAMP
    assert clock.assign(_input([3])).column("timestamp").to_pylist() == [3]


def test_clock_is_monotonic_across_threads() -> None:
    clock = TabletClock()
    results: list[list[int]] = [[] for _ in range(4)]

    def work(k: int) -> None:
        for _ in range(500):
            results[k].append(clock.next())

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    everything = [ts for r in results for ts in r]
    assert len(set(everything)) == len(everything) == 2000
    assert all(r == sorted(r) for r in results)
