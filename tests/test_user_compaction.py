"""User compactions on a store (SYSTEM.md 5.1, 5.2, 5.6), on both metadata backends.

A user compaction must end with every file of each tablet in range in one file, even a tablet
that already has one file (its deletes and whatever the iterators filter must go). It runs
through the compaction services (so execution hints route it), may be asynchronous, reports
progress, and can be cancelled while running without leaving reservations, temporary files or a
half-finished table behind. A gated iterator defined here holds compactions open so that
cancellation and `wait=False` are observed mid-flight, not raced.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import lithify
import lithify.tablet.compactions as driver_module
from lithify import Mutation
from lithify.compaction.compactor_job import CompactionRequest, CompactionResult
from lithify.compaction.iterators import CompactionIterator
from lithify.data.ranges import FileRef
from lithify.errors import CompactionCancelledError, ConfigError
from tests.gates import WAIT_S, Gate, new_gate, wait_until

SVC = "tserver.compaction.major.service."


# -- iterators of this module ---------------------------------------------------------------------


class DropValuePrefix(CompactionIterator):
    """Drops entries whose value starts with option `prefix` (a user filter on Arrow batches)."""

    def init(self, options: Mapping[str, str]) -> None:
        self.prefix = options["prefix"].encode()

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        values = batch.column("value").to_pylist()
        keep = pa.array([not v.startswith(self.prefix) for v in values], pa.bool_())
        return batch.filter(keep)


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path, metadata_url) -> Iterator[lithify.Store]:
    s = lithify.open(tmp_path / "store", metadata_url=metadata_url)
    yield s
    s.close()


@pytest.fixture
def gate(store: lithify.Store) -> Iterator[Gate]:
    """A fresh gate, opened when the test ends (before the store closes), pass or fail."""
    with new_gate() as g:
        yield g


def gated(gate: Gate) -> list[tuple[str, dict[str, str]]]:
    return [gate.iterator()]


def put(store: lithify.Store, table: str, rows: list[str], tag: str) -> None:
    store.write(table, [Mutation(r.encode()).put("f", "q", f"{tag}-{r}") for r in rows])


def scan(store: lithify.Store, table: str) -> dict[bytes, bytes]:
    return {k.row: v for k, v in store.scan_entries(table)}


def file_paths(store: lithify.Store, table: str) -> list[tuple[str, ...]]:
    return [tuple(f.path for f in t.files) for t in store.tablets(table)]


def read_file(store: lithify.Store, ref: FileRef) -> pa.Table:
    return pq.read_table(store.storage.path(ref.path))


def table_metas(store: lithify.Store, table: str) -> list:
    return store.meta.tablets(store.table_info(table).id)


def tmp_files(store: lithify.Store) -> list[Path]:
    return [p for p in (store.path / "data").rglob("*") if "_tmp_" in p.name]


def layered_table(store: lithify.Store, layers: int = 3) -> dict[bytes, bytes]:
    """Table `t` with 4 tablets, each with `layers` files (too few for a system compaction at
    ratio 3); returns the expected scan."""
    store.create_table("t", splits=["d", "h", "l"])
    rows = ["a", "b", "e", "f", "i", "j", "m", "n"]
    for layer in range(layers):
        put(store, "t", rows, f"v{layer}")
        store.flush("t")
    assert store.files_per_tablet() == [layers] * 4
    return {r.encode(): f"v{layers - 1}-{r}".encode() for r in rows}


# -- tests ----------------------------------------------------------------------------------------


def test_row_range_compacts_only_tablets_in_range(store: lithify.Store) -> None:
    expected = layered_table(store)
    before = file_paths(store, "t")
    summary = store.compact("t", "e", "i")
    after = file_paths(store, "t")
    # Tablets (d, h] and (h, l] overlap [e, i]; (-inf, d] and (l, +inf) do not.
    assert after[0] == before[0] and after[3] == before[3]
    for i in (1, 2):
        assert len(after[i]) == 1 and after[i][0] not in before[i]
        assert "/A" in after[i][0]
    assert summary.tablets == 2 and summary.files_in == 6
    assert summary.entries_read == 12 and summary.entries_written == 4
    assert scan(store, "t") == expected


def test_single_file_tablets_are_rewritten_and_deletes_dropped(store: lithify.Store) -> None:
    store.create_table("t", splits=["m"])
    put(store, "t", ["a", "b", "c", "x", "y"], "v")
    store.write(
        "t",
        [Mutation(b"b").delete("f", "q"), Mutation(b"y").delete("f", "q")]
        + [Mutation(b"never").delete("f", "q")],
    )
    store.flush("t")
    before = [t.files for t in store.tablets("t")]
    assert [len(f) for f in before] == [1, 1]
    deletes = sum(pc.sum(read_file(store, f[0]).column("deleted")).as_py() or 0 for f in before)
    assert deletes == 3, "the flushed files should carry the delete markers"

    store.compact("t")
    after = [t.files for t in store.tablets("t")]
    assert [len(f) for f in after] == [1, 1]
    for old, new in zip(before, after, strict=True):
        assert new[0].path != old[0].path and "/A" in new[0].path
        content = read_file(store, new[0])
        assert not any(content.column("deleted").to_pylist())
    assert sorted(scan(store, "t")) == [b"a", b"c", b"x"]
    assert sum(f[0].entries for f in after) == 3


def test_compaction_iterators_apply_to_that_compaction_only(store: lithify.Store) -> None:
    store.create_table("t", splits=["m"])
    entries = []
    for i, r in enumerate(["a", "b", "c", "n", "o", "p"]):
        ts = 1000 * (i + 1)  # 1000 .. 6000
        value = ("drop-" if r in ("c", "p") else "keep-") + r
        entries.append(Mutation(r.encode()).put("f", "q", value, timestamp=ts))
    store.write("t", entries)
    store.flush("t")
    store.compact(
        "t",
        iterators=[
            # Age-off at "now" 10000 with ttl 7500: drops timestamps below 2500 (rows a, b).
            ("lithify.compaction.iterators:AgeOffFilter", {"ttl": "7500", "currentTime": "10000"}),
            (f"{__name__}:DropValuePrefix", {"prefix": "drop-"}),
        ],
    )
    assert sorted(scan(store, "t")) == [b"n", b"o"]
    # Everything of (-inf, m] was filtered out: an empty output is no file at all.
    assert store.files_per_tablet() == [0, 1]
    # The filters belonged to that compaction: the next one keeps everything that is left.
    put(store, "t", ["c"], "drop")
    store.compact("t")
    assert sorted(scan(store, "t")) == [b"c", b"n", b"o"]


def test_unloadable_iterator_rejected_before_anything_is_selected(store: lithify.Store) -> None:
    store.create_table("t")
    put(store, "t", ["a"], "v")
    store.flush("t")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="no_such_module_xyz"):
        store.compact("t", iterators=[("no_such_module_xyz:Filter", {})], timeout=10)
    assert time.monotonic() - started < 5
    assert all(m.selection is None for m in table_metas(store, "t"))
    store.compact("t", timeout=WAIT_S)  # the table is not left with a pending compaction


def test_wait_false_returns_at_once_and_completes_later(store: lithify.Store, gate: Gate) -> None:
    expected = layered_table(store, layers=2)
    started = time.monotonic()
    store.compact("t", wait=False, iterators=gated(gate))
    assert time.monotonic() - started < 5.0
    assert wait_until(lambda: gate.active >= 1)
    assert store.files_per_tablet() == [2] * 4, "nothing may commit while the gate is closed"
    gate.opened.set()
    assert wait_until(lambda: store.files_per_tablet() == [1] * 4)
    assert all(m.selection is None for m in table_metas(store, "t"))
    assert scan(store, "t") == expected


def test_progress_callback(store: lithify.Store, gate: Gate) -> None:
    layered_table(store, layers=2)
    calls: list[tuple[int, int]] = []
    opener = threading.Timer(0.8, gate.opened.set)
    opener.start()
    try:
        store.compact("t", iterators=gated(gate), progress=lambda d, t: calls.append((d, t)))
    finally:
        opener.cancel()
    assert len(calls) >= 2, calls
    assert calls[-1] == (4, 4)
    assert calls[0][0] < 4, "a call while the compaction was held should show it unfinished"
    assert all(t == 4 for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_cancel_while_running(store: lithify.Store, gate: Gate) -> None:
    expected = layered_table(store, layers=2)
    before = file_paths(store, "t")
    cancelled: list[int] = []

    def cancel_when_running() -> None:
        if wait_until(lambda: gate.active >= 1):
            cancelled.append(store.cancel_compaction("t"))
        gate.opened.set()

    helper = threading.Thread(target=cancel_when_running)
    helper.start()
    try:
        with pytest.raises(CompactionCancelledError):
            store.compact("t", iterators=gated(gate), timeout=WAIT_S)
    finally:
        helper.join(WAIT_S)
    assert cancelled == [1]
    # The running passes were interrupted and released; nothing committed.
    assert wait_until(
        lambda: all(not m.compactions and m.selection is None for m in table_metas(store, "t"))
    )
    assert store.wait_for_compactions(WAIT_S)
    assert file_paths(store, "t") == before
    assert wait_until(lambda: tmp_files(store) == [])
    assert scan(store, "t") == expected
    totals = store.compactions.totals.snapshot()
    assert sum(v["cancelled"] for v in totals.values()) >= 1
    assert sum(v["completed"] for v in totals.values()) == 0
    # Nothing pending: cancelling again finds nothing, and a new user compaction works.
    assert store.cancel_compaction("t") == 0
    store.compact("t", timeout=WAIT_S)
    assert store.files_per_tablet() == [1] * 4
    assert scan(store, "t") == expected


def test_hint_routes_to_the_service_named_for_its_type(store: lithify.Store) -> None:
    store.set_system_property(
        SVC + "cs_big.planner.opts.executors", json.dumps([{"name": "all", "numThreads": 1}])
    )
    expected = layered_table(store, layers=2)
    store.set_property("t", "table.compaction.dispatcher.opts.service.user.big", "cs_big")
    store.compact("t", "a", "e", hints={"compaction_type": "big"})
    totals = store.compactions.totals.snapshot()
    assert {k: v["completed"] for k, v in totals.items()} == {"i.cs_big.all": 2}
    # Without the hint (or with another type) USER compactions stay on `default`.
    put(store, "t", ["a", "m"], "w")
    store.compact("t", hints={"compaction_type": "other"})
    totals = store.compactions.totals.snapshot()
    assert totals["i.cs_big.all"]["completed"] == 2
    assert sum(v["completed"] for k, v in totals.items() if k.startswith("i.default.")) == 4
    expected |= {b"a": b"w-a", b"m": b"w-m"}
    assert scan(store, "t") == expected


def test_more_files_than_max_open_take_several_passes(
    store: lithify.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.set_system_property(SVC + "default.planner.opts.maxOpen", "10")
    store.create_table(
        "t",
        # No system compaction may touch the 25 files first.
        properties={"table.compaction.major.ratio": "1000", "table.file.max": "50"},
    )
    expected: dict[bytes, bytes] = {}
    for i in range(25):
        rows = [f"r{i:02d}", f"s{i % 5}"]
        put(store, "t", rows, f"v{i}")
        expected |= {r.encode(): f"v{i}-{r}".encode() for r in rows}
        if i == 20:
            # A delete in a late file must still hide the put from the first file.
            store.write("t", [Mutation(b"r00").delete("f", "q")])
            expected.pop(b"r00")
        store.flush("t")
    assert store.files_per_tablet() == [25]

    passes: list[tuple[int, bool]] = []
    real = driver_module.run_compaction

    def recording(storage, request: CompactionRequest, **kw) -> CompactionResult:
        passes.append((len(request.inputs), request.propagate_deletes))
        return real(storage, request, **kw)

    monkeypatch.setattr(driver_module, "run_compaction", recording)
    summary = store.compact("t", timeout=60)
    assert store.files_per_tablet() == [1]
    assert len(passes) >= 3, passes
    assert all(n <= 10 for n, _ in passes), passes
    assert sum(n for n, _ in passes) == 25 + len(passes) - 1
    # Only the final pass sees all the tablet's files and may drop deletes.
    assert [p for _, p in passes] == [True] * (len(passes) - 1) + [False]
    assert summary.files_in == sum(n for n, _ in passes)
    assert scan(store, "t") == expected
