"""Reader of sorted files: footer facts, and streaming batches over a row range.

Every failure to read a file (missing, truncated, bad footer, page checksum mismatch, decoding
error) becomes `CorruptFileError` naming the file, so that an operator knows which file to look
at and no caller mistakes damaged data for an empty range.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq

from lithify.data.key import ENTRY_SCHEMA, Key
from lithify.data.ranges import FULL_RANGE, RowRange
from lithify.errors import CorruptFileError
from lithify.files.storage import Storage
from lithify.files.writer import (
    META_ENTRIES,
    META_FIRST_KEY,
    META_FORMAT,
    META_LAST_KEY,
    check_schema,
    decode_key,
)

_READ_ERRORS = (OSError, pa.ArrowException, ValueError, EOFError)


class SortedFileReader:
    """An open sorted file. Use `open()`; close it (or use `with`) when done."""

    def __init__(self, path: str, source: pa.NativeFile, pf: pq.ParquetFile, size: int) -> None:
        self.path = path
        self.size = size
        self._source = source
        self._pf = pf
        md = pf.metadata
        self.entries: int = md.num_rows
        self.num_row_groups: int = md.num_row_groups
        kv = md.metadata or {}
        self.format_version: int | None = None
        self.first_key: Key | None = None
        self.last_key: Key | None = None
        try:
            if META_FORMAT in kv:
                self.format_version = int(kv[META_FORMAT])
                self.first_key = decode_key(kv[META_FIRST_KEY])
                self.last_key = decode_key(kv[META_LAST_KEY])
                if int(kv[META_ENTRIES]) != self.entries:
                    raise ValueError(
                        f"footer says {int(kv[META_ENTRIES])} entries, file holds {self.entries}"
                    )
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise CorruptFileError(f"corrupt file {path}: bad footer metadata: {e}") from None
        self._stats: list[tuple[bytes | None, bytes | None, int]] | None = None

    @classmethod
    def open(cls, storage: Storage, rel_path: str) -> SortedFileReader:
        try:
            source = storage.open_input(rel_path)
        except FileNotFoundError:
            raise CorruptFileError(f"missing file {rel_path}") from None
        except _READ_ERRORS as e:
            raise CorruptFileError(f"cannot open file {rel_path}: {e}") from None
        try:
            size = source.size()
            pf = pq.ParquetFile(source, pre_buffer=False, page_checksum_verification=True)
            return cls(rel_path, source, pf, size)
        except CorruptFileError:
            source.close()
            raise
        except _READ_ERRORS as e:
            source.close()
            raise CorruptFileError(f"corrupt file {rel_path}: {e}") from None

    @property
    def schema(self) -> pa.Schema:
        return self._pf.schema_arrow

    @property
    def metadata(self) -> pq.FileMetaData:
        """The Parquet footer as pyarrow reads it (row groups, column chunks, codecs)."""
        return self._pf.metadata

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> SortedFileReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def row_group_stats(self) -> list[tuple[bytes | None, bytes | None, int]]:
        """(min row, max row, entries) per row group; None bounds where statistics are absent."""
        if self._stats is None:
            stats = []
            md = self.metadata
            try:
                for i in range(md.num_row_groups):
                    rg = md.row_group(i)
                    st = rg.column(0).statistics
                    if st is not None and st.has_min_max:
                        stats.append((_as_bytes(st.min), _as_bytes(st.max), rg.num_rows))
                    else:
                        stats.append((None, None, rg.num_rows))
            except _READ_ERRORS as e:
                raise CorruptFileError(f"corrupt file {self.path}: {e}") from None
            self._stats = stats
        return self._stats

    def uncompressed_entry_bytes(self) -> float:
        """Average decoded size of an entry (from the footer), for sizing buffers."""
        md = self.metadata
        total = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
        return total / self.entries if self.entries else 0.0

    def row_groups_in(self, rng: RowRange) -> list[int]:
        """Indices of row groups that may hold rows of `rng` (by their `row` statistics)."""
        if rng.is_empty():
            return []
        if rng.is_unbounded():
            return list(range(self.num_row_groups))
        out = []
        for i, (lo, hi, n) in enumerate(self.row_group_stats()):
            if n == 0:
                continue
            if lo is None or hi is None or rng.overlaps(RowRange.rows(lo, hi)):
                out.append(i)
        return out

    def batches(
        self, rng: RowRange = FULL_RANGE, *, batch_size: int = 65536
    ) -> Iterator[pa.RecordBatch]:
        """Entries with rows inside `rng`, in key order, `batch_size` at most per batch.

        Memory stays bounded by about one row group per column plus one batch, whatever the
        file size: row groups outside the range are never read.
        """
        groups = self.row_groups_in(rng)
        if not groups:
            return
        bounded = not rng.is_unbounded()
        try:
            it = self._pf.iter_batches(batch_size=batch_size, row_groups=groups, use_threads=False)
            for batch in it:
                if batch.schema != ENTRY_SCHEMA:
                    batch = _conform(batch, self.path)
                if bounded and not _inside(batch, rng):
                    mask = rng.mask(batch.column(0))
                    if mask is not None:
                        n_in = mask.true_count
                        if n_in == 0:
                            continue
                        if n_in < batch.num_rows:
                            batch = batch.filter(mask)
                yield batch
        except CorruptFileError:
            raise
        except _READ_ERRORS as e:
            raise CorruptFileError(f"corrupt file {self.path}: {e}") from None


def _inside(batch: pa.RecordBatch, rng: RowRange) -> bool:
    """True when every row of the (sorted) batch is in `rng`: its first and last are."""
    rows = batch.column(0)
    return len(rows) > 0 and rng.contains(rows[0].as_py()) and rng.contains(rows[-1].as_py())


def _conform(batch: pa.RecordBatch, path: str) -> pa.RecordBatch:
    problem = check_schema(batch.schema)
    if problem:
        raise CorruptFileError(f"file {path}: {problem}")
    return pa.RecordBatch.from_arrays(batch.columns, schema=ENTRY_SCHEMA)


def _as_bytes(v: object) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode()
    raise TypeError(f"unexpected statistics value {v!r}")
