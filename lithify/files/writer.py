"""Streaming writer of immutable sorted files (Apache Parquet, one row per entry, key order).

The footer's key-value metadata records the first and last key, the entry count and the format
version, so that planners and readers learn a file's extent without reading its data. Page
checksums are written so that a corrupt page is detected instead of returning wrong data.
Statistics are kept only for `row`: readers use them to skip row groups outside a row range, and
statistics on the other columns would cost write time for nothing.

`WriterOptions` and `RowGroupCutter` are shared with `lithify.files.partitioned_writer`, which
lets several threads write consecutive key ranges of one file at once.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lithify.data.key import ENTRY_SCHEMA, Key, key_at
from lithify.files.storage import Storage

FORMAT_VERSION = 1
META_FORMAT = b"lithify.format"
META_FIRST_KEY = b"lithify.first_key"
META_LAST_KEY = b"lithify.last_key"
META_ENTRIES = b"lithify.entries"

#: Default codec, chosen by measurement (see benchmarks/compaction.py and the module docs).
DEFAULT_COMPRESSION = "zstd"
DEFAULT_COMPRESSION_LEVEL: int | None = 1
#: Entries per row group: the unit a row-range read skips or reads; small enough that a seek
#: decodes little, large enough that per-row-group overhead stays negligible.
DEFAULT_ROW_GROUP_SIZE = 65536

_DICTIONARY_COLUMNS = ["family", "qualifier", "visibility"]

#: Pool for the large, short-lived buffers of merging and encoding. Measured: with pyarrow's
#: default (mimalloc) pool a two-part compaction spent a third of its CPU in the kernel,
#: touching fresh pages each round; the system allocator (and jemalloc, equally) reuse freed
#: memory instead. The system allocator is in every pyarrow build.
WORK_MEMORY_POOL: pa.MemoryPool = pa.system_memory_pool()
_MEMORY_POOL = WORK_MEMORY_POOL


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What a finished file holds; first/last key are None for a file without entries."""

    path: str
    size: int
    entries: int
    first_key: Key | None
    last_key: Key | None


def encode_key(key: Key | None) -> bytes:
    """Footer representation of a key (JSON; byte fields in hex so any bytes survive)."""
    if key is None:
        return b"null"
    return json.dumps(
        [
            key.row.hex(),
            key.family.hex(),
            key.qualifier.hex(),
            key.visibility.hex(),
            key.timestamp,
            key.deleted,
        ]
    ).encode()


def decode_key(raw: bytes) -> Key | None:
    v = json.loads(raw)
    if v is None:
        return None
    return Key(
        bytes.fromhex(v[0]),
        bytes.fromhex(v[1]),
        bytes.fromhex(v[2]),
        bytes.fromhex(v[3]),
        int(v[4]),
        bool(v[5]),
    )


def check_schema(schema: pa.Schema) -> str | None:
    """None when `schema` has ENTRY_SCHEMA's columns and types, else what differs."""
    if schema.names != ENTRY_SCHEMA.names:
        return f"columns are {schema.names}, expected {ENTRY_SCHEMA.names}"
    for f, want in zip(schema, ENTRY_SCHEMA, strict=True):
        if f.type != want.type:
            return f"column {f.name!r} has type {f.type}, expected {want.type}"
    return None


def _normalise_codec(compression: str | None) -> str:
    c = "none" if compression is None else compression.lower()
    if c in ("none", "uncompressed"):
        return "none"
    if c not in ("snappy", "gzip", "brotli", "lz4", "zstd"):
        raise ValueError(f"unknown compression {compression!r}")
    return c


@dataclass(frozen=True, slots=True)
class WriterOptions:
    """How entries are encoded: the same for every file lithify writes, but for the codec."""

    compression: str | None = DEFAULT_COMPRESSION  # None: uncompressed
    compression_level: int | None = None
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.row_group_size <= 0:
            raise ValueError(f"row_group_size must be positive, got {self.row_group_size}")
        codec = _normalise_codec(self.compression)
        level = self.compression_level
        if level is None and codec == DEFAULT_COMPRESSION:
            level = DEFAULT_COMPRESSION_LEVEL
        object.__setattr__(self, "compression", codec)
        object.__setattr__(self, "compression_level", level if codec != "none" else None)

    def parquet_writer(self, sink: Any) -> pq.ParquetWriter:
        """A pyarrow writer of ENTRY_SCHEMA to `sink` with these options."""
        return pq.ParquetWriter(
            sink,
            ENTRY_SCHEMA,
            compression=self.compression,
            compression_level=self.compression_level,
            use_dictionary=_DICTIONARY_COLUMNS,
            write_statistics=["row"],
            write_page_checksum=True,
            write_page_index=False,
            memory_pool=_MEMORY_POOL,
        )


class RowGroupCutter:
    """Checks batches (schema, key order) and cuts them into row groups of a fixed size.

    Each full row group is handed to `emit` as a table; `finish()` hands over the rest. What the
    writers of sorted files share: first and last key and the entry count come from here.
    """

    def __init__(self, path: str, row_group_size: int, emit: Callable[[pa.Table], None]) -> None:
        self.path = path
        self.entries = 0
        self.first: Key | None = None
        self.last: Key | None = None
        self._size = row_group_size
        self._emit = emit
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        """Take `batch` (ENTRY_SCHEMA, key order, starting at or after the last key taken)."""
        n = batch.num_rows
        if n == 0:
            return
        if batch.schema != ENTRY_SCHEMA:
            problem = check_schema(batch.schema)
            if problem:
                raise ValueError(f"batch for {self.path}: {problem}")
            batch = pa.RecordBatch.from_arrays(batch.columns, schema=ENTRY_SCHEMA)
        first = key_at(batch, 0)
        if self.last is not None and first.sort_tuple() < self.last.sort_tuple():
            raise ValueError(
                f"batch for {self.path} is out of key order: {first} after {self.last}"
            )
        if self.first is None:
            self.first = first
        self.last = key_at(batch, n - 1)
        self.entries += n
        pos = 0
        while pos < n:
            take = min(n - pos, self._size - self._pending_rows)
            self._pending.append(batch.slice(pos, take) if take < n else batch)
            self._pending_rows += take
            pos += take
            if self._pending_rows >= self._size:
                self.finish()

    def finish(self) -> None:
        """Hand over the entries taken since the last full row group, if any."""
        if self._pending_rows:
            table = pa.Table.from_batches(self._pending, schema=ENTRY_SCHEMA)
            self._pending = []
            self._pending_rows = 0
            self._emit(table)


class SortedFileWriter:
    """Writes batches in key order to one Parquet file; `close()` seals it with the footer."""

    def __init__(
        self,
        storage: Storage,
        rel_path: str,
        *,
        compression: str | None = DEFAULT_COMPRESSION,
        compression_level: int | None = None,
        row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    ) -> None:
        options = WriterOptions(compression, compression_level, row_group_size)
        self.path = rel_path
        self._storage = storage
        self._sink = storage.open_output(rel_path)
        try:
            self._pw = options.parquet_writer(self._sink)
        except BaseException:
            self._sink.close()
            storage.delete(rel_path)
            raise
        self._rows = RowGroupCutter(rel_path, row_group_size, self._write_row_group)
        self._closed = False

    @property
    def entries(self) -> int:
        return self._rows.entries

    @property
    def bytes_written(self) -> int:
        """Bytes handed to the file so far (row groups are written as they fill)."""
        return self._sink.tell()

    @property
    def last_key(self) -> Key | None:
        return self._rows.last

    def write(self, batch: pa.RecordBatch) -> None:
        """Append `batch` (ENTRY_SCHEMA, key order, starting at or after the last key written)."""
        if self._closed:
            raise ValueError(f"writer for {self.path} is closed")
        self._rows.add(batch)

    def _write_row_group(self, table: pa.Table) -> None:
        self._pw.write_table(table, row_group_size=table.num_rows)

    def close(self) -> FileInfo:
        """Write the last row group and the footer; return what the file holds."""
        if self._closed:
            raise ValueError(f"writer for {self.path} is closed")
        rows = self._rows
        rows.finish()
        self._pw.add_key_value_metadata(footer_metadata(rows.first, rows.last, rows.entries))
        self._pw.close()
        self._closed = True
        size = self._sink.tell()
        self._sink.close()
        return FileInfo(self.path, size, rows.entries, rows.first, rows.last)

    def abort(self) -> None:
        """Give up: close quietly and delete what was written."""
        if not self._closed:
            self._closed = True
            # The file is being thrown away: errors while closing it do not matter.
            with contextlib.suppress(Exception):
                self._pw.close()
            with contextlib.suppress(Exception):
                self._sink.close()
        self._storage.delete(self.path)


def footer_metadata(first: Key | None, last: Key | None, entries: int) -> dict[bytes, bytes]:
    return {
        META_FORMAT: str(FORMAT_VERSION).encode(),
        META_FIRST_KEY: encode_key(first),
        META_LAST_KEY: encode_key(last),
        META_ENTRIES: str(entries).encode(),
    }


def write_entries(
    storage: Storage, rel_path: str, batches: Sequence[pa.RecordBatch] | pa.Table, **options: Any
) -> FileInfo:
    """Write sorted entries to a new file in one call (flushes, tests, tools)."""
    if isinstance(batches, pa.Table):
        batches = batches.to_batches()
    w = SortedFileWriter(storage, rel_path, **options)
    try:
        for b in batches:
            w.write(b)
        return w.close()
    except BaseException:
        w.abort()
        raise
