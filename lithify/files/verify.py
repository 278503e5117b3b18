"""Reading a sorted file whole to check it: what bulk import and `lithify fileinfo --verify` do.

The footer's facts are not trusted: every page is read (its checksum verified), the schema and
nulls checked, and key order checked across the whole file with vectorised comparisons (the
file may be large), so the facts returned are computed from the entries themselves.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from lithify.data.key import ENTRY_SCHEMA, key_at
from lithify.files.reader import SortedFileReader
from lithify.files.writer import FileInfo, check_schema


class FileCheckError(ValueError):
    """The file is readable but is not a valid sorted file; the message says what is wrong."""


def verify_entries(reader: SortedFileReader, *, allow_empty: bool = True) -> FileInfo:
    """Read every entry of `reader`'s file; FileCheckError for a wrong schema, no entries (when
    not allowed), nulls, keys out of order or footer facts (entries, first and last key) that
    the entries contradict, CorruptFileError (naming the file) for a page that cannot be read."""
    problem = check_schema(reader.schema)
    if problem:
        raise FileCheckError(problem)
    if reader.entries == 0 and not allow_empty:
        raise FileCheckError("it has no entries")
    prev_last: pa.RecordBatch | None = None
    first = last = None
    entries = 0
    for batch in reader.batches():
        for name in ENTRY_SCHEMA.names:
            if batch.column(name).null_count:
                raise FileCheckError(f"column {name!r} has nulls")
        with_prev = batch if prev_last is None else pa.concat_batches([prev_last, batch])
        bad = first_unsorted(with_prev)
        if bad is not None:
            raise FileCheckError(
                f"entries are not in key order at entry "
                f"{entries - (1 if prev_last is not None else 0) + bad}: "
                f"{key_at(with_prev, bad)} after {key_at(with_prev, bad - 1)}"
            )
        if first is None:
            first = key_at(batch, 0)
        last = key_at(batch, batch.num_rows - 1)
        prev_last = batch.slice(batch.num_rows - 1, 1)
        entries += batch.num_rows
    if entries != reader.entries:
        raise FileCheckError(f"footer says {reader.entries} entries, read {entries}")
    if reader.format_version is not None:  # lithify's footer: planners and scans trust its keys
        for which, said, read in (
            ("first", reader.first_key, first),
            ("last", reader.last_key, last),
        ):
            if said != read:
                raise FileCheckError(f"footer says the {which} key is {said}, read {read}")
    return FileInfo(reader.path, reader.size, entries, first, last)


def first_unsorted(batch: pa.RecordBatch) -> int | None:
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


__all__ = ["FileCheckError", "first_unsorted", "verify_entries"]
