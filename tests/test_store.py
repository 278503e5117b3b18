"""The embedded store end to end, on both metadata backends."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import text

import lithify
from lithify import Mutation
from lithify.data.key import ENTRY_SCHEMA, sort_table
from lithify.errors import ConfigError, LithifyError, TableNotFoundError, TableOfflineError


@pytest.fixture
def store(tmp_path, metadata_url):
    s = lithify.open(tmp_path / "store", metadata_url=metadata_url)
    yield s
    s.close()


def rows_of(store: lithify.Store, table: str, *args, **kw) -> list[tuple[bytes, bytes, bytes]]:
    return [(k.row, k.qualifier, v) for k, v in store.scan_entries(table, *args, **kw)]


def put_rows(store: lithify.Store, table: str, rows: list[str], value: str = "v") -> None:
    store.write(table, [Mutation(r.encode()).put("f", "q", f"{value}{r}") for r in rows])


def test_write_scan_flush_compact(store):
    store.create_table("t", splits=["m"])
    put_rows(store, "t", ["a", "z", "n", "b"])
    expect = [(r, b"q", b"v" + r) for r in (b"a", b"b", b"n", b"z")]
    assert rows_of(store, "t") == expect
    store.flush("t")
    assert all(len(t.files) == 1 for t in store.tablets("t"))
    assert rows_of(store, "t") == expect
    put_rows(store, "t", ["c"])
    store.flush("t")
    store.compact("t")
    assert [len(t.files) for t in store.tablets("t")] == [1, 1]
    assert rows_of(store, "t") == sorted([*expect, (b"c", b"q", b"vc")])
    assert rows_of(store, "t", "b", "n") == [
        (b"b", b"q", b"vb"),
        (b"c", b"q", b"vc"),
        (b"n", b"q", b"vn"),
    ]


def test_versions_and_deletes(store):
    store.create_table("t", properties={"table.versions": "2"})
    store.write("t", [Mutation(b"r").put("f", "q", "v1", timestamp=1)])
    store.write("t", [Mutation(b"r").put("f", "q", "v2", timestamp=2)])
    store.flush("t")
    store.write("t", [Mutation(b"r").put("f", "q", "v3", timestamp=3)])
    assert [v for _, v in store.scan_entries("t")] == [b"v3", b"v2"]
    store.write("t", [Mutation(b"r").delete("f", "q", timestamp=2)])
    assert [v for _, v in store.scan_entries("t")] == [b"v3"]
    store.flush("t")
    store.compact("t")
    assert [v for _, v in store.scan_entries("t")] == [b"v3"]
    store.write("t", [Mutation(b"r").delete("f", "q")])
    assert list(store.scan_entries("t")) == []


def test_compact_single_file_tablet_rewrites_it(store):
    store.create_table("t")
    put_rows(store, "t", ["a", "b"])
    store.flush("t")
    before = store.tablets("t")[0].files
    store.compact("t")
    after = store.tablets("t")[0].files
    assert len(after) == 1 and after[0].path != before[0].path
    assert "/A" in after[0].path


def test_reopen_recovers_unflushed_writes(tmp_path, metadata_url):
    path = tmp_path / "s"
    with lithify.open(path, metadata_url=metadata_url) as s:
        s.create_table("t", splits=["m"])
        put_rows(s, "t", ["a", "x"])
        s.flush("t")
        put_rows(s, "t", ["b", "y"], value="w")
        # Close without flushing: the writes live only in the write-ahead log.
        s.logs.close()
        s.meta.close()
        s._closed = True
        s._lock_file.close()
    with lithify.open(path, metadata_url=metadata_url) as s:
        assert rows_of(s, "t") == [
            (b"a", b"q", b"va"),
            (b"b", b"q", b"wb"),
            (b"x", b"q", b"vx"),
            (b"y", b"q", b"wy"),
        ]


def test_split_and_merge_are_metadata_only(store):
    store.create_table("t")
    put_rows(store, "t", [f"r{i:02d}" for i in range(20)])
    store.flush("t")
    path = store.tablets("t")[0].files[0].path
    store.add_splits("t", ["r05", "r12"])
    tablets = store.tablets("t")
    assert len(tablets) == 3
    assert {f.path for t in tablets for f in t.files} == {path}
    assert len(rows_of(store, "t")) == 20
    assert len(rows_of(store, "t", "r06", "r12")) == 7
    store.merge_tablets("t")
    tablets = store.tablets("t")
    assert len(tablets) == 1 and [f.path for f in tablets[0].files] == [path]
    assert tablets[0].files[0].fence.is_unbounded()
    assert len(rows_of(store, "t")) == 20


def test_compact_row_range_only_touches_tablets_in_range(store):
    store.create_table("t", splits=["m"])
    for _ in range(2):
        put_rows(store, "t", ["a", "z"])
        store.flush("t")
    store.compact("t", "a", "c")
    assert [len(t.files) for t in store.tablets("t")] == [1, 2]


def test_offline_online(store):
    store.create_table("t")
    put_rows(store, "t", ["a"])
    store.offline("t")
    with pytest.raises(TableOfflineError):
        list(store.scan("t"))
    store.online("t")
    assert rows_of(store, "t") == [(b"a", b"q", b"va")]


def test_delete_table_and_gc(store):
    store.create_table("t")
    put_rows(store, "t", ["a"])
    store.flush("t")
    store.compact("t")
    deleted = store.gc()
    assert len(deleted) == 1  # the F file replaced by the compaction
    store.delete_table("t")
    assert len(store.gc()) == 1
    assert store.storage.list_files("tables") == []
    with pytest.raises(TableNotFoundError):
        list(store.scan("t"))


def test_bulk_import_is_fenced_to_tablets(store, tmp_path):
    store.create_table("t", splits=["m"])
    t = pa.table(
        {
            "row": [b"a", b"n", b"z"],
            "family": [b"f"] * 3,
            "qualifier": [b"q"] * 3,
            "visibility": [b""] * 3,
            "timestamp": [5, 5, 5],
            "deleted": [False] * 3,
            "value": [b"1", b"2", b"3"],
        },
        schema=ENTRY_SCHEMA,
    )
    src = tmp_path / "bulk.parquet"
    pq.write_table(sort_table(t), src)
    store.import_files("t", [src])
    assert [len(x.files) for x in store.tablets("t")] == [1, 1]
    assert [v for _, v in store.scan_entries("t")] == [b"1", b"2", b"3"]


def test_bulk_import_rejects_unsorted(store, tmp_path):
    store.create_table("t")
    t = pa.table(
        {
            "row": [b"z", b"a"],
            "family": [b"f"] * 2,
            "qualifier": [b"q"] * 2,
            "visibility": [b""] * 2,
            "timestamp": [5, 5],
            "deleted": [False] * 2,
            "value": [b"1", b"2"],
        },
        schema=ENTRY_SCHEMA,
    )
    src = tmp_path / "bad.parquet"
    pq.write_table(t, src)
    with pytest.raises(LithifyError, match="bad.parquet|sorted|order"):
        store.import_files("t", [src])
    assert store.storage.list_files("tables") == []


def test_properties_are_validated(store):
    store.create_table("t")
    with pytest.raises(ConfigError, match="table.durability.*none, flush, sync"):
        store.set_property("t", "table.durability", "sometimes")
    with pytest.raises(ConfigError, match="unknown table property 'table.nope'"):
        store.set_property("t", "table.nope", "1")
    with pytest.raises(ConfigError, match="table.versions"):
        store.set_property("t", "table.versions", "0")
    store.set_property("t", "table.versions", "4")
    assert store.get_properties("t")["table.versions"] == "4"


def test_column_and_timestamp_filters(store):
    store.create_table("t")
    store.write(
        "t",
        [
            Mutation(b"r").put("a", "x", "1", timestamp=10).put("b", "y", "2", timestamp=20),
            Mutation(b"s").put("a", "z", "3", timestamp=30),
        ],
    )
    fams = [(k.family, k.qualifier) for k, _ in store.scan_entries("t", columns=[("a", None)])]
    assert fams == [(b"a", b"x"), (b"a", b"z")]
    only = [(k.row, k.qualifier) for k, _ in store.scan_entries("t", columns=[("a", "z")])]
    assert only == [(b"s", b"z")]
    ts = [k.timestamp for k, _ in store.scan_entries("t", min_timestamp=15, max_timestamp=25)]
    assert ts == [20]


def test_second_open_of_same_directory_is_refused(tmp_path, metadata_url):
    with (
        lithify.open(tmp_path / "s", metadata_url=metadata_url),
        pytest.raises(LithifyError, match="already open"),
    ):
        lithify.open(tmp_path / "s", metadata_url=metadata_url)


def test_memory_limit_triggers_flushes(store):
    store.set_system_property("tserver.memory.maps.max", "64K")
    store.create_table("t")
    for i in range(20):
        put_rows(store, "t", [f"r{i:03d}{j:03d}" for j in range(100)], value="x" * 50)
    store.flush("t")
    assert len(store.tablets("t")[0].files) >= 2
    assert len(rows_of(store, "t")) == 2000


def test_writes_racing_splits_and_merges_lose_nothing(store):
    """Writes in flight while their tablet is split or merged are routed to the new tablets."""
    import threading

    store.create_table("t")
    acked: list[str] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(100_000):
                if stop.is_set():
                    return
                rows = [f"r{(i * 7 + j) % 1000:03d}-{i}" for j in range(20)]
                put_rows(store, "t", rows)
                acked.extend(rows)
        except BaseException as e:  # surfaced below
            errors.append(e)

    th = threading.Thread(target=writer)
    th.start()
    try:
        for _round in range(4):
            for k in range(1, 10):
                store.add_splits("t", [f"r{k * 100:03d}"])
            store.merge_tablets("t")
    finally:
        stop.set()
        th.join(60)
    assert not errors, errors
    assert acked
    seen = {k.row.decode() for k, _ in store.scan_entries("t")}
    missing = [r for r in acked if r not in seen]
    assert not missing, f"{len(missing)} acknowledged rows lost, e.g. {missing[:5]}"


def test_metadata_sqlite_synchronous_is_a_system_property(tmp_path, metadata_url):
    if not metadata_url.startswith("sqlite"):
        pytest.skip("SQLite's setting")
    with lithify.open(tmp_path / "s", metadata_url=metadata_url) as s:
        with pytest.raises(ConfigError, match="metadata.sqlite.synchronous"):
            s.set_system_property("metadata.sqlite.synchronous", "sometimes")
        s.set_system_property("metadata.sqlite.synchronous", "FULL")
    with lithify.open(tmp_path / "s", metadata_url=metadata_url) as s, s.meta._read() as conn:
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
