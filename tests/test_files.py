"""Sorted files: storage, names, writer, reader, joined parts, corruption, bulk validation."""

from __future__ import annotations

import random
import re
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lithify.data.key import ENTRY_SCHEMA, Key, sort_table
from lithify.data.ranges import RowRange
from lithify.errors import CorruptFileError
from lithify.files.bulk import BulkImportError, validate_import_file
from lithify.files.naming import final_name, is_tmp, kind_of, new_file_name, tmp_name
from lithify.files.partitioned_writer import PartitionedFileWriter
from lithify.files.reader import SortedFileReader
from lithify.files.storage import Storage
from lithify.files.writer import SortedFileWriter, write_entries


def make_table(n: int, seed: int = 1, deletes: float = 0.1) -> pa.Table:
    rnd = random.Random(seed)
    rows = [b"r%06d" % rnd.randrange(n * 3) for _ in range(n)]
    t = pa.table(
        {
            "row": pa.array(rows, pa.binary()),
            "family": pa.array([rnd.choice([b"f", b"g"]) for _ in range(n)], pa.binary()),
            "qualifier": pa.array([b"q%d" % rnd.randrange(4) for _ in range(n)], pa.binary()),
            "visibility": pa.array([b""] * n, pa.binary()),
            "timestamp": pa.array([rnd.randrange(1000) for _ in range(n)], pa.int64()),
            "deleted": pa.array([rnd.random() < deletes for _ in range(n)], pa.bool_()),
            "value": pa.array([rnd.randbytes(8) for _ in range(n)], pa.binary()),
        },
        schema=ENTRY_SCHEMA,
    )
    return sort_table(t)


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage(str(tmp_path / "store"))


def read_all(storage: Storage, path: str, rng: RowRange = RowRange()) -> pa.Table:
    with SortedFileReader.open(storage, path) as r:
        return pa.Table.from_batches(list(r.batches(rng, batch_size=97)), schema=ENTRY_SCHEMA)


# -- storage and names ---------------------------------------------------------------------


def test_storage_basics(storage: Storage) -> None:
    with storage.open_output("a/b/c.bin") as f:
        f.write(b"hello")
    assert storage.exists("a/b/c.bin")
    assert storage.size("a/b/c.bin") == 5
    with storage.open_input("a/b/c.bin") as f:
        assert f.read() == b"hello"
    storage.rename("a/b/c.bin", "x/y.bin")
    assert not storage.exists("a/b/c.bin")
    assert storage.list_files("") == ["x/y.bin"]
    assert storage.list_files("x") == ["x/y.bin"]
    assert storage.list_files("nothing-here") == []
    storage.delete("x/y.bin")
    storage.delete("x/y.bin")  # already gone: fine
    assert not storage.exists("x/y.bin")
    with pytest.raises(FileNotFoundError):
        storage.size("x/y.bin")


def test_storage_accepts_uri(tmp_path) -> None:
    s = Storage(f"file://{tmp_path}/viauri")
    with s.open_output("t/f.bin") as f:
        f.write(b"x")
    assert (tmp_path / "viauri" / "t" / "f.bin").read_bytes() == b"x"


def test_names() -> None:
    names = {new_file_name("F", "t1") for _ in range(200)}
    assert len(names) == 200
    for n in names:
        assert re.fullmatch(r"tables/t1/F[0-9a-f]{30}\.parquet", n)
    a = new_file_name("A", "7")
    assert kind_of(a) == "A" and not is_tmp(a)
    t = tmp_name(a, "abc")
    assert t == a + "_tmp_abc" and is_tmp(t) and kind_of(t) == "A" and final_name(t) == a
    for k in "FCAI":
        assert kind_of(new_file_name(k, "t")) == k
    with pytest.raises(ValueError):
        new_file_name("X", "t")
    with pytest.raises(ValueError):
        kind_of("tables/t/zzz.parquet")


# -- writer and reader ---------------------------------------------------------------------


def test_round_trip_and_footer(storage: Storage) -> None:
    t = make_table(1000)
    info = write_entries(storage, "tables/t/F1.parquet", t, row_group_size=128)
    assert info.entries == 1000 and info.size == storage.size("tables/t/F1.parquet")
    with SortedFileReader.open(storage, "tables/t/F1.parquet") as r:
        assert r.format_version == 1
        assert r.entries == 1000
        assert r.num_row_groups == 8
        assert r.first_key == info.first_key
        assert r.last_key == info.last_key
        assert r.first_key == Key(*[t.column(i)[0].as_py() for i in range(6)])
        assert r.last_key == Key(*[t.column(i)[999].as_py() for i in range(6)])
    assert read_all(storage, "tables/t/F1.parquet").equals(t)
    md = pq.ParquetFile(storage.path("tables/t/F1.parquet")).metadata
    assert md.row_group(0).column(0).statistics.has_min_max
    assert md.row_group(0).column(6).statistics is None


@pytest.mark.parametrize("codec", ["zstd", "snappy", "lz4", "none"])
def test_codecs(storage: Storage, codec: str) -> None:
    t = make_table(300, seed=2)
    write_entries(storage, "f.parquet", t, compression=codec)
    assert read_all(storage, "f.parquet").equals(t)


def test_empty_file(storage: Storage) -> None:
    info = write_entries(storage, "e.parquet", [])
    assert info.entries == 0 and info.first_key is None
    with SortedFileReader.open(storage, "e.parquet") as r:
        assert r.entries == 0 and r.first_key is None and r.format_version == 1
        assert list(r.batches()) == []


def test_row_range_reads_skip_row_groups(storage: Storage) -> None:
    t = make_table(2000, seed=3)
    write_entries(storage, "f.parquet", t, row_group_size=100)
    rows = t.column("row").to_pylist()
    cases = [
        RowRange(rows[500], rows[900]),
        RowRange.rows(rows[0], rows[10]),
        RowRange(None, rows[150]),
        RowRange(rows[1800], None),
        RowRange(rows[700], rows[700]),  # empty
        RowRange.rows(rows[700], rows[700]),
        RowRange.rows(b"zzz", None),
    ]
    with SortedFileReader.open(storage, "f.parquet") as r:
        for rng in cases:
            want = t.filter(pa.array([rng.contains(x) for x in rows]))
            got = read_all(storage, "f.parquet", rng)
            assert got.equals(want), rng
            groups = r.row_groups_in(rng)
            assert len(groups) <= want.num_rows // 100 + 2
        assert len(r.row_groups_in(RowRange(rows[500], rows[900]))) < r.num_row_groups // 2


def test_unsorted_write_rejected(storage: Storage) -> None:
    t = make_table(200, seed=4)
    w = SortedFileWriter(storage, "u.parquet")
    w.write(t.slice(100).to_batches()[0])
    with pytest.raises(ValueError, match="out of key order"):
        w.write(t.slice(0, 100).to_batches()[0])
    w.abort()
    assert not storage.exists("u.parquet")


def test_wrong_schema_write_rejected(storage: Storage) -> None:
    w = SortedFileWriter(storage, "s.parquet")
    bad = pa.record_batch({"row": pa.array(["a"]), "x": pa.array([1])})
    with pytest.raises(ValueError, match="columns"):
        w.write(bad)
    w.abort()


def test_partitioned_writer_writes_parts_in_key_order(storage: Storage) -> None:
    t = make_table(3000, seed=5)
    w = PartitionedFileWriter(storage, "j.parquet_tmp_1", 4, row_group_size=128, compression="zstd")
    cuts = [0, 700, 700, 2100, 3000]  # part 1 stays empty
    for k in range(4):
        for b in t.slice(cuts[k], cuts[k + 1] - cuts[k]).to_batches(max_chunksize=333):
            w.part(k).write(b)
    info = w.close()
    assert storage.list_files("") == ["j.parquet_tmp_1"]
    assert info.entries == 3000 and info.size == storage.size("j.parquet_tmp_1")
    assert read_all(storage, "j.parquet_tmp_1").equals(t)
    with SortedFileReader.open(storage, "j.parquet_tmp_1") as r:
        assert r.entries == 3000 and r.first_key == info.first_key and r.last_key == info.last_key
        rows = t.column("row").to_pylist()
        rng = RowRange(rows[1000], rows[1500])
        assert sum(b.num_rows for b in r.batches(rng)) == sum(rng.contains(x) for x in rows)
    # an independent reader agrees, with checksums verified
    pf = pq.ParquetFile(storage.path("j.parquet_tmp_1"), page_checksum_verification=True)
    assert pf.read().equals(t)


def test_partitioned_writer_parts_written_out_of_order_from_threads(storage: Storage) -> None:
    """Row groups land in the file in the order the parts finish them; the footer lists them
    in key order, which is all a reader goes by."""
    t = make_table(4000, seed=7)
    w = PartitionedFileWriter(storage, "m.parquet_tmp_3", 3, row_group_size=100)
    cuts = [0, 1500, 2600, 4000]
    gates = [threading.Event() for _ in range(3)]

    def run(k: int) -> None:
        batches = t.slice(cuts[k], cuts[k + 1] - cuts[k]).to_batches(max_chunksize=250)
        for i, b in enumerate(batches):
            if i == 1:  # let the later parts go first, then interleave
                gates[k].set()
                if k > 0:
                    gates[k - 1].wait(5)
            w.part(k).write(b)
        gates[k].set()
        w.part(k).close()

    threads = [threading.Thread(target=run, args=(k,)) for k in reversed(range(3))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    info = w.close()
    assert info.entries == 4000 and info.size == storage.size("m.parquet_tmp_3")
    md = pq.ParquetFile(storage.path("m.parquet_tmp_3")).metadata
    offsets = [md.row_group(i).column(0).data_page_offset for i in range(md.num_row_groups)]
    assert offsets != sorted(offsets)  # physically out of key order, as intended
    # As in a file written whole: no column chunk claims metadata outside the footer.
    chunks = [md.row_group(i).column(c) for i in range(md.num_row_groups) for c in range(7)]
    assert {c.file_offset for c in chunks} == {0}
    pf = pq.ParquetFile(storage.path("m.parquet_tmp_3"), page_checksum_verification=True)
    assert pf.read().equals(t)
    with SortedFileReader.open(storage, "m.parquet_tmp_3") as r:
        assert r.first_key == info.first_key and r.last_key == info.last_key
        rows = t.column("row").to_pylist()
        rng = RowRange(rows[1400], rows[2700])
        got = pa.Table.from_batches(list(r.batches(rng)))
        assert got.column("row").to_pylist() == [x for x in rows if rng.contains(x)]


class _LateUpload:
    """An output stream that keeps the buffers it is given and writes them out only when
    closed, as an object store's stream uploads large writes in the background."""

    def __init__(self, path: str) -> None:
        self.path, self.kept, self.pos, self.closed = path, [], 0, False

    def write(self, data: pa.Buffer) -> int:
        self.kept.append(data)
        self.pos += data.size
        return data.size

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        Path(self.path).write_bytes(b"".join(memoryview(b) for b in self.kept))
        self.closed = True


class _ObjectStoreLike(Storage):
    @property
    def write_is_synchronous(self) -> bool:
        return False

    def open_output(self, rel: str) -> pa.NativeFile:
        return pa.PythonFile(_LateUpload(self.path(rel)), mode="w")


def test_partitioned_writer_hands_a_late_reading_stream_copies(tmp_path: Path) -> None:
    """Each part encodes its row groups into one scratch buffer, reused for the next: a stream
    that reads a written buffer after `write` returned must get a copy, or it uploads a later
    row group's bytes in an earlier one's place."""
    storage = _ObjectStoreLike(str(tmp_path / "s"))
    t = make_table(2000, seed=9)
    w = PartitionedFileWriter(storage, "u.parquet_tmp_7", 2, row_group_size=100)
    for k, part in enumerate((t.slice(0, 1000), t.slice(1000))):
        for b in part.to_batches(max_chunksize=100):
            w.part(k).write(b)
    w.close()
    pf = pq.ParquetFile(storage.path("u.parquet_tmp_7"), page_checksum_verification=True)
    assert pf.metadata.num_row_groups == 20
    assert pf.read().equals(t)


def test_partitioned_writer_without_entries(storage: Storage) -> None:
    w = PartitionedFileWriter(storage, "e.parquet_tmp_4", 2)
    info = w.close()
    assert info.entries == 0 and info.first_key is None
    with SortedFileReader.open(storage, "e.parquet_tmp_4") as r:
        assert r.entries == 0 and list(r.batches()) == []


def test_partitioned_writer_abort_removes_everything(storage: Storage) -> None:
    t = make_table(500, seed=6)
    w = PartitionedFileWriter(storage, "k.parquet_tmp_2", 3)
    w.part(1).write(t.to_batches()[0])
    w.abort()
    assert storage.list_files("") == []


def test_partitioned_writer_rejects_overlapping_parts(storage: Storage) -> None:
    t = make_table(500, seed=6)
    w = PartitionedFileWriter(storage, "o.parquet", 2)
    w.part(0).write(t.slice(200).to_batches()[0])
    w.part(1).write(t.slice(0, 200).to_batches()[0])
    with pytest.raises(ValueError, match="overlap"):
        w.close()
    w.abort()
    assert storage.list_files("") == []


# -- corruption ----------------------------------------------------------------------------


def test_missing_file(storage: Storage) -> None:
    with pytest.raises(CorruptFileError, match="tables/t/nope.parquet"):
        SortedFileReader.open(storage, "tables/t/nope.parquet")


def test_truncated_file(storage: Storage) -> None:
    write_entries(storage, "tables/t/T.parquet", make_table(500))
    path = Path(storage.path("tables/t/T.parquet"))
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 3, 5, 0):
        path.write_bytes(data[:cut])
        with (
            pytest.raises(CorruptFileError, match="tables/t/T.parquet"),
            SortedFileReader.open(storage, "tables/t/T.parquet") as r,
        ):
            list(r.batches())


def test_corrupt_page_detected(storage: Storage) -> None:
    write_entries(storage, "tables/t/C.parquet", make_table(2000), compression="none")
    path = Path(storage.path("tables/t/C.parquet"))
    data = bytearray(path.read_bytes())
    md = pq.ParquetFile(path).metadata
    col = md.row_group(0).column(6)  # the value column: plain pages of random bytes
    pos = col.data_page_offset + col.total_compressed_size // 2
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    with (
        pytest.raises(CorruptFileError, match="tables/t/C.parquet"),
        SortedFileReader.open(storage, "tables/t/C.parquet") as r,
    ):
        list(r.batches())


def test_garbage_file(storage: Storage) -> None:
    with storage.open_output("g.parquet") as f:
        f.write(b"not a parquet file at all" * 10)
    with pytest.raises(CorruptFileError, match="g.parquet"):
        SortedFileReader.open(storage, "g.parquet")


def test_footer_entry_count_mismatch(storage: Storage) -> None:
    t = make_table(10)
    meta = {b"lithify.format": b"1", b"lithify.entries": b"11"}
    meta |= {b"lithify.first_key": b"null", b"lithify.last_key": b"null"}
    pq.write_table(t.replace_schema_metadata(meta), storage.path("m.parquet"))
    with pytest.raises(CorruptFileError, match="m.parquet"):
        SortedFileReader.open(storage, "m.parquet")


# -- bulk import validation ----------------------------------------------------------------


def test_bulk_valid(storage: Storage) -> None:
    t = make_table(1000, seed=8)
    pq.write_table(t, storage.path("ok.parquet"), row_group_size=128)  # no lithify footer
    info = validate_import_file(storage, "ok.parquet")
    assert info.entries == 1000
    assert info.first_key == Key(*[t.column(i)[0].as_py() for i in range(6)])
    assert info.last_key == Key(*[t.column(i)[999].as_py() for i in range(6)])


def test_bulk_wrong_type(storage: Storage) -> None:
    t = make_table(10)
    bad = t.set_column(2, "qualifier", t.column("qualifier").cast(pa.string()))
    pq.write_table(bad, storage.path("b.parquet"))
    with pytest.raises(BulkImportError, match=r"b\.parquet.*'qualifier'.*string"):
        validate_import_file(storage, "b.parquet")


def test_bulk_wrong_columns(storage: Storage) -> None:
    t = make_table(10).drop_columns(["visibility"])
    pq.write_table(t, storage.path("c.parquet"))
    with pytest.raises(BulkImportError, match=r"c\.parquet.*columns"):
        validate_import_file(storage, "c.parquet")


def test_bulk_empty(storage: Storage) -> None:
    pq.write_table(ENTRY_SCHEMA.empty_table(), storage.path("e.parquet"))
    with pytest.raises(BulkImportError, match=r"e\.parquet.*no entries"):
        validate_import_file(storage, "e.parquet")


def test_bulk_unsorted_across_batches(storage: Storage) -> None:
    t = make_table(3000, seed=9)
    swapped = pa.concat_tables([t.slice(0, 1000), t.slice(2000), t.slice(1000, 1000)])
    pq.write_table(swapped, storage.path("u.parquet"), row_group_size=500)
    with pytest.raises(BulkImportError, match=r"u\.parquet.*not in key order at entry 2000"):
        validate_import_file(storage, "u.parquet")


def test_bulk_unsorted_timestamp(storage: Storage) -> None:
    rows = [(b"a", b"f", b"q", b"", 5, False, b"x"), (b"a", b"f", b"q", b"", 7, False, b"y")]
    t = pa.table({n: [r[i] for r in rows] for i, n in enumerate(ENTRY_SCHEMA.names)}, ENTRY_SCHEMA)
    pq.write_table(t, storage.path("ts.parquet"))
    with pytest.raises(BulkImportError, match="not in key order at entry 1"):
        validate_import_file(storage, "ts.parquet")


def test_bulk_nulls(storage: Storage) -> None:
    schema = pa.schema([f.with_nullable(True) for f in ENTRY_SCHEMA])
    t = pa.table(
        {
            "row": [b"a", b"b"],
            "family": [b"f", b"f"],
            "qualifier": [b"q", b"q"],
            "visibility": [b"", b""],
            "timestamp": [1, 1],
            "deleted": [False, False],
            "value": [b"x", None],
        },
        schema=schema,
    )
    pq.write_table(t, storage.path("n.parquet"))
    with pytest.raises(BulkImportError, match=r"n\.parquet.*'value'.*null"):
        validate_import_file(storage, "n.parquet")


def test_bulk_missing(storage: Storage) -> None:
    with pytest.raises(BulkImportError, match="gone.parquet"):
        validate_import_file(storage, "gone.parquet")


def test_partitioned_writer_retries_a_row_group_that_did_not_fit(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = make_table(300, seed=8)
    w = PartitionedFileWriter(storage, "r.parquet_tmp_5", 1, row_group_size=100)
    real = PartitionedFileWriter.encode_into
    calls: list[int] = []

    def tight(self: PartitionedFileWriter, out: pa.NativeFile, table: pa.Table) -> None:
        calls.append(table.num_rows)
        if len(calls) == 2:
            raise OSError("Write out of bounds")
        real(self, out, table)

    monkeypatch.setattr(PartitionedFileWriter, "encode_into", tight)
    for b in t.to_batches(max_chunksize=100):
        w.part(0).write(b)
    monkeypatch.setattr(PartitionedFileWriter, "encode_into", real)
    w.close()
    assert calls == [100, 100, 100, 100]  # the second row group was encoded twice
    assert read_all(storage, "r.parquet_tmp_5").equals(t)


def test_partitioned_writer_gives_up_on_a_row_group_that_never_fits(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = PartitionedFileWriter(storage, "g.parquet_tmp_6", 1, row_group_size=100)

    def never(self: PartitionedFileWriter, out: pa.NativeFile, table: pa.Table) -> None:
        raise OSError("Write out of bounds")

    monkeypatch.setattr(PartitionedFileWriter, "encode_into", never)
    with pytest.raises(ValueError, match=r"g.parquet_tmp_6 \(part 0\).*did not fit"):
        w.part(0).write(make_table(100, seed=9).to_batches()[0])
    w.abort()
    assert storage.list_files("") == []
