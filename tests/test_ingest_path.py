"""The batch write path's cheaper steps: vectorised validation with built-in defaults, and the
codec of flush files (`table.minc.compress.type`)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lithify
from lithify.data.mutation import INPUT_SCHEMA, validate_entries
from lithify.errors import ConfigError, InvalidMutationError
from lithify.table.properties import table_properties, validate_table_property


def _t(**cols: list) -> pa.Table:
    """A client table: the given columns plus family and qualifier (which have no default)."""
    n = len(next(iter(cols.values())))
    return pa.table({"family": [b"f"] * n, "qualifier": [b"q"] * n, **cols})


def test_absent_columns_get_their_defaults() -> None:
    out = validate_entries(_t(row=[b"a", b"b", b"c"]))
    assert out.schema.equals(INPUT_SCHEMA)
    assert out.column("visibility").to_pylist() == [b""] * 3
    assert out.column("value").to_pylist() == [b""] * 3
    assert out.column("deleted").to_pylist() == [False] * 3
    assert out.column("timestamp").null_count == 3
    out.validate(full=True)
    assert validate_entries(_t(row=pa.array([], pa.binary()))).num_rows == 0


def test_present_columns_are_kept_or_cast_in_any_order() -> None:
    batch = pa.record_batch(
        {
            "value": ["v1", "v2"],  # strings are cast to bytes
            "row": [b"r1", b"r2"],
            "timestamp": [5, None],
            "deleted": [False, True],
            "qualifier": [b"q", b"q"],
            "family": ["f", "f"],
        }
    )
    out = validate_entries(batch)
    assert out.column_names == INPUT_SCHEMA.names
    assert out.column("value").to_pylist() == [b"v1", b"v2"]
    assert out.column("timestamp").to_pylist() == [5, None]
    assert out.column("deleted").to_pylist() == [False, True]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (_t(row=[b"a"], colour=[b"red"]), "unknown entry column"),
        (_t(value=[b"a"]), "'row' is missing"),
        (pa.table({"row": [b"a"], "qualifier": [b"q"]}), "'family' is missing"),
        (_t(row=[b"a", None]), "'row' has 1 null"),
        (_t(row=[b"a", b""]), "empty row"),
        (_t(row=[b"a"], timestamp=[-1]), "negative timestamp"),
        (_t(row=[b"a"], timestamp=[[1]]), "'timestamp' has type"),
    ],
)
def test_bad_entries_name_the_column(table: pa.Table, message: str) -> None:
    with pytest.raises(InvalidMutationError, match=message):
        validate_entries(table)


def test_flush_codec_property_is_validated_and_defaults_to_none() -> None:
    assert table_properties({})["table.minc.compress.type"] == "none"
    assert validate_table_property("table.minc.compress.type", " LZ4 ") == "lz4"
    with pytest.raises(ConfigError, match="table.minc.compress.type.*zstd, snappy, lz4"):
        validate_table_property("table.minc.compress.type", "rar")


@pytest.mark.parametrize("codec", [None, "lz4", "zstd"])
def test_flush_files_use_the_flush_codec(
    tmp_path: Path, metadata_url: str, codec: str | None
) -> None:
    props = {"table.file.compress.type": "gzip"}
    if codec is not None:
        props["table.minc.compress.type"] = codec
    with lithify.open(tmp_path / "s", metadata_url=metadata_url) as s:
        s.create_table("t", properties=props)
        s.write("t", _t(row=[b"r%03d" % i for i in range(100)], value=[b"v"] * 100))
        s.flush("t")
        (ref,) = s.tablets("t")[0].files
        meta = pq.ParquetFile(s.storage.root + "/" + ref.path).metadata
        want = "UNCOMPRESSED" if codec is None else codec.upper()
        assert {meta.row_group(0).column(i).compression for i in range(7)} == {want}
        s.compact("t")  # a compaction writes the table's codec
        (ref,) = s.tablets("t")[0].files
        meta = pq.ParquetFile(s.storage.root + "/" + ref.path).metadata
        assert meta.row_group(0).column(0).compression == "GZIP"
