"""Order-preserving fixed-width byte keys, so that one cheap sort merges sorted runs.

Sorting entries by six Arrow columns (row, family, qualifier, visibility ascending, timestamp
descending, deletes first) makes Arrow compare column by column, and its multi-key sort does not
notice that the input is a handful of sorted runs. Encoding each entry's whole key as ONE
fixed-width byte string whose plain byte order is the key order lets numpy's stable sort (a
run-adaptive merge sort for byte strings) do the merge in O(n log runs) memcmp comparisons, and
makes "same column as the previous entry" a vectorised comparison of key prefixes.

Encoding of a round's keys (every key of one call has the same layout, so keys of different
calls must not be compared with each other):

* a key field whose values all have the same length: the raw bytes (an empty field adds nothing);
* a field of varying length: its bytes zero-padded to the longest value, then the length as a
  big-endian unsigned integer; a value that is a proper prefix of another then sorts first
  whatever bytes follow, because equal padded bytes fall through to the shorter length;
* timestamp: 8 bytes, big-endian, of the bit-inverted offset value (descending order);
* deleted: one byte, 0 for a delete, 1 for a put (deletes first).

Equal fields give equal bytes and each field has the same width in every key, so comparing keys
byte by byte compares the fields in turn: the byte order is exactly the key order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from lithify.data.gather import binary_offsets

#: Keys wider than this are not encoded (the caller sorts with Arrow instead): the padded matrix
#: costs rows x width bytes, which a single very long row would otherwise blow up.
MAX_KEY_BYTES = 128

_SIGN = np.uint64(1 << 63)


@dataclass(frozen=True, slots=True)
class SortKeys:
    """One byte-string key per entry (numpy `S<width>` array) and how many leading bytes of each
    key encode the column (row, family, qualifier, visibility)."""

    keys: np.ndarray
    column_bytes: int


def _length_dtype(longest: int) -> np.dtype:
    for dt in (">u1", ">u2", ">u4"):
        if longest < np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(">u8")


def _field(col: pa.Array) -> tuple[list[np.dtype], list[np.ndarray]]:
    """The key-field layout (numpy record formats) and values of one binary column."""
    n = len(col)
    off = binary_offsets(col)
    lens = np.diff(off)
    longest = int(lens.max()) if n else 0
    if longest == 0:
        return [], []
    data = np.frombuffer(col.buffers()[2], dtype=np.uint8)
    field = np.dtype(f"S{longest}")
    if bool((lens == longest).all()):
        return [field], [data[off[0] : off[0] + n * longest].view(field)]
    padded = np.zeros((n, longest), dtype=np.uint8)
    padded[np.arange(longest)[None, :] < lens[:, None]] = data[off[0] : off[-1]]
    length = _length_dtype(longest)
    return [field, length], [padded.view(field).ravel(), lens.astype(length)]


def encode(batch: pa.RecordBatch) -> SortKeys | None:
    """Keys for the entries of `batch` (ENTRY_SCHEMA, contiguous), or None when too wide."""
    formats: list[np.dtype] = []
    values: list[np.ndarray] = []
    for i in range(4):
        col = batch.column(i)
        if col.null_count:
            return None
        fmts, vals = _field(col)
        formats += fmts
        values += vals
    column_bytes = sum(f.itemsize for f in formats)
    width = column_bytes + 9
    if width > MAX_KEY_BYTES:
        return None
    record = np.dtype(
        {
            "names": [f"f{i}" for i in range(len(formats) + 2)],
            "formats": [*formats, np.dtype(">u8"), np.dtype("u1")],
        }
    )
    out = np.empty(batch.num_rows, dtype=record)
    for i, v in enumerate(values):
        out[f"f{i}"] = v
    ts = batch.column(4).to_numpy().view(np.uint64)
    out[f"f{len(formats)}"] = ~(ts ^ _SIGN)
    out[f"f{len(formats) + 1}"] = ~batch.column(5).to_numpy(zero_copy_only=False)
    return SortKeys(out.view(f"S{width}"), column_bytes)


def merge_order(keys: SortKeys) -> np.ndarray:
    """The stable permutation that puts the entries in key order (ties keep input order)."""
    return np.argsort(keys.keys, kind="stable")


def same_column(sorted_keys: np.ndarray, column_bytes: int) -> np.ndarray:
    """For keys in key order: element i (i >= 1) is true when entry i is a version of the same
    column as entry i-1. Element 0 is false."""
    n = len(sorted_keys)
    out = np.zeros(n, dtype=bool)
    if n < 2:
        return out
    if column_bytes == 0:
        out[1:] = True
        return out
    prefix = np.dtype(
        {
            "names": ["c"],
            "formats": [f"S{column_bytes}"],
            "offsets": [0],
            "itemsize": sorted_keys.dtype.itemsize,
        }
    )
    cols = sorted_keys.view(prefix)["c"]
    out[1:] = cols[1:] == cols[:-1]
    return out


__all__ = ["MAX_KEY_BYTES", "SortKeys", "encode", "merge_order", "same_column"]
