"""A stateful model check of the embedded store against a plain Python model of visible data.

Hypothesis drives random sequences of puts and deletes (explicit and server timestamps, as
mutations and as Arrow tables), flushes, compactions (whole table and row ranges), splits, merges,
bulk imports, offline/online and close+reopen, and after every step compares a full scan (and
sometimes a row-range or column scan) with the model.

The model keeps, per column (row, family, qualifier, visibility), every put ever written
(timestamp -> value) and the newest delete timestamp not yet compacted away. Visible data is the
newest `table.versions` puts newer than that delete (SYSTEM.md 1). A full compaction drops deletes
and what they hide, so a put written later with an older timestamp becomes visible again: the
model applies that when a user compaction covers the column's tablet (every tablet overlapping the
range is compacted as a whole). Server timestamps are read back: every mutation written with
server time also puts a unique value in the marker column ``m:clock`` of its row, and one write
gives every server-stamped entry of a row one timestamp, so the marker's timestamp is the
timestamp of every update of that mutation.

Two variants:

* ``exact``: background (SYSTEM) compactions are switched off through the table properties
  (ratio and file limit out of reach), so the model knows exactly when deletes are dropped and
  may write puts older than a live delete; versions = 1.
* ``background``: the default planner compacts in the background whenever it likes; a put older
  than a live delete would then be visible or not depending on timing, so such updates are not
  generated; versions = 3.

Each variant runs on both metadata backends through the `metadata_url` fixture. Every example
starts from an empty store and an empty metadata database.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

import lithify
from lithify import Mutation
from lithify.data.key import ENTRY_SCHEMA, sort_table
from lithify.data.ranges import RowRange

TABLE = "m"
ROWS = [b"a", b"b", b"ba", b"c", b"d", b"dd", b"e", b"f", b"g", b"h"]
SPLIT_POINTS = [b"b", b"bb", b"c", b"d", b"e", b"f", b"g"]
FAMILIES = [b"f", b"g"]
QUALIFIERS = [b"q", b"r"]
VISIBILITIES = [b"", b"v"]
MARKER = (b"m", b"clock", b"")
#: Explicit timestamps stay far below server time (milliseconds since 1970), so a server-stamped
#: put is always newer than an explicit one.
MAX_EXPLICIT_TS = 5_000
#: A user compaction of this little data takes well under a second; waiting longer means it hangs.
COMPACT_TIMEOUT_S = 60.0

Column = tuple[bytes, bytes, bytes, bytes]
Entry = tuple[bytes, bytes, bytes, bytes, int, bytes]

columns_st = st.tuples(
    st.sampled_from(FAMILIES), st.sampled_from(QUALIFIERS), st.sampled_from(VISIBILITIES)
)
#: (delete?, (family, qualifier, visibility), timestamp)
explicit_update_st = st.tuples(st.booleans(), columns_st, st.integers(1, MAX_EXPLICIT_TS))
explicit_mutation_st = st.tuples(
    st.sampled_from(ROWS), st.lists(explicit_update_st, min_size=1, max_size=4)
)
#: (delete?, column): one write stamps a whole row with one timestamp, so columns are distinct.
server_update_st = st.tuples(st.booleans(), columns_st)
server_mutation_st = st.tuples(
    st.sampled_from(ROWS),
    st.lists(server_update_st, max_size=3, unique_by=lambda u: u[1]),
)
range_st = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(ROWS), st.sampled_from(ROWS)).map(lambda t: tuple(sorted(t))),
)


@dataclass
class ColumnModel:
    puts: dict[int, bytes] = field(default_factory=dict)
    delete_ts: int | None = None

    def visible(self, versions: int) -> list[tuple[int, bytes]]:
        live = [ts for ts in self.puts if self.delete_ts is None or ts > self.delete_ts]
        return [(ts, self.puts[ts]) for ts in sorted(live, reverse=True)[:versions]]

    def drop_deletes(self) -> None:
        """What a full compaction does: the delete and everything it hides are gone."""
        if self.delete_ts is not None:
            self.puts = {ts: v for ts, v in self.puts.items() if ts > self.delete_ts}
            self.delete_ts = None


class StoreMachine(RuleBasedStateMachine):
    """Set by `make_machine`: where the metadata lives and which variant runs."""

    metadata_url: str = ""
    work_dir: Path = Path(".")
    versions: int = 1
    background: bool = False
    _example = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="model-", dir=self.work_dir))
        self.url = _fresh_url(self.metadata_url, self.dir, next(self._example))
        self.store: lithify.Store | None = None
        self.model: dict[Column, ColumnModel] = {}
        self.used_put_ts: set[int] = set()
        self.values = itertools.count()
        self.imports = itertools.count()

    # -- helpers ------------------------------------------------------------------------------

    def _open(self) -> None:
        self.store = lithify.open(self.dir / "store", metadata_url=self.url)

    def _value(self) -> bytes:
        return f"v{next(self.values)}".encode()

    def _put_ts(self, ts: int) -> int:
        """A put timestamp never used before (so no two puts share a key)."""
        while ts in self.used_put_ts:
            ts += 1
        self.used_put_ts.add(ts)
        return ts

    def _col(self, row: bytes, fam: bytes, qual: bytes, vis: bytes) -> ColumnModel:
        return self.model.setdefault((row, fam, qual, vis), ColumnModel())

    def _allowed_put(self, col: ColumnModel, ts: int) -> bool:
        """With background compactions, a put older than a live delete is ambiguous."""
        return not (self.background and col.delete_ts is not None and ts <= col.delete_ts)

    def _apply(self, row: bytes, deleted: bool, cvis: tuple, ts: int, value: bytes) -> None:
        col = self._col(row, *cvis)
        if deleted:
            col.delete_ts = ts if col.delete_ts is None else max(col.delete_ts, ts)
        else:
            col.puts[ts] = value

    def expected(
        self,
        start: bytes | None = None,
        end: bytes | None = None,
        families: set[bytes] | None = None,
    ) -> list[Entry]:
        out = []
        for key in sorted(self.model):
            row = key[0]
            if (start is not None and row < start) or (end is not None and row > end):
                continue
            if families is not None and key[1] not in families:
                continue
            out += [(*key, ts, v) for ts, v in self.model[key].visible(self.versions)]
        return out

    def actual(self, *args: object, **kw: object) -> list[Entry]:
        assert self.store is not None
        return [
            (k.row, k.family, k.qualifier, k.visibility, k.timestamp, v)
            for k, v in self.store.scan_entries(TABLE, *args, **kw)
        ]

    # -- setup --------------------------------------------------------------------------------

    @initialize(splits=st.lists(st.sampled_from(SPLIT_POINTS), max_size=2, unique=True))
    def create(self, splits: list[bytes]) -> None:
        self._open()
        props = {"table.versions": str(self.versions)}
        if not self.background:
            props |= {"table.compaction.major.ratio": "1000", "table.file.max": "1000"}
        assert self.store is not None
        self.store.create_table(TABLE, splits=splits, properties=props)

    # -- writes -------------------------------------------------------------------------------

    @rule(muts=st.lists(explicit_mutation_st, min_size=1, max_size=5), as_arrow=st.booleans())
    def write_explicit(self, muts: list, as_arrow: bool) -> None:
        """Puts and deletes with timestamps chosen here, as Mutations or as one Arrow table."""
        planned: list[tuple[bytes, list[tuple[bool, tuple, int, bytes]]]] = []
        for row, updates in muts:
            ups = []
            for deleted, cvis, ts in updates:
                if not deleted:
                    if not self._allowed_put(self._col(row, *cvis), ts):
                        continue
                    ts = self._put_ts(ts)
                ups.append((deleted, cvis, ts, b"" if deleted else self._value()))
            if ups:
                planned.append((row, ups))
        if not planned:
            return
        assert self.store is not None
        if as_arrow:
            flat = [(row, *u) for row, ups in planned for u in ups]
            self.store.write(
                TABLE,
                pa.table(
                    {
                        "row": [r for r, *_ in flat],
                        "family": [c[0] for _, _, c, _, _ in flat],
                        "qualifier": [c[1] for _, _, c, _, _ in flat],
                        "visibility": [c[2] for _, _, c, _, _ in flat],
                        "timestamp": pa.array([t for *_, t, _ in flat], pa.int64()),
                        "deleted": [d for _, d, *_ in flat],
                        "value": [v for *_, v in flat],
                    },
                    schema=ENTRY_SCHEMA,
                ),
            )
        else:
            batch = []
            for row, ups in planned:
                m = Mutation(row)
                for deleted, (fam, qual, vis), ts, value in ups:
                    if deleted:
                        m.delete(fam, qual, visibility=vis, timestamp=ts)
                    else:
                        m.put(fam, qual, value, visibility=vis, timestamp=ts)
                batch.append(m)
            self.store.write(TABLE, batch)
        for row, ups in planned:
            for deleted, cvis, ts, value in ups:
                self._apply(row, deleted, cvis, ts, value)

    @rule(
        muts=st.lists(server_mutation_st, min_size=1, max_size=3, unique_by=lambda m: m[0]),
        repeat=st.sampled_from([1, 1, 1, 30]),
    )
    def write_server_time(self, muts: list, repeat: int) -> None:
        """Mutations stamped by the server; the timestamps are read back through the marker.

        `repeat` > 1 writes the same kind of batch many times in a row, faster than one per
        millisecond, which makes the tablet's clock run ahead of the wall clock.
        """
        assert self.store is not None
        for _ in range(repeat):
            batch = []
            planned = []
            for row, updates in muts:
                marker = self._value()
                m = Mutation(row).put(MARKER[0], MARKER[1], marker)
                ups = []
                for deleted, (fam, qual, vis) in updates:
                    value = b"" if deleted else self._value()
                    if deleted:
                        m.delete(fam, qual, visibility=vis)
                    else:
                        m.put(fam, qual, value, visibility=vis)
                    ups.append((deleted, (fam, qual, vis), value))
                batch.append(m)
                planned.append((row, marker, ups))
            self.store.write(TABLE, batch)
            for row, marker, ups in planned:
                stamps = [
                    k.timestamp
                    for k, v in self.store.scan_entries(TABLE, row, row, columns=[MARKER[:2]])
                    if v == marker
                ]
                assert len(stamps) == 1, (
                    f"a server-stamped write to row {row!r} is not visible: its timestamp is "
                    f"older than an earlier server timestamp of the same row (the tablet's clock "
                    f"went backwards); marker scan: {self.actual(row, row)}"
                )
                ts = stamps[0]
                self._apply(row, False, MARKER, ts, marker)
                for deleted, cvis, value in ups:
                    self._apply(row, deleted, cvis, ts, value)

    @rule(
        entries=st.lists(
            st.tuples(st.sampled_from(ROWS), explicit_update_st), min_size=1, max_size=8
        )
    )
    def bulk_import(self, entries: list) -> None:
        """A sorted Parquet file written here with pyarrow, imported with `import_files`."""
        rows = []
        for row, (deleted, cvis, ts) in entries:
            if not deleted:
                if not self._allowed_put(self._col(row, *cvis), ts):
                    continue
                ts = self._put_ts(ts)
            rows.append((row, deleted, cvis, ts, b"" if deleted else self._value()))
        if not rows:
            return
        table = sort_table(
            pa.table(
                {
                    "row": [r[0] for r in rows],
                    "family": [r[2][0] for r in rows],
                    "qualifier": [r[2][1] for r in rows],
                    "visibility": [r[2][2] for r in rows],
                    "timestamp": pa.array([r[3] for r in rows], pa.int64()),
                    "deleted": [r[1] for r in rows],
                    "value": [r[4] for r in rows],
                },
                schema=ENTRY_SCHEMA,
            )
        )
        path = self.dir / f"import-{next(self.imports)}.parquet"
        pq.write_table(table, path)
        assert self.store is not None
        self.store.import_files(TABLE, [path])
        for row, deleted, cvis, ts, value in rows:
            self._apply(row, deleted, cvis, ts, value)

    # -- table operations ---------------------------------------------------------------------

    @rule()
    def flush(self) -> None:
        assert self.store is not None
        self.store.flush(TABLE)

    @rule(rng=range_st)
    def compact(self, rng: tuple[bytes, bytes] | None) -> None:
        """A user compaction of every tablet overlapping the range drops all their deletes."""
        assert self.store is not None
        start, end = rng if rng is not None else (None, None)
        wanted = RowRange.rows(start, end)
        extents = [t.extent for t in self.store.tablets(TABLE) if t.extent.range.overlaps(wanted)]
        self.store.compact(TABLE, start, end, timeout=COMPACT_TIMEOUT_S)
        for (row, *_), col in self.model.items():
            if any(e.contains(row) for e in extents):
                col.drop_deletes()

    @rule(points=st.lists(st.sampled_from(SPLIT_POINTS), min_size=1, max_size=2))
    def split(self, points: list[bytes]) -> None:
        assert self.store is not None
        self.store.add_splits(TABLE, points)

    @rule(rng=range_st)
    def merge(self, rng: tuple[bytes, bytes] | None) -> None:
        assert self.store is not None
        start, end = rng if rng is not None else (None, None)
        self.store.merge_tablets(TABLE, start, end)

    @rule()
    def offline_online(self) -> None:
        assert self.store is not None
        self.store.offline(TABLE)
        self.store.online(TABLE)

    @rule()
    def reopen(self) -> None:
        """Close without flushing (the log holds the recent writes) and open again."""
        assert self.store is not None
        self.store.close()
        self.store = None
        self._open()

    @rule()
    def collect_garbage(self) -> None:
        assert self.store is not None
        self.store.gc()

    # -- checks -------------------------------------------------------------------------------

    @invariant()
    def scan_matches_model(self) -> None:
        if self.store is None:
            return
        _assert_same(self.actual(), self.expected())

    @precondition(lambda self: self.store is not None)
    @rule(rng=range_st, family=st.one_of(st.none(), st.sampled_from(FAMILIES)))
    def scan_part(self, rng: tuple[bytes, bytes] | None, family: bytes | None) -> None:
        start, end = rng if rng is not None else (None, None)
        columns = None if family is None else [(family, None)]
        fams = None if family is None else {family}
        _assert_same(self.actual(start, end, columns=columns), self.expected(start, end, fams))

    def teardown(self) -> None:
        try:
            if self.store is not None:
                self.store.close()
        finally:
            self.store = None
            _drop_url(self.url)
            shutil.rmtree(self.dir, ignore_errors=True)


def _assert_same(actual: list[Entry], expected: list[Entry]) -> None:
    """Equal lists, or an error that shows what is missing and what is extra."""
    if actual == expected:
        return
    missing = [e for e in expected if e not in actual]
    extra = [e for e in actual if e not in expected]
    raise AssertionError(
        f"scan differs from the model: missing {missing}, unexpected {extra}"
        + ("" if missing or extra else f", order {actual} != {expected}")
    )


def _fresh_url(base: str, directory: Path, n: int) -> str:
    """An empty metadata database for one example: a new SQLite file, or the test's PostgreSQL
    database emptied (creating a database per example would cost more than the example)."""
    if base.startswith("sqlite"):
        return f"sqlite:///{directory / f'meta-{n}.db'}"
    _drop_url(base)
    return base


def _drop_url(url: str) -> None:
    if url.startswith("sqlite"):
        return
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


#: Shrinking a failing run of this machine can take many minutes (every step touches disk and
#: the metadata database), more than the test timeout; the unshrunk failing sequence is printed
#: all the same. Set LITHIFY_MODEL_SHRINK=1 to shrink it.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + (
    [Phase.shrink] if os.environ.get("LITHIFY_MODEL_SHRINK") else []
)

VARIANTS = {
    "exact": {"versions": 1, "background": False},
    "background": {"versions": 3, "background": True},
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_store_matches_model(variant: str, metadata_url: str, tmp_path: Path) -> None:
    machine = type(
        f"StoreMachine_{variant}",
        (StoreMachine,),
        {"metadata_url": metadata_url, "work_dir": tmp_path, **VARIANTS[variant]},
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=20,
            stateful_step_count=35,
            deadline=None,
            database=None,
            phases=PHASES,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


# -- regressions the model found, as plain tests --------------------------------------------------


@pytest.fixture
def store(tmp_path: Path, metadata_url: str):
    s = lithify.open(tmp_path / "store", metadata_url=metadata_url)
    yield s
    s.close()


def _rows(s: lithify.Store, table: str = "t") -> list[tuple[bytes, bytes]]:
    return [(k.row, v) for k, v in s.scan_entries(table)]


def test_split_keeps_unflushed_entries_of_other_tablets(tmp_path: Path, metadata_url: str) -> None:
    """Splitting one tablet re-hosts the table; tablets not split must keep their in-memory
    entries (they used to be dropped, and a later flush of the tablet then advanced its flushed
    sequence number past them, losing them for good)."""
    path = tmp_path / "store"
    with lithify.open(path, metadata_url=metadata_url) as s:
        s.create_table("t", splits=["m"])
        s.write("t", [Mutation(b"a").put("f", "q", "1"), Mutation(b"z").put("f", "q", "2")])
        s.add_splits("t", ["c"])
        assert _rows(s) == [(b"a", b"1"), (b"z", b"2")]
        s.merge_tablets("t", "a", "d")
        assert _rows(s) == [(b"a", b"1"), (b"z", b"2")]
        s.write("t", [Mutation(b"y").put("f", "q", "3")])
        s.flush("t")
    with lithify.open(path, metadata_url=metadata_url) as s:
        assert _rows(s) == [(b"a", b"1"), (b"y", b"3"), (b"z", b"2")]


def _import_future_entry(s: lithify.Store, tmp_path: Path, ahead_ms: int) -> int:
    """Bulk import one entry stamped `ahead_ms` in the future: the tablet's clock moves past it
    (the same happens when a burst of writes outpaces the millisecond clock)."""
    ts = time.time_ns() // 1_000_000 + ahead_ms
    table = pa.table(
        {
            "row": [b"other"],
            "family": [b"f"],
            "qualifier": [b"q"],
            "visibility": [b""],
            "timestamp": pa.array([ts], pa.int64()),
            "deleted": [False],
            "value": [b"future"],
        },
        schema=ENTRY_SCHEMA,
    )
    path = tmp_path / f"future-{ts}.parquet"
    pq.write_table(table, path)
    s.import_files("t", [path])
    return ts


@pytest.mark.parametrize(
    "op",
    [
        "split",
        "merge",
        "offline_online",
        "reopen",
    ],
)
def test_server_time_never_goes_backwards(op: str, tmp_path: Path, metadata_url: str) -> None:
    """SYSTEM.md 1: server time is monotonic per tablet, also across re-hosting; otherwise a
    later write gets an older timestamp and is hidden behind an earlier one."""
    path = tmp_path / "store"
    s = lithify.open(path, metadata_url=metadata_url)
    try:
        s.create_table("t", splits=["m"])
        future = _import_future_entry(s, tmp_path, ahead_ms=120_000)
        s.write("t", [Mutation(b"r").put("f", "q", "first")])
        if op == "split":
            s.add_splits("t", ["p"])
        elif op == "merge":
            s.merge_tablets("t")
        elif op == "offline_online":
            s.offline("t")
            s.online("t")
        else:
            s.flush("t")  # nothing left in the log to replay (and to move the clock)
            s.close()
            s = lithify.open(path, metadata_url=metadata_url)
        s.write("t", [Mutation(b"r").put("f", "q", "second")])
        got = [(k.timestamp > future, v) for k, v in s.scan_entries("t", "r", "r")]
        assert got == [(True, b"second")]
    finally:
        s.close()


def test_imported_delete_hides_puts_that_were_in_memory(
    store: lithify.Store, tmp_path: Path
) -> None:
    """A delete arriving by bulk import must keep hiding an older put written before it, even
    after a compaction of all the tablet's files drops the delete (the put used to sit in the
    in-memory map, outside the compaction, and reappeared)."""
    store.create_table("t")
    store.write("t", [Mutation(b"r").put("f", "q", "old", timestamp=5)])
    table = pa.table(
        {
            "row": [b"r"],
            "family": [b"f"],
            "qualifier": [b"q"],
            "visibility": [b""],
            "timestamp": pa.array([10], pa.int64()),
            "deleted": [True],
            "value": [b""],
        },
        schema=ENTRY_SCHEMA,
    )
    pq.write_table(table, tmp_path / "del.parquet")
    store.import_files("t", [tmp_path / "del.parquet"])
    assert _rows(store) == []
    (tablet,) = store.tablets("t")
    store.compact_files("t", tablet.extent, tablet.files)
    assert _rows(store) == []


def test_compaction_committing_after_offline_online_updates_the_hosted_tablet(
    store: lithify.Store,
) -> None:
    """A compaction running when the table goes offline commits through the tablet object it
    started with; the tablet hosted after `online` must see the new file set, or it keeps
    listing the replaced files, the garbage collector deletes them, and scans fail."""
    # Slow compactions down so that one is still running across offline/online.
    store.set_system_property("tserver.compaction.major.service.default.rate.limit", "8K")
    store.create_table("t")
    for k in range(4):
        store.write(
            "t",
            [Mutation(f"r{k}{i:04d}").put("f", "q", "x" * 100, timestamp=1) for i in range(400)],
        )
        store.flush("t")
    extent = store.tablets("t")[0].extent
    deadline = time.monotonic() + 10
    while not store.meta.get_tablet(extent).compactions:
        assert time.monotonic() < deadline, "no background compaction started"
        time.sleep(0.02)
    store.offline("t")
    store.online("t")
    deadline = time.monotonic() + 60
    while store.meta.get_tablet(extent).compactions:
        assert time.monotonic() < deadline, "the background compaction did not finish"
        time.sleep(0.05)

    def hosted_matches_metadata() -> bool:
        hosted = [f.path for f in store.tablets("t")[0].files]
        return hosted == [f.path for f in store.meta.get_tablet(extent).files]

    # The commit's thread refreshes the hosted tablet right after its metadata write.
    deadline = time.monotonic() + 10
    while not hosted_matches_metadata():
        assert time.monotonic() < deadline, "the hosted tablet kept the replaced files"
        time.sleep(0.05)
    store.gc()
    assert store.count("t") == 1600
