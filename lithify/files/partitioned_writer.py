"""One sorted file written by several threads at once, each a consecutive key range of it.

Encoding and compressing is the most expensive step of a compaction, and pyarrow's writer uses
one thread per file; key-range subcompactions therefore each write a *part* of the output file.
Each part encodes whole row groups on its own (in its caller's thread) as small self-contained
Parquet images, and appends each row group's bytes, as soon as they are encoded, at the current
end of the one shared file. On `close()` a single footer lists every row group in key order
(part 0's, then part 1's, ...) at wherever it landed: Parquet readers find row groups through the
footer's offsets, so their physical order does not matter, and nothing is copied afterwards.

(The parts used to be written as files of their own and copied together at the end: a serial
tail of (parts - 1) / parts of the output, about 0.45 s of a 4.3 s two-part compaction of 10M
entries, and the larger the more cores a compaction uses.)

The price: a scan in key order moves between the parts' regions of the file, one row group
(about 4 MB in the benchmark) at a time, so a cold sequential read on a spinning disk seeks
once per row group and its read-ahead fetches some bytes of the other parts.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import pyarrow as pa

from lithify.data.key import ENTRY_SCHEMA, Key
from lithify.files import footer
from lithify.files.storage import Storage
from lithify.files.writer import (
    DEFAULT_COMPRESSION,
    DEFAULT_ROW_GROUP_SIZE,
    WORK_MEMORY_POOL,
    FileInfo,
    RowGroupCutter,
    WriterOptions,
    footer_metadata,
)

#: Room beyond a row group's decoded size for page headers, dictionaries and the image's footer.
_SLACK = 1 << 20
#: Buffer sizes tried (each double the last) before a row group is declared unencodable.
_ENCODE_ATTEMPTS = 3


class PartWriter:
    """The writer of one part (a key range) of a `PartitionedFileWriter`; one thread at a time.

    Keys must be in order within the part; `close()` (from the part's own thread, so that the
    last row group is encoded in parallel with the other parts) writes its last row group.
    """

    def __init__(self, file: PartitionedFileWriter, k: int) -> None:
        self._file = file
        self.path = f"{file.path} (part {k})"
        self._rows = RowGroupCutter(self.path, file.options.row_group_size, self._write_row_group)
        self.row_groups: list[list[list[Any]]] = []
        self.bytes_written = 0
        self.closed = False
        self._scratch: pa.Buffer | None = None

    @property
    def entries(self) -> int:
        return self._rows.entries

    @property
    def first_key(self) -> Key | None:
        return self._rows.first

    @property
    def last_key(self) -> Key | None:
        return self._rows.last

    def write(self, batch: pa.RecordBatch) -> None:
        """Append `batch` (ENTRY_SCHEMA, key order, at or after this part's last key)."""
        if self.closed:
            raise ValueError(f"writer for {self.path} is closed")
        self._rows.add(batch)

    def _write_row_group(self, table: pa.Table) -> None:
        image = self._encode(table)
        try:
            start, foot = footer.split_file(memoryview(image))
            groups = footer.row_groups(foot)
        except (ValueError, IndexError) as e:
            raise ValueError(f"row group image of {self.path}: {e}") from e
        at = self._file.append(image.slice(4, start - 4))
        for rg in groups:
            footer.move_row_group(rg, at - 4)
            self.row_groups.append(rg)
        self.bytes_written += start - 4

    def _encode(self, table: pa.Table) -> pa.Buffer:
        """`table` as a Parquet image in this part's scratch buffer (valid until the next call).

        The buffer is kept from row group to row group, so that its pages are faulted in once
        rather than once per row group. It starts a little larger than the decoded entries,
        which an encoded row group does not exceed (encodings and codecs shrink this data or
        add a few bytes per page); should one not fit, the buffer doubles.
        """
        need = int(table.nbytes * 1.05) + _SLACK
        for _ in range(_ENCODE_ATTEMPTS):
            if self._scratch is None or self._scratch.size < need:
                self._scratch = pa.allocate_buffer(need, memory_pool=WORK_MEMORY_POOL)
            out = pa.FixedSizeBufferWriter(self._scratch)
            try:
                self._file.encode_into(out, table)
            except OSError:  # written past the end of the buffer
                need *= 2
                continue
            return self._scratch.slice(0, out.tell())
        raise ValueError(
            f"a row group of {self.path} ({table.num_rows} entries, {table.nbytes} bytes "
            f"decoded) did not fit {need // 2} bytes encoded"
        )

    def close(self) -> None:
        """Write the last row group; the part takes no more entries."""
        if not self.closed:
            self._rows.finish()
            self.closed = True


class PartitionedFileWriter:
    """ONE output file whose `parts` consecutive key ranges are written by their own writers.

    `part(k)` may be used from its own thread; part k's keys must all come after part k-1's
    (checked on close).
    """

    def __init__(
        self,
        storage: Storage,
        rel_path: str,
        parts: int,
        *,
        compression: str | None = DEFAULT_COMPRESSION,
        compression_level: int | None = None,
        row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    ) -> None:
        if parts < 1:
            raise ValueError(f"parts must be >= 1, got {parts}")
        self.path = rel_path
        self.options = WriterOptions(compression, compression_level, row_group_size)
        self._storage = storage
        # Row group images live in their part's scratch buffer, rewritten for the next one.
        self._copy_appends = not storage.write_is_synchronous
        self._lock = threading.Lock()
        self._stream = storage.open_output(rel_path)
        self._done = False
        try:
            self._stream.write(footer.MAGIC)
        except BaseException:
            self.abort()
            raise
        self._parts = [PartWriter(self, k) for k in range(parts)]

    @property
    def parts(self) -> list[PartWriter]:
        return list(self._parts)

    def part(self, k: int) -> PartWriter:
        return self._parts[k]

    @property
    def bytes_written(self) -> int:
        return sum(p.bytes_written for p in self._parts)

    def encode_into(self, out: pa.NativeFile, table: pa.Table) -> None:
        """Write `table` to `out` as a complete Parquet image (one row group, these options)."""
        pw = self.options.parquet_writer(out)
        if table.num_rows:
            pw.write_table(table, row_group_size=table.num_rows)
        pw.close()

    def append(self, data: pa.Buffer) -> int:
        """Write `data` at the end of the file; return the offset it starts at.

        `data` may be reused once this returns: where the stream might still read it later, it
        gets a copy.
        """
        if self._copy_appends:
            data = pa.py_buffer(data.to_pybytes())
        with self._lock:
            if self._done:
                raise ValueError(f"writer for {self.path} is closed")
            at = self._stream.tell()
            self._stream.write(data)
            return at

    def close(self) -> FileInfo:
        """Close every part still open and seal the file with one footer in key order."""
        first: Key | None = None
        last: Key | None = None
        for p in self._parts:
            p.close()
            if p.entries == 0:
                continue
            assert p.first_key is not None
            if last is not None and p.first_key.sort_tuple() < last.sort_tuple():
                raise ValueError(f"parts of {self.path} overlap: {p.first_key} after {last}")
            first = first or p.first_key
            last = p.last_key
        entries = sum(p.entries for p in self._parts)
        empty = pa.BufferOutputStream()
        self.encode_into(empty, ENTRY_SCHEMA.empty_table())
        _, base = footer.split_file(memoryview(empty.getvalue()))
        groups = [rg for p in self._parts for rg in p.row_groups]
        with self._lock:
            self._stream.write(
                footer.file_tail(base, groups, footer_metadata(first, last, entries))
            )
            size = self._stream.tell()
            self._stream.close()
            self._done = True
        return FileInfo(self.path, size, entries, first, last)

    def abort(self) -> None:
        """Give up: close quietly and delete the file."""
        with self._lock:
            if not self._done:
                self._done = True
                with contextlib.suppress(Exception):
                    self._stream.close()
        self._storage.delete(self.path)
