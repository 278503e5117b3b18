"""Validation of externally written files before a bulk import adds them to tablets.

A file written by another program must already be a lithify sorted file in all but name: the
exact entry schema, no nulls, at least one entry, keys in key order. Everything is checked with
vectorised comparisons (the file may be large); the error names the file and what is wrong.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from lithify.data.key import ENTRY_SCHEMA, key_at
from lithify.errors import CorruptFileError, InvalidMutationError
from lithify.files.reader import SortedFileReader
from lithify.files.storage import Storage
from lithify.files.writer import FileInfo, check_schema


class BulkImportError(InvalidMutationError):
    """A bulk import file that cannot be imported; the message names the file."""


def validate_import_file(storage: Storage, rel_path: str) -> FileInfo:
    """Check a file for bulk import; return its facts (computed, not trusted from the footer)."""
    try:
        reader = SortedFileReader.open(storage, rel_path)
    except CorruptFileError as e:
        raise BulkImportError(f"bulk import file {rel_path}: {e}") from None
    with reader:
        schema = reader.schema
        problem = check_schema(schema)
        if problem:
            raise BulkImportError(f"bulk import file {rel_path}: {problem}")
        if reader.entries == 0:
            raise BulkImportError(f"bulk import file {rel_path} has no entries")
        prev_last: pa.RecordBatch | None = None
        first = last = None
        entries = 0
        try:
            for batch in reader.batches():
                for name in ENTRY_SCHEMA.names:
                    if batch.column(name).null_count:
                        raise BulkImportError(
                            f"bulk import file {rel_path}: column {name!r} has nulls"
                        )
                if prev_last is not None:
                    batch_with_prev = pa.concat_batches([prev_last, batch])
                else:
                    batch_with_prev = batch
                bad = _first_unsorted(batch_with_prev)
                if bad is not None:
                    raise BulkImportError(
                        f"bulk import file {rel_path}: entries are not in key order at entry "
                        f"{entries - (1 if prev_last is not None else 0) + bad}: "
                        f"{key_at(batch_with_prev, bad)} after {key_at(batch_with_prev, bad - 1)}"
                    )
                if first is None:
                    first = key_at(batch, 0)
                last = key_at(batch, batch.num_rows - 1)
                prev_last = batch.slice(batch.num_rows - 1, 1)
                entries += batch.num_rows
        except CorruptFileError as e:
            raise BulkImportError(f"bulk import file {rel_path}: {e}") from None
        return FileInfo(rel_path, reader.size, entries, first, last)


def _first_unsorted(batch: pa.RecordBatch) -> int | None:
    """Index i of the first entry whose key is smaller than entry i-1's, or None if sorted."""
    n = batch.num_rows
    if n < 2:
        return None
    a = {name: batch.column(name).slice(1) for name in ENTRY_SCHEMA.names[:6]}
    b = {name: batch.column(name).slice(0, n - 1) for name in ENTRY_SCHEMA.names[:6]}
    # Lexicographic "a < b" over (row, family, qualifier, visibility asc, timestamp desc,
    # deleted desc), built from the last field backwards.
    # deleted descending: a delete (True) sorts before a put at the same timestamp.
    less = pc.greater(a["deleted"].cast(pa.int8()), b["deleted"].cast(pa.int8()))
    ts_gt = pc.greater(a["timestamp"], b["timestamp"])
    ts_eq = pc.equal(a["timestamp"], b["timestamp"])
    less = pc.or_(ts_gt, pc.and_(ts_eq, less))
    for name in ("visibility", "qualifier", "family", "row"):
        less = pc.or_(pc.less(a[name], b[name]), pc.and_(pc.equal(a[name], b[name]), less))
    # less[i]: key(i+1) sorts before key(i), i.e. out of order.
    if not pc.any(less).as_py():
        return None
    return int(pc.index(less, True).as_py()) + 1
