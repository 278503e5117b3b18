"""The metadata store (SYSTEM.md 4) on every backend the `metadata_url` fixture provides.

The same tests run against SQLite and PostgreSQL because the point of the store is that callers
cannot tell them apart: tables and properties, tablets and split points, conditional updates
that never lose a write (threads and separate processes), atomic split/merge, write-ahead log
generations, the garbage collector's view of referenced files, final states and leases.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import select, text

from lithify.data.ranges import Extent, FileRef, RowRange
from lithify.errors import (
    ConditionalUpdateError,
    ConfigError,
    TableExistsError,
    TableNotFoundError,
)
from lithify.metadata.schema import tablets as tablets_table
from lithify.metadata.store import (
    SQLITE_SYNC_PROPERTY,
    LeaseLostError,
    MetadataStore,
    TableInfo,
    TabletMeta,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(metadata_url: str) -> Iterator[MetadataStore]:
    st = MetadataStore.open(metadata_url)
    try:
        yield st
    finally:
        st.close()


def fref(path: str, fence: RowRange | None = None) -> FileRef:
    return FileRef(path, 100, 10) if fence is None else FileRef(path, 100, 10, fence)


def extents(metas: list[TabletMeta]) -> list[tuple[bytes | None, bytes | None]]:
    return [(m.extent.prev_end_row, m.extent.end_row) for m in metas]


# ---------------------------------------------------------------------- tables


def test_create_get_list_tables(store: MetadataStore) -> None:
    a = store.create_table("alpha", {"table.versions": "3"}, [])
    b = store.create_table("beta", {}, [b"m"])
    assert a.id != b.id
    assert a == TableInfo(a.id, "alpha", "online", {"table.versions": "3"})
    assert store.get_table("alpha") == a
    assert store.get_table(a.id) == a  # by id as well as by name
    assert [t.name for t in store.list_tables()] == ["alpha", "beta"]


def test_create_table_name_taken(store: MetadataStore) -> None:
    store.create_table("t", {}, [])
    with pytest.raises(TableExistsError, match="'t'"):
        store.create_table("t", {}, [b"x"])
    assert len(store.list_tables()) == 1


def test_concurrent_create_same_name_one_wins(store: MetadataStore) -> None:
    results: list[str] = []
    barrier = threading.Barrier(4)

    def create() -> None:
        barrier.wait(timeout=10)
        try:
            store.create_table("race", {}, [b"a", b"b"])
            results.append("ok")
        except TableExistsError:
            results.append("exists")

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == ["exists", "exists", "exists", "ok"]
    assert len(store.tablets(store.get_table("race").id)) == 3


def test_table_not_found_names_it(store: MetadataStore) -> None:
    with pytest.raises(TableNotFoundError, match="nosuch"):
        store.get_table("nosuch")
    with pytest.raises(TableNotFoundError, match="nosuch"):
        store.tablets("nosuch")
    for op in (
        lambda: store.set_table_state("nosuch", "offline"),
        lambda: store.set_table_properties("nosuch", {"a": "b"}),
        lambda: store.delete_table("nosuch"),
    ):
        with pytest.raises(TableNotFoundError, match="nosuch"):
            op()


def test_invalid_table_arguments(store: MetadataStore) -> None:
    with pytest.raises(ValueError):
        store.create_table("", {}, [])
    with pytest.raises(ValueError, match="split"):
        store.create_table("t", {}, [b""])
    with pytest.raises(TypeError):
        store.create_table("t", {"a": 1}, [])  # type: ignore[dict-item]
    t = store.create_table("t", {}, [])
    with pytest.raises(ValueError, match="state"):
        store.set_table_state(t.id, "sleeping")
    with pytest.raises(TypeError):
        store.set_table_properties(t.id, {"a": 2})  # type: ignore[dict-item]


def test_table_state_and_properties(store: MetadataStore) -> None:
    t = store.create_table("t", {"a": "1", "b": "2"}, [])
    assert store.set_table_state(t.id, "offline").state == "offline"
    assert store.get_table("t").state == "offline"
    store.set_table_state(t.id, "online")
    info = store.set_table_properties(t.id, {"a": None, "c": "3", "missing": None})
    assert info.properties == {"b": "2", "c": "3"}
    assert store.get_table(t.id).properties == {"b": "2", "c": "3"}
    assert store.get_table(t.id).state == "online"


def test_concurrent_property_changes_all_kept(store: MetadataStore) -> None:
    t = store.create_table("t", {}, [])

    def setter(i: int) -> None:
        for j in range(5):
            store.set_table_properties(t.id, {f"p{i}.{j}": str(j)})

    threads = [threading.Thread(target=setter, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert len(store.get_table(t.id).properties) == 20


def test_delete_table(store: MetadataStore) -> None:
    t = store.create_table("t", {}, [b"g", b"p"])
    keep = store.create_table("keep", {}, [])
    store.delete_table(t.id)
    with pytest.raises(TableNotFoundError):
        store.get_table("t")
    with pytest.raises(TableNotFoundError):
        store.tablets(t.id)
    assert store.get_tablet(Extent(t.id, None, b"g")) is None
    assert len(store.tablets(keep.id)) == 1
    # A new table with the old name gets a new id: old files can never be confused with it.
    again = store.create_table("t", {}, [])
    assert again.id != t.id
    assert len(store.tablets(again.id)) == 1


def test_system_properties(store: MetadataStore) -> None:
    assert store.get_system_properties() == {}
    store.set_system_properties({"a": "1", "b": "2"})
    store.set_system_properties({"a": "10", "b": None, "c": None})
    assert store.get_system_properties() == {"a": "10"}


def test_reopen_keeps_everything(metadata_url: str) -> None:
    st = MetadataStore.open(metadata_url)
    t = st.create_table("t", {"x": "y"}, [b"k"])
    gen = st.next_log_generation()
    st.close()
    st = MetadataStore.open(metadata_url)  # schema exists: open must not recreate or fail
    try:
        assert st.get_table("t") == t
        assert len(st.tablets(t.id)) == 2
        assert st.next_log_generation() > gen
    finally:
        st.close()


def test_a_version_1_database_is_upgraded_in_place(metadata_url: str) -> None:
    """Version 1 had no tablet time: opening it adds the column (0 for every tablet)."""
    st = MetadataStore.open(metadata_url)
    t = st.create_table("t", {}, [b"k"])
    st.close()
    engine = sa.create_engine(metadata_url)
    with engine.begin() as conn:
        conn.execute(sa.text('ALTER TABLE tablets DROP COLUMN "time"'))
        conn.execute(sa.text("UPDATE counters SET value = 1 WHERE name = 'schema_version'"))
    engine.dispose()
    st = MetadataStore.open(metadata_url)
    try:
        assert [m.time for m in st.tablets(t.id)] == [0, 0]
        m = st.tablets(t.id)[0]
        assert st.update_tablet(m, m.replace(time=5)).time == 5
    finally:
        st.close()
    engine = sa.create_engine(metadata_url)
    with engine.connect() as conn:
        version = conn.execute(
            sa.text("SELECT value FROM counters WHERE name = 'schema_version'")
        ).scalar_one()
    engine.dispose()
    assert version == 2


def test_unsupported_urls() -> None:
    with pytest.raises(ConfigError, match="in-memory"):
        MetadataStore.open("sqlite://")
    with pytest.raises(ConfigError, match="not supported"):
        MetadataStore.open("mysql://localhost/x")


def test_sqlite_pragmas(metadata_url: str) -> None:
    if not metadata_url.startswith("sqlite"):
        pytest.skip("SQLite connection settings")
    st = MetadataStore.open(metadata_url)
    with st._read() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 1000
    st.set_system_properties({SQLITE_SYNC_PROPERTY: "full"})
    st.close()
    st = MetadataStore.open(metadata_url)
    with st._read() as conn:
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
    st.close()
    st = MetadataStore.open(metadata_url, synchronous="NORMAL")  # the argument wins
    with st._read() as conn:
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 1
    st.set_system_properties({SQLITE_SYNC_PROPERTY: "sometimes"})
    st.close()
    with pytest.raises(ConfigError, match=SQLITE_SYNC_PROPERTY):
        MetadataStore.open(metadata_url)


def test_reads_see_one_snapshot(store: MetadataStore) -> None:
    """A read of several statements (referenced_files) must not see a commit half-way."""
    t = store.create_table("t", {}, [])
    m = store.tablets(t.id)[0]
    query = select(tablets_table.c.version).where(tablets_table.c.table_id == t.id)
    with store._read() as conn:
        before = conn.execute(query).scalar_one()
        store.update_tablet(m, m.replace(flushed_seq=1))  # commits on another connection
        during = conn.execute(query).scalar_one()
    assert before == during == m.version
    assert store.get_tablet(m.extent).version == m.version + 1  # type: ignore[union-attr]


# ---------------------------------------------------------------------- tablets


def test_split_points_sorted_and_deduplicated(store: MetadataStore) -> None:
    t = store.create_table("t", {}, [b"p", b"c", b"p", b"\x00", b"c\xff"])
    tablets = store.tablets(t.id)
    assert extents(tablets) == [
        (None, b"\x00"),
        (b"\x00", b"c"),
        (b"c", b"c\xff"),
        (b"c\xff", b"p"),
        (b"p", None),
    ]
    for m in tablets:
        assert m.files == () and m.logs == () and m.compactions == {} and m.selection is None
        assert store.get_tablet(m.extent) == m
    # The extent must match exactly, previous end row included.
    assert store.get_tablet(Extent(t.id, b"a", b"c")) is None
    assert store.get_tablet(Extent(t.id, None, b"zz")) is None


def test_tablet_roundtrip(store: MetadataStore) -> None:
    t = store.create_table("t", {}, [b"m"])
    old = store.tablets(t.id)[1]
    new = old.replace(
        files=[fref("F1.parquet"), fref("F2.parquet", RowRange(b"m", b"q"))],
        logs=["wal/1", "wal/2"],
        flushed_seq=42,
        compactions={"ecid-1": {"inputs": ["F1.parquet"], "tmp_path": "A3.parquet_tmp_ecid-1"}},
        selection={"files": ["F1.parquet"], "id": 7},
        time=1_700_000_000_123,
    )
    assert isinstance(new.files, tuple)
    stored = store.update_tablet(old, new)
    assert stored.version == old.version + 1
    assert store.get_tablet(old.extent) == stored
    assert store.get_tablet(old.extent) == new.replace(version=old.version + 1)


def test_conditional_update_conflict(store: MetadataStore) -> None:
    t = store.create_table("t", {}, [])
    reader1 = store.tablets(t.id)[0]
    reader2 = store.get_tablet(reader1.extent)
    assert reader2 == reader1
    won = store.update_tablet(reader1, reader1.replace(files=(fref("F1"),)))
    with pytest.raises(ConditionalUpdateError, match="version"):
        store.update_tablet(reader2, reader2.replace(files=(fref("F2"),)))
    assert store.get_tablet(reader1.extent) == won
    assert [f.path for f in won.files] == ["F1"]
    with pytest.raises(ValueError, match="extent"):
        store.update_tablet(won, won.replace(extent=Extent(t.id, b"a", None)))


def test_update_of_deleted_tablet_conflicts(store: MetadataStore) -> None:
    t = store.create_table("t", {}, [])
    m = store.tablets(t.id)[0]
    store.delete_table(t.id)
    with pytest.raises(ConditionalUpdateError, match="no longer exists"):
        store.update_tablet(m, m.replace(flushed_seq=1))
    assert store.mutate_tablet(m.extent, lambda cur: cur.replace(flushed_seq=1)) is None


def test_mutate_tablet_no_change(store: MetadataStore) -> None:
    t = store.create_table("t", {}, [])
    m = store.tablets(t.id)[0]
    assert store.mutate_tablet(m.extent, lambda cur: None) is None
    assert store.get_tablet(m.extent) == m  # untouched, version included
    out = store.mutate_tablet(m.extent, lambda cur: cur.replace(flushed_seq=cur.flushed_seq + 5))
    assert out is not None and out.flushed_seq == 5 and out.version == m.version + 1
    with pytest.raises(ValueError):
        store.mutate_tablet(m.extent, lambda cur: None, max_attempts=0)


def test_mutate_tablet_gives_up_after_bounded_attempts(store: MetadataStore) -> None:
    t = store.create_table("t", {}, [])
    m = store.tablets(t.id)[0]
    calls = 0

    def always_loses(cur: TabletMeta) -> TabletMeta:
        nonlocal calls
        calls += 1
        # Someone else changes the tablet between our read and our write, every time.
        store.update_tablet(cur, cur.replace(flushed_seq=cur.flushed_seq + 1))
        return cur.replace(logs=("mine",))

    with pytest.raises(ConditionalUpdateError, match="3 conflicting"):
        store.mutate_tablet(m.extent, always_loses, max_attempts=3)
    assert calls == 3
    assert store.get_tablet(m.extent).logs == ()  # type: ignore[union-attr]


def test_mutate_tablet_threads_lose_nothing(store: MetadataStore) -> None:
    t = store.create_table("t", {}, [b"m"])
    extent = store.tablets(t.id)[0].extent
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def appender(worker: int) -> None:
        try:
            barrier.wait(timeout=10)
            for i in range(25):
                path = f"F{worker}-{i}"
                store.mutate_tablet(
                    extent,
                    lambda cur, p=path: cur.replace(files=(*cur.files, fref(p))),
                    max_attempts=500,
                )
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=appender, args=(w,)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors
    final = store.get_tablet(extent)
    assert final is not None
    paths = [f.path for f in final.files]
    assert len(paths) == 100
    assert set(paths) == {f"F{w}-{i}" for w in range(4) for i in range(25)}
    assert final.version == 1 + 100  # one successful update per append, no more


CHILD = textwrap.dedent(
    """
    import sys, time
    from lithify.data.ranges import Extent, FileRef
    from lithify.metadata.store import MetadataStore

    url, table_id, worker, count, start_at = sys.argv[1:6]
    store = MetadataStore.open(url)
    extent = Extent(table_id, None, None)
    time.sleep(max(0.0, float(start_at) - time.time()))
    for i in range(int(count)):
        ref = FileRef(f"P{worker}-{i}", 1, 1)
        out = store.mutate_tablet(
            extent, lambda cur: cur.replace(files=(*cur.files, ref)), max_attempts=1000
        )
        assert out is not None
    store.close()
    """
)


def test_two_processes_lose_nothing(store: MetadataStore, metadata_url: str) -> None:
    t = store.create_table("t", {}, [])
    extent = store.tablets(t.id)[0].extent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    start_at = str(time.time() + 2.0)  # both start appending at the same moment
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, metadata_url, t.id, str(w), "30", start_at],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for w in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=60)[0].decode(errors="replace") for p in procs]
        for p, out in zip(procs, outputs, strict=True):
            assert p.returncode == 0, out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    final = store.get_tablet(extent)
    assert final is not None
    assert sorted(f.path for f in final.files) == sorted(
        f"P{w}-{i}" for w in range(2) for i in range(30)
    )


# ---------------------------------------------------------------------- split and merge


def test_split_and_merge(store: MetadataStore) -> None:
    t = store.create_table("t", {}, [b"m"])
    first, last = store.tablets(t.id)
    parent = store.update_tablet(last, last.replace(files=(fref("F1"),), logs=("wal/1",)))
    children = [
        TabletMeta(Extent(t.id, b"m", b"t"), files=(fref("F1", RowRange(b"m", b"t")),)),
        TabletMeta(Extent(t.id, b"t", None), files=(fref("F1", RowRange(b"t", None)),)),
    ]
    out = store.replace_tablets(t.id, [parent], list(reversed(children)))
    assert extents(out) == [(b"m", b"t"), (b"t", None)]
    assert all(m.version == parent.version + 1 for m in out)
    assert extents(store.tablets(t.id)) == [(None, b"m"), (b"m", b"t"), (b"t", None)]
    assert store.get_tablet(out[0].extent) == out[0]
    # A stale reader of the parent cannot write, although a child has the same end row.
    with pytest.raises(ConditionalUpdateError):
        store.update_tablet(parent, parent.replace(files=()))

    merged = TabletMeta(Extent(t.id, None, None), files=(fref("F0"), fref("F1")))
    (m,) = store.replace_tablets(t.id, [out[1], first, out[0]], [merged])
    assert m.version == max(first.version, *(o.version for o in out)) + 1
    assert store.tablets(t.id) == [m]


def test_replace_tablets_is_atomic(store: MetadataStore) -> None:
    t = store.create_table("t", {}, [b"g", b"p"])
    a, b, c = store.tablets(t.id)
    store.update_tablet(b, b.replace(flushed_seq=9))  # b is now stale
    with pytest.raises(ConditionalUpdateError):
        store.replace_tablets(t.id, [a, b], [TabletMeta(Extent(t.id, None, b"p"))])
    after = store.tablets(t.id)
    assert extents(after) == [(None, b"g"), (b"g", b"p"), (b"p", None)]
    assert after[0] == a and after[2] == c and after[1].flushed_seq == 9


def test_replace_tablets_coverage_checked(store: MetadataStore) -> None:
    t = store.create_table("t", {}, [b"g", b"p"])
    other = store.create_table("other", {}, [])
    a, b, c = store.tablets(t.id)

    def new(prev: bytes | None, end: bytes | None, table: str = t.id) -> TabletMeta:
        return TabletMeta(Extent(table, prev, end))

    bad = [
        ([a, b], [new(None, b"h")], "cover"),  # ends elsewhere
        ([a, b], [new(b"a", b"p")], "cover"),  # starts elsewhere
        ([a, b], [new(None, b"c"), new(b"d", b"p")], "contiguous"),  # gap
        ([a, b], [new(None, b"j"), new(b"c", b"p")], "contiguous"),  # overlap
        ([a, c], [new(None, None)], "contiguous"),  # old tablets not adjacent
        ([a, a], [new(None, b"g")], "contiguous"),  # same tablet twice
        ([a], [new(None, b"g", other.id)], "not in table"),
        ([a], [new(None, b"c"), new(b"c", b"c"), new(b"c", b"g")], "empty"),
        ([], [new(None, b"g")], "no old"),
        ([a], [], "no new"),
    ]
    for old, replacement, message in bad:
        with pytest.raises(ValueError, match=message):
            store.replace_tablets(t.id, old, replacement)
    assert store.tablets(t.id) == [a, b, c]


def test_random_splits_and_merges_keep_cover(store: MetadataStore) -> None:
    """Random split/merge sequences always leave a gap-free, overlap-free cover of all rows."""
    rng = random.Random(7)
    t = store.create_table("t", {}, [])
    for step in range(40):
        tablets = store.tablets(t.id)
        if len(tablets) > 1 and rng.random() < 0.4:
            i = rng.randrange(len(tablets) - 1)
            old = tablets[i : i + 2]
            joined = Extent(t.id, old[0].extent.prev_end_row, old[1].extent.end_row)
            files = (*old[0].files, *old[1].files)
            store.replace_tablets(t.id, old, [TabletMeta(joined, files=files)])
        else:
            m = rng.choice(tablets)
            point = bytes([rng.randrange(1, 255)])
            if not m.extent.contains(point) or point == m.extent.end_row:
                continue
            left = TabletMeta(Extent(t.id, m.extent.prev_end_row, point), files=m.files)
            right = TabletMeta(Extent(t.id, point, m.extent.end_row), files=m.files)
            store.replace_tablets(t.id, [m], [left, right])
        tablets = store.tablets(t.id)
        assert tablets[0].extent.prev_end_row is None, step
        assert tablets[-1].extent.end_row is None, step
        for x, y in zip(tablets, tablets[1:], strict=False):
            assert x.extent.end_row == y.extent.prev_end_row, step


# ---------------------------------------------------------------------- write-ahead logs


def test_log_generations_and_logs(metadata_url: str) -> None:
    st = MetadataStore.open(metadata_url)
    gens = [st.next_log_generation() for _ in range(5)]
    assert gens == sorted(set(gens))
    st.add_log("wal/b", gens[1])
    st.add_log("wal/a", gens[0])
    st.add_log("wal/a", gens[0])  # idempotent
    st.close()
    st = MetadataStore.open(metadata_url)
    try:
        assert st.next_log_generation() > gens[-1]  # monotonic across restarts
        assert st.list_logs() == [("wal/a", gens[0]), ("wal/b", gens[1])]
        st.remove_log("wal/a")
        st.remove_log("wal/a")  # idempotent
        assert st.list_logs() == [("wal/b", gens[1])]
    finally:
        st.close()


def test_log_generations_unique_across_threads(store: MetadataStore) -> None:
    got: list[int] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(20):
            g = store.next_log_generation()
            with lock:
                got.append(g)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert len(got) == 80 and len(set(got)) == 80


# ---------------------------------------------------------------------- referenced files


def test_referenced_files(store: MetadataStore) -> None:
    t = store.create_table("t", {}, [b"m"])
    u = store.create_table("u", {}, [])
    a, b = store.tablets(t.id)
    store.update_tablet(a, a.replace(files=(fref("t/F1"), fref("t/F2"))))
    store.update_tablet(
        b,
        b.replace(
            files=(fref("t/F1", RowRange(b"m", None)),),
            compactions={
                "c1": {"inputs": ["t/F1"], "tmp_path": "t/A3_tmp_c1"},
                "c2": {"inputs": ["t/F1"]},  # no output yet
            },
        ),
    )
    (c,) = store.tablets(u.id)
    store.update_tablet(c, c.replace(files=(fref("u/F9"),)))
    store.put_final_state(
        "e1", u.id, c.extent, "FINISHED", {"tmp_path": "u/A5_tmp_e1", "output_path": "u/A5"}
    )
    assert store.referenced_files() == {
        "t/F1",
        "t/F2",
        "t/A3_tmp_c1",
        "u/F9",
        "u/A5_tmp_e1",
        "u/A5",
    }
    store.delete_table(t.id)
    store.delete_final_state("e1")
    assert store.referenced_files() == {"u/F9"}


# ---------------------------------------------------------------------- final states


def test_final_states(store: MetadataStore) -> None:
    t = store.create_table("t", {}, [b"m"])
    e = store.tablets(t.id)[0].extent
    assert store.final_states() == []
    store.put_final_state("e1", t.id, e, "FINISHED", {"entries": 10, "size": 2048})
    store.put_final_state("e2", t.id, Extent(t.id, b"m", None), "FAILED", {})
    store.put_final_state("e1", t.id, e, "FINISHED", {"entries": 11, "size": 2048})  # repeat
    fs = {f.ecid: f for f in store.final_states()}
    assert set(fs) == {"e1", "e2"}
    assert fs["e1"].extent == e and fs["e1"].table_id == t.id
    assert fs["e1"].state == "FINISHED" and fs["e1"].data == {"entries": 11, "size": 2048}
    assert fs["e2"].extent == Extent(t.id, b"m", None) and fs["e2"].state == "FAILED"
    store.delete_final_state("e1")
    store.delete_final_state("e1")  # idempotent
    assert [f.ecid for f in store.final_states()] == ["e2"]
    with pytest.raises(ValueError):
        store.put_final_state("e3", "other", e, "FAILED", {})


# ---------------------------------------------------------------------- leases


def test_leases(store: MetadataStore) -> None:
    e1 = store.acquire_lease("coordinator", "A", 0.5)
    assert e1 is not None
    assert store.acquire_lease("coordinator", "B", 0.5) is None  # A's lease has not expired
    assert store.acquire_lease("coordinator", "A", 0.5) == e1  # renewal keeps the epoch
    assert store.check_epoch("coordinator", e1)
    time.sleep(0.8)
    e2 = store.acquire_lease("coordinator", "B", 30)  # expired: B takes over
    assert e2 is not None and e2 > e1
    assert not store.check_epoch("coordinator", e1)
    assert store.check_epoch("coordinator", e2)
    assert store.acquire_lease("coordinator", "A", 30) is None
    assert not store.release_lease("coordinator", "A")  # not A's to release
    assert store.release_lease("coordinator", "B")
    e3 = store.acquire_lease("coordinator", "A", 30)  # released: free at once
    assert e3 is not None and e3 > e2
    assert store.acquire_lease("other", "B", 30) is not None  # leases are independent
    assert not store.check_epoch("nosuch", 1)
    with pytest.raises(ValueError):
        store.acquire_lease("coordinator", "A", 0)


def test_a_holder_taking_back_its_expired_lease_gets_a_new_epoch(store: MetadataStore) -> None:
    e1 = store.acquire_lease("coordinator", "A", 0.3)
    assert e1 is not None
    time.sleep(0.5)
    e2 = store.acquire_lease("coordinator", "A", 30)  # lapsed, nobody else took it
    assert e2 == e1 + 1
    assert not store.check_epoch("coordinator", e1)  # the old tenure's writes are fenced out
    assert store.acquire_lease("coordinator", "A", 30) == e2  # renewal in time keeps it


def test_lease_info(store: MetadataStore) -> None:
    assert store.lease_info("coordinator") is None  # never taken
    epoch = store.acquire_lease("coordinator", "http://host-a:9000", 30)
    info = store.lease_info("coordinator")
    assert info is not None
    assert (info.name, info.holder, info.epoch) == ("coordinator", "http://host-a:9000", epoch)
    assert 0 < info.remaining_s <= 30
    store.release_lease("coordinator", "http://host-a:9000")
    info = store.lease_info("coordinator")
    assert info is not None and info.holder is None and info.epoch == epoch


def test_lease_contention_one_holder(store: MetadataStore) -> None:
    barrier = threading.Barrier(4)
    got: list[int | None] = []

    def contend(holder: str) -> None:
        barrier.wait(timeout=10)
        got.append(store.acquire_lease("leader", holder, 30))

    threads = [threading.Thread(target=contend, args=(f"h{i}",)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert sorted(got, key=lambda x: x is None) == [1, None, None, None]


def test_fenced_writes(store: MetadataStore) -> None:
    t = store.create_table("t", {}, [])
    m = store.tablets(t.id)[0]
    old_epoch = store.acquire_lease("coordinator", "A", 30)
    assert old_epoch is not None
    m = store.update_tablet(m, m.replace(flushed_seq=1), fence=("coordinator", old_epoch))
    store.put_final_state("e1", t.id, m.extent, "FINISHED", {}, fence=("coordinator", old_epoch))
    store.release_lease("coordinator", "A")
    new_epoch = store.acquire_lease("coordinator", "B", 30)
    assert new_epoch is not None and new_epoch > old_epoch
    calls = 0

    def change(cur: TabletMeta) -> TabletMeta:
        nonlocal calls
        calls += 1
        return cur.replace(flushed_seq=2)

    # The deposed holder's writes fail at once (no retries) and change nothing.
    with pytest.raises(LeaseLostError, match="coordinator"):
        store.mutate_tablet(m.extent, change, fence=("coordinator", old_epoch))
    assert calls == 1
    with pytest.raises(LeaseLostError):
        store.delete_final_state("e1", fence=("coordinator", old_epoch))
    assert store.get_tablet(m.extent) == m
    assert [f.ecid for f in store.final_states()] == ["e1"]
    store.delete_final_state("e1", fence=("coordinator", new_epoch))
    assert store.final_states() == []
