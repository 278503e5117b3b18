"""The streaming merge against a naive reference: duplicates, versions, deletes, ranges,
iterators, bounded memory and cancellation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lithify.compaction.compactor_job import CompactionRequest, run_compaction
from lithify.compaction.iterators import AgeOffFilter, CompactionIterator, load_iterators
from lithify.compaction.merge import merge_sorted, merged_table
from lithify.data.key import ENTRY_SCHEMA, sort_tuple
from lithify.data.ranges import FileRef, RowRange
from lithify.errors import CompactionCancelledError, ConfigError
from lithify.files.reader import SortedFileReader
from lithify.files.storage import Storage
from lithify.files.writer import write_entries

Entry = tuple[bytes, bytes, bytes, bytes, int, bool, bytes]


# -- the reference ---------------------------------------------------------------------------


def to_entries(table: pa.Table | pa.RecordBatch) -> list[Entry]:
    cols = [table.column(n).to_pylist() for n in ENTRY_SCHEMA.names]
    return list(zip(*cols, strict=True))


def to_table(entries: Sequence[Entry]) -> pa.Table:
    cols = list(zip(*entries, strict=True)) if entries else [[]] * len(ENTRY_SCHEMA)
    return pa.table(
        [pa.array(list(c), f.type) for f, c in zip(ENTRY_SCHEMA, cols, strict=True)],
        schema=ENTRY_SCHEMA,
    )


def sort_entries(entries: Sequence[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: sort_tuple(*e[:6]))


def reference_merge(
    sources: Sequence[Sequence[Entry]],
    *,
    versions: int | None,
    propagate_deletes: bool,
    rng: RowRange | None = None,
    min_timestamp: int | None = None,
) -> list[Entry]:
    """Entry-at-a-time merge of sources listed newest first, by the rules of SYSTEM.md 1."""
    tagged = [
        (sort_tuple(*e[:6]), si, j, e)
        for si, src in enumerate(sources)
        for j, e in enumerate(src)
        if rng is None or rng.contains(e[0])
    ]
    tagged.sort(key=lambda t: (t[0], t[1], t[2]))
    out: list[Entry] = []
    prev = col = None
    deletes = puts = 0
    for key, _, _, e in tagged:
        if key == prev:
            continue
        prev = key
        if key[:4] != col:
            col, deletes, puts = key[:4], 0, 0
        if e[5]:
            if deletes == 0 and propagate_deletes:
                out.append(e)
            deletes += 1
        else:
            if deletes == 0 and (versions is None or puts < versions):
                out.append(e)
            puts += 1
    if min_timestamp is not None:
        out = [e for e in out if e[4] >= min_timestamp]
    return out


# -- strategies ------------------------------------------------------------------------------

entry_st = st.tuples(
    st.sampled_from([b"a", b"b", b"b\x00", b"c"]),
    st.sampled_from([b"f", b"g"]),
    st.sampled_from([b"", b"q"]),
    st.sampled_from([b"", b"v"]),
    st.integers(0, 6),
    st.booleans(),
    st.binary(max_size=3),
)
sources_st = st.lists(st.lists(entry_st, max_size=40).map(sort_entries), max_size=5)


def batched(entries: Sequence[Entry], size: int) -> list[pa.RecordBatch]:
    return to_table(entries).to_batches(max_chunksize=size)


# -- tests -----------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sources=sources_st,
    versions=st.sampled_from([1, 2, None]),
    propagate=st.booleans(),
    batch_size=st.integers(1, 9),
    chunk=st.integers(1, 12),
)
def test_merge_matches_reference(
    sources: list[list[Entry]], versions: int | None, propagate: bool, batch_size: int, chunk: int
) -> None:
    got = merged_table(
        [batched(s, chunk) for s in sources],
        versions=versions,
        propagate_deletes=propagate,
        batch_size=batch_size,
    )
    want = reference_merge(sources, versions=versions, propagate_deletes=propagate)
    assert to_entries(got) == want
    for b in merge_sorted(
        [batched(s, chunk) for s in sources],
        versions=versions,
        propagate_deletes=propagate,
        batch_size=batch_size,
    ):
        assert 0 < b.num_rows <= batch_size


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sources=sources_st, versions=st.sampled_from([1, None]), ttl=st.integers(0, 6))
def test_age_off_matches_reference(
    sources: list[list[Entry]], versions: int | None, ttl: int
) -> None:
    it = AgeOffFilter()
    it.init({"ttl": str(ttl), "currentTime": "6"})
    got = merged_table(
        [batched(s, 4) for s in sources],
        versions=versions,
        propagate_deletes=False,
        batch_size=3,
        iterators=[it],
    )
    want = reference_merge(
        sources, versions=versions, propagate_deletes=False, min_timestamp=6 - ttl
    )
    assert to_entries(got) == want


def test_duplicates_keep_newest_source() -> None:
    k = (b"r", b"f", b"q", b"", 5, False)
    got = merged_table(
        [batched([(*k, b"new")], 1), batched([(*k, b"old")], 1), batched([(*k, b"older")], 1)],
        versions=None,
        propagate_deletes=True,
    )
    assert to_entries(got) == [(*k, b"new")]


def test_delete_rules() -> None:
    col = (b"r", b"f", b"q", b"")
    src = [
        (*col, 9, False, b"v9"),
        (*col, 7, True, b""),
        (*col, 7, False, b"v7"),
        (*col, 5, True, b""),
        (*col, 3, False, b"v3"),
    ]
    drop = to_entries(merged_table([batched(src, 2)], versions=None, propagate_deletes=False))
    assert drop == [(*col, 9, False, b"v9")]
    keep = to_entries(merged_table([batched(src, 2)], versions=None, propagate_deletes=True))
    assert keep == [(*col, 9, False, b"v9"), (*col, 7, True, b"")]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sources=sources_st,
    fences=st.lists(
        st.tuples(
            st.sampled_from([None, b"a", b"b", b"b\x00"]), st.sampled_from([None, b"b", b"c"])
        ),
        min_size=5,
        max_size=5,
    ),
    extent=st.tuples(st.sampled_from([None, b"a"]), st.sampled_from([None, b"b\x00", b"c"])),
)
def test_fenced_files_match_reference(
    tmp_path_factory: pytest.TempPathFactory,
    sources: list[list[Entry]],
    fences: list[tuple[bytes | None, bytes | None]],
    extent: tuple[bytes | None, bytes | None],
) -> None:
    storage = Storage(str(tmp_path_factory.mktemp("fenced")))
    ext = RowRange(*extent)
    readers, want_sources = [], []
    for i, s in enumerate(sources):
        write_entries(storage, f"f{i}.parquet", to_table(s), row_group_size=3)
        fence = RowRange(*fences[i])
        readers.append(SortedFileReader.open(storage, f"f{i}.parquet"))
        want_sources.append([e for e in s if fence.contains(e[0]) and ext.contains(e[0])])
    try:
        got = merged_table(
            [
                r.batches(RowRange(*fences[i]).intersect(ext), batch_size=2)
                for i, r in enumerate(readers)
            ],
            versions=1,
            propagate_deletes=False,
            batch_size=4,
        )
    finally:
        for r in readers:
            r.close()
    assert to_entries(got) == reference_merge(want_sources, versions=1, propagate_deletes=False)


def test_empty_sources() -> None:
    assert list(merge_sorted([], versions=1, propagate_deletes=False)) == []
    assert list(merge_sorted([[], iter(())], versions=1, propagate_deletes=False)) == []


def _big_source(n: int, seed: int, batch: int, pulled: list[int]) -> Iterator[pa.RecordBatch]:
    import random

    rnd = random.Random(seed)
    rows = sorted(b"%08d" % rnd.randrange(10**8) for _ in range(n))
    table = to_table([(r, b"f", b"q", b"", seed, False, b"v") for r in rows])
    for b in table.to_batches(max_chunksize=batch):
        pulled[0] += b.num_rows
        yield b


def test_memory_is_bounded_by_sources_times_batch_size() -> None:
    k, n, batch = 5, 20_000, 500
    pulled = [0]
    held: list[int] = []
    round_sizes: list[int] = []
    last_read = [0]

    def progress(read: int, written: int) -> None:
        held.append(pulled[0] - read)  # buffered in the merge, not yet merged
        round_sizes.append(read - last_read[0])
        last_read[0] = read

    out = 0
    first_yield_pulled = None
    for b in merge_sorted(
        [_big_source(n, s, batch, pulled) for s in range(k)],
        versions=1,
        propagate_deletes=False,
        batch_size=batch,
        on_progress=progress,
    ):
        assert b.num_rows <= batch
        if first_yield_pulled is None:
            first_yield_pulled = pulled[0]
        out += b.num_rows
    assert out > 0.9 * k * n
    assert first_yield_pulled is not None and first_yield_pulled <= k * batch
    assert max(held) <= k * batch
    assert max(round_sizes) <= k * batch
    assert len(round_sizes) > (k * n) / (k * batch)


def test_cancellation_in_merge() -> None:
    calls = [0]

    def cancelled() -> bool:
        calls[0] += 1
        return calls[0] > 5

    pulled = [0]
    with pytest.raises(CompactionCancelledError):
        for _ in merge_sorted(
            [_big_source(5000, s, 100, pulled) for s in range(3)],
            versions=1,
            propagate_deletes=False,
            batch_size=100,
            is_cancelled=cancelled,
        ):
            pass
    assert pulled[0] < 3 * 5000


def test_cancelled_compaction_deletes_temp_file(tmp_path) -> None:
    storage = Storage(str(tmp_path))
    inputs = []
    for s in range(3):
        pulled = [0]
        t = pa.Table.from_batches(list(_big_source(20_000, s, 1000, pulled)))
        info = write_entries(storage, f"tables/t/F{s}.parquet", t, row_group_size=1000)
        inputs.append(FileRef(info.path, info.size, info.entries))
    seen = []

    def progress(read: int, written: int) -> None:
        seen.append(read)

    def cancelled() -> bool:
        return bool(seen) and seen[-1] > 0

    req = CompactionRequest(
        inputs=inputs,
        extent_range=RowRange(),
        output_path="tables/t/A1.parquet",
        tmp_id="x1",
        propagate_deletes=False,
        subcompactions=2,
        min_subcompaction_entries=1000,
        batch_size=500,
    )
    with pytest.raises(CompactionCancelledError):
        run_compaction(storage, req, on_progress=progress, is_cancelled=cancelled)
    assert sorted(storage.list_files("")) == [f"tables/t/F{s}.parquet" for s in range(3)]


class DropValueX(CompactionIterator):
    """A user iterator: drops entries whose value is b'x'."""

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        import pyarrow.compute as pc

        return batch.filter(pc.not_equal(batch.column("value"), pa.scalar(b"x", pa.binary())))


def test_iterator_specs_are_loaded() -> None:
    src = [(b"a", b"f", b"q", b"", 1, False, b"x"), (b"b", b"f", b"q", b"", 1, False, b"y")]
    got = merged_table(
        [batched(src, 1)],
        versions=1,
        propagate_deletes=False,
        iterators=[(f"{__name__}:DropValueX", {})],
    )
    assert to_entries(got) == [src[1]]


def test_load_iterators_errors() -> None:
    with pytest.raises(ConfigError, match="no_such_module:Nope"):
        load_iterators([("no_such_module:Nope", {})])
    with pytest.raises(ConfigError, match="lithify.compaction.iterators:Nope"):
        load_iterators([("lithify.compaction.iterators:Nope", {})])
    with pytest.raises(ConfigError, match="module:Class"):
        load_iterators([("AgeOffFilter", {})])
    with pytest.raises(ConfigError, match="not a CompactionIterator"):
        load_iterators([("lithify.errors:ConfigError", {})])
    with pytest.raises(ConfigError, match="ttl"):
        load_iterators([("lithify.compaction.iterators:AgeOffFilter", {})])
    with pytest.raises(ConfigError, match="ttl"):
        load_iterators([("lithify.compaction.iterators:AgeOffFilter", {"ttl": "soon"})])
    (it,) = load_iterators(
        [("lithify.compaction.iterators:AgeOffFilter", {"ttl": "10", "currentTime": "100"})]
    )
    assert isinstance(it, AgeOffFilter) and it.cutoff == 90


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sources=sources_st, versions=st.sampled_from([1, None]), propagate=st.booleans())
def test_merge_without_byte_keys_matches_reference(
    sources: list[list[Entry]], versions: int | None, propagate: bool
) -> None:
    """Keys too wide for byte-string sort keys take Arrow's multi-column sort instead."""
    from lithify.compaction import sort_key

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sort_key, "MAX_KEY_BYTES", 0)
        got = merged_table(
            [batched(s, 4) for s in sources],
            versions=versions,
            propagate_deletes=propagate,
            batch_size=5,
        )
    want = reference_merge(sources, versions=versions, propagate_deletes=propagate)
    assert to_entries(got) == want
