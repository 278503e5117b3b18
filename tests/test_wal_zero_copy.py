"""The log's entries go to `writev` as Arrow's own buffers (no contiguous copy): the bytes on
disk must be the same Arrow IPC stream, checksummed the same way, whatever the table's layout
(slices at any offset, several chunks, null-free bitmaps at odd bit offsets)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from lithify.data.key import ENTRY_SCHEMA
from lithify.tablet import wal as wal_mod
from lithify.tablet.wal import WriteAheadLog
from lithify.tablet.wal_reader import read_log
from tests.test_wal import entries


def _contiguous(table: pa.Table) -> bytes:
    """The IPC stream as one buffer, as the log wrote it before."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, ENTRY_SCHEMA) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


LAYOUTS = {
    "whole": lambda t: t,
    "slice at an odd offset": lambda t: t.slice(3, 41),
    "empty slice": lambda t: t.slice(5, 0),
    "two chunks": lambda t: pa.concat_tables([t.slice(0, 17), t.slice(17)]),
    "sliced chunks": lambda t: pa.concat_tables([t.slice(1, 9), t.slice(30, 13)]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parts_are_the_ipc_stream_and_the_record_reads_back(tmp_path: Path, layout: str) -> None:
    table = LAYOUTS[layout](entries("z", 64))
    parts, size = wal_mod._encode_entries(table)
    joined = b"".join(bytes(memoryview(p)) for p in parts)
    assert len(joined) == size
    assert joined == _contiguous(table)
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    assert crc == zlib.crc32(joined)

    path = tmp_path / "z.wal"
    with WriteAheadLog.create(path, 3) as wal:
        wal.append("t;~", table)
    (record,) = read_log(path)
    assert record.table.equals(table.cast(ENTRY_SCHEMA).combine_chunks())


def test_a_group_write_of_more_than_iov_max_parts(tmp_path: Path) -> None:
    """One group commit of many records' parts needs several writev calls (IOV_MAX buffers
    each); the bytes land in order."""
    parts = [pa.py_buffer(bytes([i % 251]) * (1 + i % 7)) for i in range(3000)]
    path = tmp_path / "parts.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        calls = wal_mod._write_all(fd, parts)
    finally:
        os.close(fd)
    assert calls >= 3
    assert path.read_bytes() == b"".join(p.to_pybytes() for p in parts)


def test_a_buffered_none_append_does_not_depend_on_the_callers_memory(tmp_path: Path) -> None:
    """A `none` append returns before its record is written: it must have copied the entries,
    or a caller reusing its memory would change the bytes after they were checksummed."""
    n = 4
    data = bytearray(b"AAAA" * n)
    value = pa.Array.from_buffers(
        pa.binary(),
        n,
        [None, pa.py_buffer(np.arange(0, 4 * n + 1, 4, dtype=np.int32)), pa.py_buffer(data)],
    )
    table = entries("n", n).set_column(6, "value", value)
    path = tmp_path / "none.wal"
    with WriteAheadLog.create(path, 5, "none", buffer_bytes=1 << 30) as wal:
        wal.append("t;~", table)
        data[:] = b"BBBB" * n  # the caller reuses its buffer before the log is written
        wal.flush()
    (record,) = read_log(path)
    assert record.table.column("value").to_pylist() == [b"AAAA"] * n
