"""Streaming writer of immutable sorted files (Apache Parquet, one row per entry, key order).

The footer's key-value metadata records the first and last key, the entry count and the format
version, so that planners and readers learn a file's extent without reading its data. Page
checksums are written so that a corrupt page is detected instead of returning wrong data.
Statistics are kept only for `row`: readers use them to skip row groups outside a row range, and
statistics on the other columns would cost write time for nothing.

`PartitionedFileWriter` lets several threads encode consecutive key ranges of ONE file in
parallel: each part is a complete Parquet stream; the parts are then joined by copying their
bytes and writing one footer whose row-group offsets are shifted to the joined positions. Parquet
encoding and compression is the most expensive step of a compaction and pyarrow's writer uses a
single thread per file, so this is what lets one compaction use every core.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
from collections.abc import Sequence
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
_COPY_CHUNK = 8 << 20


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
        sink: pa.NativeFile | None = None,
    ) -> None:
        """`sink`: write into this already open stream (left open by `close`), not `rel_path`."""
        if row_group_size <= 0:
            raise ValueError("row_group_size must be positive")
        codec = _normalise_codec(compression)
        if compression_level is None and codec == DEFAULT_COMPRESSION:
            compression_level = DEFAULT_COMPRESSION_LEVEL
        self.path = rel_path
        self._storage = storage
        self._own_sink = sink is None
        self._sink = storage.open_output(rel_path) if sink is None else sink
        self._start = self._sink.tell()
        try:
            self._pw = pq.ParquetWriter(
                self._sink,
                ENTRY_SCHEMA,
                compression=codec,
                compression_level=compression_level if codec != "none" else None,
                use_dictionary=_DICTIONARY_COLUMNS,
                write_statistics=["row"],
                write_page_checksum=True,
                write_page_index=False,
                memory_pool=_MEMORY_POOL,
            )
        except BaseException:
            if self._own_sink:
                self._sink.close()
                storage.delete(rel_path)
            raise
        self._rg_size = row_group_size
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._entries = 0
        self._first: Key | None = None
        self._last: Key | None = None
        self._closed = False
        self.footer: bytes | None = None

    @property
    def entries(self) -> int:
        return self._entries

    @property
    def bytes_written(self) -> int:
        """Bytes handed to the sink so far (row groups are written as they fill)."""
        return self._sink.tell() - self._start

    @property
    def last_key(self) -> Key | None:
        return self._last

    def write(self, batch: pa.RecordBatch) -> None:
        """Append `batch` (ENTRY_SCHEMA, key order, starting at or after the last key written)."""
        if self._closed:
            raise ValueError(f"writer for {self.path} is closed")
        n = batch.num_rows
        if n == 0:
            return
        if batch.schema != ENTRY_SCHEMA:
            problem = check_schema(batch.schema)
            if problem:
                raise ValueError(f"batch for {self.path}: {problem}")
            batch = pa.RecordBatch.from_arrays(batch.columns, schema=ENTRY_SCHEMA)
        first = key_at(batch, 0)
        if self._last is not None and first.sort_tuple() < self._last.sort_tuple():
            raise ValueError(
                f"batch for {self.path} is out of key order: {first} after {self._last}"
            )
        if self._first is None:
            self._first = first
        self._last = key_at(batch, n - 1)
        self._entries += n
        pos = 0
        while pos < n:
            take = min(n - pos, self._rg_size - self._pending_rows)
            self._pending.append(batch.slice(pos, take) if take < n else batch)
            self._pending_rows += take
            pos += take
            if self._pending_rows >= self._rg_size:
                self._flush()

    def _flush(self) -> None:
        if self._pending_rows:
            table = pa.Table.from_batches(self._pending, schema=ENTRY_SCHEMA)
            self._pw.write_table(table, row_group_size=self._pending_rows)
        self._pending = []
        self._pending_rows = 0

    def close(self) -> FileInfo:
        """Write the last row group and the footer; return what the file holds."""
        if self._closed:
            raise ValueError(f"writer for {self.path} is closed")
        self._flush()
        self._pw.add_key_value_metadata(footer_metadata(self._first, self._last, self._entries))
        self._pw.close()
        self._closed = True
        size = self._sink.tell() - self._start
        if self._own_sink:
            self._sink.close()
        else:
            buf = pa.BufferOutputStream()
            self._pw.writer.metadata.write_metadata_file(buf)
            self.footer = buf.getvalue().to_pybytes()[4:-8]
        return FileInfo(self.path, size, self._entries, self._first, self._last)

    def abort(self) -> None:
        """Give up: close quietly and delete what was written (only a file this writer owns)."""
        if not self._closed:
            self._closed = True
            # The file is being thrown away: errors while closing it do not matter.
            with contextlib.suppress(Exception):
                self._pw.close()
            if self._own_sink:
                with contextlib.suppress(Exception):
                    self._sink.close()
        if self._own_sink:
            self._storage.delete(self.path)


def footer_metadata(first: Key | None, last: Key | None, entries: int) -> dict[bytes, bytes]:
    return {
        META_FORMAT: str(FORMAT_VERSION).encode(),
        META_FIRST_KEY: encode_key(first),
        META_LAST_KEY: encode_key(last),
        META_ENTRIES: str(entries).encode(),
    }


class PartitionedFileWriter:
    """One output file written as `parts` consecutive key ranges, each by its own writer.

    Part 0 writes straight into the output; parts 1.. write to `<path>_part<k>` and are appended
    on `close()`. Part k's keys must all come after part k-1's (checked on close). Each part's
    writer may be used from its own thread.
    """

    def __init__(self, storage: Storage, rel_path: str, parts: int, **writer_options: Any) -> None:
        if parts < 1:
            raise ValueError("parts must be >= 1")
        self.path = rel_path
        self._storage = storage
        self._stream = storage.open_output(rel_path)
        self._writers: list[SortedFileWriter] = []
        try:
            self._writers.append(
                SortedFileWriter(storage, rel_path, sink=self._stream, **writer_options)
            )
            for k in range(1, parts):
                self._writers.append(
                    SortedFileWriter(storage, f"{rel_path}_part{k}", **writer_options)
                )
        except BaseException:
            self.abort()
            raise
        self._done = False

    @property
    def parts(self) -> list[SortedFileWriter]:
        return list(self._writers)

    def part(self, k: int) -> SortedFileWriter:
        return self._writers[k]

    @property
    def bytes_written(self) -> int:
        return sum(w.bytes_written for w in self._writers)

    def close(self) -> FileInfo:
        """Join the parts (closing any still open) and seal the file with a merged footer."""
        infos = [w.close() if not w._closed else None for w in self._writers]
        if any(i is None for i in infos):
            raise ValueError(f"a part of {self.path} was closed outside close()")
        last: Key | None = None
        first: Key | None = None
        for info in infos:
            assert info is not None
            if info.entries == 0:
                continue
            assert info.first_key is not None
            if last is not None and info.first_key.sort_tuple() < last.sort_tuple():
                raise ValueError(f"parts of {self.path} overlap: {info.first_key} after {last}")
            first = first or info.first_key
            last = info.last_key
        entries = sum(i.entries for i in infos if i is not None)
        head = self._writers[0].footer
        assert head is not None
        footers = [(_thrift_decode_struct(head), 0)]
        if len(self._writers) > 1:
            self._stream = self._reopen_for_join()
        for w in self._writers[1:]:
            offset = self._stream.tell()
            footers.append((_thrift_decode_struct(self._append_part(w.path)), offset))
        merged = _merge_footers(footers, footer_metadata(first, last, entries))
        blob = _thrift_encode_struct(merged)
        self._stream.write(blob)
        self._stream.write(struct.pack("<I", len(blob)) + b"PAR1")
        size = self._stream.tell()
        self._stream.close()
        self._done = True
        for w in self._writers[1:]:
            self._storage.delete(w.path)
        return FileInfo(self.path, size, entries, first, last)

    def _reopen_for_join(self) -> Any:
        """The stream the parts and the footer are appended to.

        On the local filesystem the output is closed and opened again by the operating system,
        so that parts are copied inside the kernel (`os.copy_file_range`, a reflink where the
        filesystem has them) instead of through Python; the join runs after every part is done,
        so its copy is all wall time. Elsewhere the output stream stays.
        """
        local = self._storage.local_path(self.path)
        if local is None or not hasattr(os, "copy_file_range"):
            return self._stream
        self._stream.close()
        out = open(local, "r+b")  # noqa: SIM115 - closed by close() or abort()
        out.seek(0, os.SEEK_END)  # not "ab": copy_file_range refuses O_APPEND targets
        return out

    def _append_part(self, rel: str) -> bytes:
        """Copy a part's bytes (all but its footer) to the output; return its footer."""
        with self._storage.open_input(rel) as f:
            size = f.size()
            f.seek(size - 8)
            tail = f.read(8)
            if len(tail) != 8 or tail[4:] != b"PAR1":
                raise ValueError(f"part {rel} is not a Parquet file")
            (flen,) = struct.unpack("<I", tail[:4])
            data_end = size - 8 - flen
            f.seek(data_end)
            footer = f.read(flen)
            src = self._storage.local_path(rel)
            if isinstance(self._stream, io.BufferedWriter) and src is not None:
                self._stream.flush()
                with open(src, "rb") as part:
                    _copy_in_kernel(part.fileno(), self._stream.fileno(), data_end, rel)
                return footer
            f.seek(0)
            left = data_end
            while left > 0:
                chunk = f.read(min(_COPY_CHUNK, left))
                if not chunk:
                    raise ValueError(f"part {rel} ended early")
                self._stream.write(chunk)
                left -= len(chunk)
        return footer

    def abort(self) -> None:
        for w in self._writers:
            w.abort()
        if not self._done:
            self._done = True
            with contextlib.suppress(Exception):
                self._stream.close()
            self._storage.delete(self.path)


def _copy_in_kernel(src: int, dst: int, count: int, name: str) -> None:
    """Copy the first `count` bytes of file `src` to file `dst` at its position."""
    offset = 0
    while offset < count:
        n = os.copy_file_range(src, dst, count - offset, offset_src=offset)
        if n == 0:
            raise ValueError(f"part {name} ended early")
        offset += n


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


# --- Parquet footer surgery (Thrift compact protocol) ---------------------------------------
# A footer is decoded into a generic tree (a struct is a list of [field id, type, value]) so that
# fields this code does not know survive unchanged; only absolute file offsets are shifted.

_T_TRUE, _T_FALSE, _T_BYTE, _T_I16, _T_I32, _T_I64 = 1, 2, 3, 4, 5, 6
_T_DOUBLE, _T_BINARY, _T_LIST, _T_SET, _T_MAP, _T_STRUCT = 7, 8, 9, 10, 11, 12

# FileMetaData 3 num_rows, 4 row_groups, 5 key_value_metadata; RowGroup 1 columns, 5 file_offset,
# 7 ordinal; ColumnChunk 2 file_offset, 3 meta_data, 4 offset_index_offset, 6 column_index_offset;
# ColumnMetaData 9 data_page_offset, 10 index_page_offset, 11 dictionary_page_offset,
# 14 bloom_filter_offset.
_CHUNK_OFFSETS = (2, 4, 6)
_META_OFFSETS = (9, 10, 11, 14)


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def byte(self) -> int:
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = result = 0
        for _ in range(10):
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
        raise ValueError("bad varint in Parquet footer")

    def zigzag(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def value(self, t: int) -> Any:
        if t in (_T_TRUE, _T_FALSE):
            return self.byte() == 1
        if t == _T_BYTE:
            return self.byte()
        if t in (_T_I16, _T_I32, _T_I64):
            return self.zigzag()
        if t == _T_DOUBLE:
            v = self.buf[self.pos : self.pos + 8]
            self.pos += 8
            return v
        if t == _T_BINARY:
            n = self.varint()
            v = self.buf[self.pos : self.pos + n]
            self.pos += n
            return v
        if t in (_T_LIST, _T_SET):
            h = self.byte()
            n, et = h >> 4, h & 0x0F
            if n == 15:
                n = self.varint()
            return [et, [self.value(et) for _ in range(n)]]
        if t == _T_MAP:
            n = self.varint()
            kv = self.byte() if n else 0
            kt, vt = kv >> 4, kv & 0x0F
            return [kt, vt, [(self.value(kt), self.value(vt)) for _ in range(n)]]
        if t == _T_STRUCT:
            return self.struct()
        raise ValueError(f"unknown Thrift type {t} in Parquet footer")

    def struct(self) -> list[list[Any]]:
        fields: list[list[Any]] = []
        last = 0
        while True:
            h = self.byte()
            if h == 0:
                return fields
            t, delta = h & 0x0F, h >> 4
            fid = last + delta if delta else self.zigzag()
            if t in (_T_TRUE, _T_FALSE):
                fields.append([fid, _T_TRUE, t == _T_TRUE])
            else:
                fields.append([fid, t, self.value(t)])
            last = fid


def _thrift_decode_struct(buf: bytes) -> list[list[Any]]:
    return _Reader(buf).struct()


def _w_varint(out: bytearray, v: int) -> None:
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _w_zigzag(out: bytearray, v: int) -> None:
    _w_varint(out, (v << 1) ^ (v >> 63))


def _w_value(out: bytearray, t: int, v: Any) -> None:
    if t in (_T_TRUE, _T_FALSE):
        out.append(1 if v else 2)
    elif t == _T_BYTE:
        out.append(v & 0xFF)
    elif t in (_T_I16, _T_I32, _T_I64):
        _w_zigzag(out, v)
    elif t == _T_DOUBLE:
        out += v
    elif t == _T_BINARY:
        _w_varint(out, len(v))
        out += v
    elif t in (_T_LIST, _T_SET):
        et, items = v
        if len(items) < 15:
            out.append((len(items) << 4) | et)
        else:
            out.append(0xF0 | et)
            _w_varint(out, len(items))
        for item in items:
            _w_value(out, et, item)
    elif t == _T_MAP:
        kt, vt, items = v
        _w_varint(out, len(items))
        if items:
            out.append((kt << 4) | vt)
        for k, val in items:
            _w_value(out, kt, k)
            _w_value(out, vt, val)
    elif t == _T_STRUCT:
        _w_struct(out, v)
    else:
        raise ValueError(f"unknown Thrift type {t}")


def _w_struct(out: bytearray, fields: list[list[Any]]) -> None:
    last = 0
    for fid, t, v in fields:
        wire_t = (_T_TRUE if v else _T_FALSE) if t == _T_TRUE else t
        if 0 < fid - last <= 15:
            out.append(((fid - last) << 4) | wire_t)
        else:
            out.append(wire_t)
            _w_zigzag(out, fid)
        if t != _T_TRUE:
            _w_value(out, t, v)
        last = fid
    out.append(0)


def _thrift_encode_struct(fields: list[list[Any]]) -> bytes:
    out = bytearray()
    _w_struct(out, fields)
    return bytes(out)


def _field(fields: list[list[Any]], fid: int) -> list[Any] | None:
    for f in fields:
        if f[0] == fid:
            return f
    return None


def _shift_row_group(rg: list[list[Any]], delta: int, ordinal: int) -> None:
    for f in rg:
        if f[0] == 5:
            f[2] += delta
        elif f[0] == 7:
            f[2] = ordinal
        elif f[0] == 1:
            for chunk in f[2][1]:
                for cf in chunk:
                    if cf[0] in _CHUNK_OFFSETS and cf[1] == _T_I64:
                        cf[2] += delta
                    elif cf[0] == 3:
                        for mf in cf[2]:
                            if mf[0] in _META_OFFSETS and mf[1] == _T_I64:
                                mf[2] += delta


def _merge_footers(
    footers: list[tuple[list[list[Any]], int]], kv: dict[bytes, bytes]
) -> list[list[Any]]:
    """Part 0's footer with every part's row groups (offsets shifted) and new key-value data."""
    row_groups: list[Any] = []
    rows = 0
    for fields, delta in footers:
        nrows = _field(fields, 3)
        rows += nrows[2] if nrows else 0
        rgs = _field(fields, 4)
        for rg in rgs[2][1] if rgs else []:
            _shift_row_group(rg, delta, len(row_groups))
            row_groups.append(rg)
    kv_list = [_T_STRUCT, [[[1, _T_BINARY, k], [2, _T_BINARY, v]] for k, v in kv.items()]]
    base = footers[0][0]
    kept = [f for f in base if f[0] not in (3, 4, 5)]
    # Keep Arrow's stored schema (it lives in the key-value metadata) so types round-trip.
    old_kv = _field(base, 5)
    if old_kv:
        for item in old_kv[2][1]:
            key = _field(item, 1)
            if key and key[2] == b"ARROW:schema":
                kv_list[1].append(item)
    merged = kept + [
        [3, _T_I64, rows],
        [4, _T_LIST, [_T_STRUCT, row_groups]],
        [5, _T_LIST, kv_list],
    ]
    merged.sort(key=lambda f: f[0])
    return merged
