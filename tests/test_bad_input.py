"""Bad input gets a clear error, and damaged files and logs are detected, never silently wrong.

* Malformed mutations and entry tables: `InvalidMutationError` naming the field or column at
  fault, and nothing of a rejected write is applied.
* Unknown tables: `TableNotFoundError` naming the table, for every operation.
* Bad property values: `ConfigError` naming the property and the accepted values.
* A corrupt data file: a scan raises `CorruptFileError` naming the file.
* A torn log tail (a writer killed, the newest `.wal` truncated): reopening recovers every record
  before the torn one, logs a warning, and the torn record's mutations are absent as a whole.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pyarrow as pa
import pytest

import lithify
from lithify import Mutation
from lithify.errors import (
    ConfigError,
    CorruptFileError,
    InvalidMutationError,
    TableNotFoundError,
    TableOfflineError,
)
from tests import crash_child as cc
from tests.test_crash import READY_TIMEOUT_S, Child


@pytest.fixture
def store(tmp_path: Path, metadata_url: str):
    s = lithify.open(tmp_path / "store", metadata_url=metadata_url)
    s.create_table("t")
    s.write("t", [Mutation(b"keep").put("f", "q", "v", timestamp=1)])
    yield s
    s.close()


def _entries(s: lithify.Store, table: str = "t") -> list[tuple[bytes, bytes]]:
    return [(k.row, v) for k, v in s.scan_entries(table)]


def _arrow(**cols: list) -> pa.Table:
    base = {"row": [b"r"], "family": [b"f"], "qualifier": [b"q"], "value": [b"v"]}
    base.update(cols)
    return pa.table(base)


# -- malformed mutations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: Mutation(b""), ["row", "empty"]),
        (lambda: Mutation(""), ["row", "empty"]),
        (lambda: Mutation(17), ["row", "int"]),
        (lambda: Mutation(None), ["row", "NoneType"]),
        (lambda: Mutation(b"r").put(1, b"q", b"v"), ["family", "int"]),
        (lambda: Mutation(b"r").put(b"f", 2.5, b"v"), ["qualifier", "float"]),
        (lambda: Mutation(b"r").put(b"f", b"q", 3), ["value", "int"]),
        (lambda: Mutation(b"r").put(b"f", b"q", b"v", visibility=[1]), ["visibility", "list"]),
        (lambda: Mutation(b"r").put(b"f", b"q", b"v", timestamp="5"), ["timestamp", "'5'"]),
        (lambda: Mutation(b"r").put(b"f", b"q", b"v", timestamp=-1), ["timestamp", "-1"]),
        (lambda: Mutation(b"r").put(b"f", b"q", b"v", timestamp=2**63), ["timestamp"]),
        (lambda: Mutation(b"r").put(b"f", b"q", b"v", timestamp=True), ["timestamp", "True"]),
        (lambda: Mutation(b"r").delete(b"f", None), ["qualifier", "NoneType"]),
    ],
)
def test_malformed_mutation_is_rejected_when_built(build, words: list[str]) -> None:
    with pytest.raises(InvalidMutationError) as err:
        build()
    for w in words:
        assert w in str(err.value), f"{w!r} not in {err.value}"


@pytest.mark.parametrize(
    ("batch", "words"),
    [
        ([Mutation(b"ok").put("f", "q", "v"), Mutation(b"empty")], ["no updates", "empty"]),
        ([Mutation(b"ok").put("f", "q", "v"), "not a mutation"], ["Mutation", "str"]),
        ([Mutation(b"ok").put("f", "q", "v"), None], ["Mutation", "NoneType"]),
        ([Mutation(b"ok").put("f", "q", "v"), (b"r", b"f", b"q", b"v")], ["Mutation", "tuple"]),
    ],
)
def test_bad_mutation_batch_is_rejected_whole(store: lithify.Store, batch, words) -> None:
    """One bad mutation rejects the batch before anything of it is applied."""
    with pytest.raises(InvalidMutationError) as err:
        store.write("t", batch)
    for w in words:
        assert w in str(err.value), f"{w!r} not in {err.value}"
    assert _entries(store) == [(b"keep", b"v")]


@pytest.mark.parametrize(
    ("table", "words"),
    [
        (_arrow(colour=["red"]), ["unknown", "colour"]),
        (_arrow(row=[b""]), ["row", "empty"]),
        (
            pa.table({"row": [b"r", b"s"], "family": [b"f", None], "qualifier": [b"q"] * 2}),
            [
                "family",
                "null",
            ],
        ),
        (_arrow(row=[None]), ["row", "null"]),
        (_arrow(value=[None]), ["value", "null"]),
        (_arrow(deleted=[None]), ["deleted", "null"]),
        (pa.table({"row": [b"r"], "qualifier": [b"q"]}), ["family", "missing"]),
        (_arrow(row=[12]), ["row", "int64"]),
        (_arrow(family=[[1, 2]]), ["family", "list"]),
        (_arrow(timestamp=[-5]), ["timestamp", "negative"]),
        (_arrow(timestamp=["yesterday"]), ["timestamp"]),
        (_arrow(deleted=["maybe"]), ["deleted"]),
    ],
    ids=lambda v: None if isinstance(v, pa.Table) else "-".join(v),
)
def test_bad_entry_table_is_rejected_whole(store: lithify.Store, table: pa.Table, words) -> None:
    """Arrow input is checked column by column; the error names the column, nothing is applied."""
    with pytest.raises(InvalidMutationError) as err:
        store.write("t", table)
    for w in words:
        assert w in str(err.value), f"{w!r} not in {err.value}"
    assert _entries(store) == [(b"keep", b"v")]


@pytest.mark.parametrize("bad", [{"row": b""}, {"row": None}, {"value": None}, {"timestamp": -1}])
def test_one_bad_entry_rejects_the_whole_table(store: lithify.Store, bad: dict) -> None:
    rows = [
        {"row": b"a", "family": b"f", "qualifier": b"q", "timestamp": 3, "value": b"1"},
        {"row": b"b", "family": b"f", "qualifier": b"q", "timestamp": 3, "value": b"2"},
    ]
    rows[1].update(bad)
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("row", pa.binary()),
                ("family", pa.binary()),
                ("qualifier", pa.binary()),
                ("timestamp", pa.int64()),
                ("value", pa.binary()),
            ]
        ),
    )
    with pytest.raises(InvalidMutationError, match=next(iter(bad))):
        store.write("t", table)
    assert _entries(store) == [(b"keep", b"v")]


def test_entry_table_defaults_and_string_columns(store: lithify.Store) -> None:
    """The accepted shape, for contrast: strings for bytes, optional visibility/timestamp."""
    store.write("t", pa.table({"row": ["s"], "family": ["f"], "qualifier": ["q"], "value": ["x"]}))
    assert _entries(store) == [(b"keep", b"v"), (b"s", b"x")]


# -- unknown tables -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op",
    [
        lambda s: s.write("nope", [Mutation(b"r").put("f", "q", "v")]),
        lambda s: list(s.scan("nope")),
        lambda s: list(s.scan_entries("nope")),
        lambda s: s.flush("nope"),
        lambda s: s.compact("nope"),
        lambda s: s.add_splits("nope", ["m"]),
        lambda s: s.merge_tablets("nope"),
        lambda s: s.offline("nope"),
        lambda s: s.online("nope"),
        lambda s: s.set_property("nope", "table.versions", "2"),
        lambda s: s.get_properties("nope"),
        lambda s: s.import_files("nope", []),
        lambda s: s.delete_table("nope"),
        lambda s: s.tablets("nope"),
    ],
    ids=[
        "write",
        "scan",
        "scan_entries",
        "flush",
        "compact",
        "add_splits",
        "merge",
        "offline",
        "online",
        "set_property",
        "get_properties",
        "import_files",
        "delete_table",
        "tablets",
    ],
)
def test_unknown_table(store: lithify.Store, op) -> None:
    with pytest.raises(TableNotFoundError, match="nope"):
        op(store)


def test_offline_table_cannot_be_read_or_written(store: lithify.Store) -> None:
    store.offline("t")
    with pytest.raises(TableOfflineError, match="'t'"):
        store.write("t", [Mutation(b"r").put("f", "q", "v")])
    with pytest.raises(TableOfflineError, match="'t'"):
        list(store.scan("t"))
    store.online("t")
    assert _entries(store) == [(b"keep", b"v")]


# -- bad properties -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("table.versions", "0", ["table.versions", "minimum 1"]),
        ("table.versions", "many", ["table.versions", "integer >= 1"]),
        ("table.versions", "", ["table.versions", "integer"]),
        ("table.durability", "fast", ["table.durability", "none", "flush", "sync"]),
        ("table.file.compress.type", "rar", ["table.file.compress.type", "zstd", "snappy"]),
        ("table.compaction.major.ratio", "0.5", ["table.compaction.major.ratio", "1.0"]),
        ("table.compaction.major.ratio", "big", ["table.compaction.major.ratio", "number"]),
        (
            "table.compaction.dispatcher",
            "no-colon",
            ["table.compaction.dispatcher", "module:Class"],
        ),
        ("table.iterator.scan.x", "notanumber,a:B", ["table.iterator.scan.x", "integer"]),
        ("table.iterator.oops.x", "10,a:B", ["table.iterator.oops.x", "scan|majc"]),
        ("table.verions", "2", ["table.verions", "unknown", "table.versions"]),
    ],
)
def test_bad_table_property(store: lithify.Store, name: str, value: str, words) -> None:
    """Rejected on set and on create, naming the property and what it accepts; nothing changes."""
    before = store.get_properties("t")
    with pytest.raises(ConfigError) as err:
        store.set_property("t", name, value)
    for w in words:
        assert w in str(err.value), f"{w!r} not in {err.value}"
    assert store.get_properties("t") == before
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        store.create_table("t2", properties={name: value})
    assert [t.name for t in store.list_tables()] == ["t"]


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("tserver.memory.maps.max", "lots", ["tserver.memory.maps.max", "size", "K, M or G"]),
        ("tserver.memory.maps.max", "-1M", ["tserver.memory.maps.max", "size"]),
        ("tserver.compaction.major.delay", "soon", ["tserver.compaction.major.delay", "30s"]),
        ("tserver.scan.files.open.max", "1", ["tserver.scan.files.open.max", "minimum 2"]),
        ("tserver.wal.max.size", "1T", ["tserver.wal.max.size", "size"]),
        ("tserver.no.such.thing", "1", ["tserver.no.such.thing", "unknown"]),
    ],
)
def test_bad_system_property(store: lithify.Store, name: str, value: str, words) -> None:
    with pytest.raises(ConfigError) as err:
        store.set_system_property(name, value)
    for w in words:
        assert w in str(err.value), f"{w!r} not in {err.value}"


def test_bad_property_type(store: lithify.Store) -> None:
    with pytest.raises(ConfigError, match="table.versions.*string"):
        store.set_property("t", "table.versions", 3)  # type: ignore[arg-type]


# -- corrupt data files -------------------------------------------------------------------------


def _flushed_file(tmp_path: Path, metadata_url: str) -> tuple[Path, str]:
    """A store with one flushed file of incompressible values; returns (store dir, file path)."""
    path = tmp_path / "store"
    rnd = random.Random(5)
    with lithify.open(path, metadata_url=metadata_url) as s:
        s.create_table("t", properties={"table.file.compress.type": "none"})
        s.write(
            "t",
            [
                Mutation(f"r{i:05d}".encode()).put("f", "q", rnd.randbytes(200), timestamp=1)
                for i in range(3000)
            ],
        )
        s.flush("t")
        (tablet,) = s.tablets("t")
        (ref,) = tablet.files
    return path, ref.path


@pytest.mark.parametrize("damage", ["middle", "footer", "truncated"])
def test_corrupt_data_file_names_the_file(tmp_path: Path, metadata_url: str, damage: str) -> None:
    path, rel = _flushed_file(tmp_path, metadata_url)
    data_file = path / "data" / rel
    raw = bytearray(data_file.read_bytes())
    if damage == "middle":
        mid = len(raw) // 2
        raw[mid : mid + 64] = bytes(b ^ 0x5A for b in raw[mid : mid + 64])
    elif damage == "footer":
        raw[-40:-8] = b"\xff" * 32
    else:
        raw = raw[: len(raw) // 3]
    data_file.write_bytes(bytes(raw))
    with lithify.open(path, metadata_url=metadata_url) as s:
        with pytest.raises(CorruptFileError) as err:
            list(s.scan("t"))
        assert rel.rsplit("/", 1)[-1] in str(err.value)


# -- torn write-ahead log -----------------------------------------------------------------------


def test_torn_log_tail_recovers_up_to_the_last_good_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer is killed with SIGKILL after acknowledged batches; the newest log loses its last
    bytes. Reopening replays every record before the torn one (with a warning naming the log);
    the torn record's mutations are absent, each mutation whole or absent."""
    path = tmp_path / "store"
    batches = 8
    with lithify.open(path) as s:
        # The default memory limit: nothing is flushed, so every batch lives only in the log.
        s.create_table(cc.TABLE, splits=cc.SPLITS, properties={"table.versions": "10"})
    child = Child([str(path), "hold", "1", "0", str(batches)], tmp_path / "hold.err")
    try:
        lines = []
        for _ in range(batches + 2):
            line = child.next_line(READY_TIMEOUT_S)
            assert line is not None, f"writer died early; stderr:\n{child.stderr()}"
            lines.append(line)
            if line == "DONE":
                break
        assert lines[-1] == "DONE", lines
        assert [x for x in lines if x.startswith("ACK")] == [f"ACK {b}" for b in range(batches)]
        child.kill()
    finally:
        child.close()
    logs = sorted((path / "wal").glob("*.wal"))
    assert logs, "the writer left no write-ahead log"
    newest = logs[-1]
    size = newest.stat().st_size
    with open(newest, "r+b") as f:
        f.truncate(size - 5)
    caplog.set_level(logging.WARNING)
    with lithify.open(path) as s:
        found: dict[int, set[int]] = {}
        for key, value in s.scan_entries(cc.TABLE):
            b, i = cc.parse_row(key.row)
            j = int(key.qualifier[1:])
            assert value == cc.expected_value(b, i, j)
            found.setdefault(b, set()).add(i)
        counts = {}
        for key, _ in s.scan_entries(cc.TABLE):
            counts[key.row] = counts.get(key.row, 0) + 1
    assert any(
        "replay stops" in r.getMessage() and newest.name in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    assert set(counts.values()) == {cc.COLUMNS}, "a mutation is half-applied"
    everything = set(range(cc.MUTATIONS))
    for b in range(batches - 1):
        assert found.get(b) == everything, f"batch {b}, before the torn record, lost mutations"
    last = found.get(batches - 1, set())
    assert last != everything, "the torn record was replayed"
    # The torn record is the last tablet's part of the last batch: the other parts survive.
    torn_part = set(range(int(cc.SPLITS[-1][1:]), cc.MUTATIONS))
    assert last == everything - torn_part
