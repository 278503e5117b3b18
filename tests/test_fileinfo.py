"""`lithify fileinfo`: footer facts of real files, and --verify failing on bad ones."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from lithify.cli.fileinfo import fileinfo
from lithify.files.partitioned_writer import PartitionedFileWriter
from lithify.files.storage import Storage
from lithify.files.writer import META_FIRST_KEY, META_LAST_KEY, write_entries
from tests.test_files import make_table


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(fileinfo, list(args))
    return res.exit_code, res.output


def test_facts_of_a_file_and_of_one_written_in_parallel_parts(tmp_path) -> None:
    storage = Storage(str(tmp_path))
    t = make_table(3000, seed=11)
    write_entries(storage, "F1.parquet", t, row_group_size=1000)
    w = PartitionedFileWriter(storage, "A2.parquet", 2, row_group_size=500)
    for b in t.slice(1500).to_batches(max_chunksize=500):  # the later part lands first on disk
        w.part(1).write(b)
    for b in t.slice(0, 1500).to_batches(max_chunksize=500):
        w.part(0).write(b)
    w.close()

    code, out = _run(str(tmp_path / "F1.parquet"), str(tmp_path / "A2.parquet"), "--verify")
    assert code == 0, out
    first = t.column("row")[0].as_py().decode()
    assert f"first key   {first} " in out
    assert "entries     3,000" in out and "3,000 entries read: OK" in out
    assert "row groups  3 (entries min 1,000, median 1,000, max 1,000); on disk in key order" in out
    assert "row groups  6 (entries min 500" in out and "interleaved (parallel parts)" in out
    assert "codec       zstd" in out


def test_verify_fails_on_keys_out_of_order_and_names_the_file(tmp_path) -> None:
    t = make_table(2000, seed=12)
    swapped = pa.concat_tables([t.slice(1000), t.slice(0, 1000)])
    pq.write_table(swapped, tmp_path / "u.parquet", row_group_size=500)
    code, out = _run(str(tmp_path / "u.parquet"))
    assert code == 0, out  # the footer alone looks fine
    code, out = _run(str(tmp_path / "u.parquet"), "--verify")
    assert code == 1
    assert "u.parquet: entries are not in key order at entry 1000" in out


def test_verify_fails_on_footer_keys_the_entries_contradict(tmp_path) -> None:
    storage = Storage(str(tmp_path))
    t = make_table(500, seed=14)
    write_entries(storage, "k.parquet", t)
    pf = pq.ParquetFile(tmp_path / "k.parquet")
    kv = dict(pf.metadata.metadata)
    kv[META_LAST_KEY] = kv[META_FIRST_KEY]  # claims a narrower range than it holds
    pq.write_table(pf.read().replace_schema_metadata(kv), tmp_path / "k2.parquet")
    code, out = _run(str(tmp_path / "k2.parquet"))
    assert code == 0, out
    code, out = _run(str(tmp_path / "k2.parquet"), "--verify")
    assert code == 1
    assert "k2.parquet: footer says the last key is " in out and ", read " in out


def test_paths_that_are_not_files_are_refused_without_creating_anything(tmp_path) -> None:
    code, out = _run(str(tmp_path / "no" / "such.parquet"))
    assert code == 2 and "does not exist" in out
    assert not (tmp_path / "no").exists()
    code, out = _run(str(tmp_path))
    assert code == 2 and "is a directory" in out


def test_a_truncated_file_is_an_error_naming_it_and_the_others_still_shown(tmp_path) -> None:
    storage = Storage(str(tmp_path))
    write_entries(storage, "good.parquet", make_table(100, seed=13))
    data = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    code, out = _run(str(tmp_path / "cut.parquet"), str(tmp_path / "good.parquet"))
    assert code == 1
    assert "cut.parquet" in out and "error:" in out
    assert "entries     100" in out
