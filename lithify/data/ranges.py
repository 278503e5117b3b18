"""Row ranges, tablet extents and fenced file references.

An extent is the half-open row interval (prev_end_row, end_row] of a tablet, as in Accumulo:
`None` on either side means unbounded. A file reference may carry a fence, a row range of the
same shape; readers and compactions see only rows inside both the fence and the tablet's extent.
Fences are what make splits and merges metadata-only operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True, slots=True)
class RowRange:
    """Rows r with start < r (<= if start_inclusive) and r <= end (< if not end_inclusive).

    `None` bounds are unbounded. The default inclusivity gives the extent shape (after, upto].
    """

    start: bytes | None = None
    end: bytes | None = None
    start_inclusive: bool = False
    end_inclusive: bool = True

    @staticmethod
    def rows(start: bytes | None = None, end: bytes | None = None) -> RowRange:
        """The closed range [start, end] a user means by 'rows from start to end'."""
        return RowRange(start, end, start_inclusive=True, end_inclusive=True)

    def contains(self, row: bytes) -> bool:
        if self.start is not None and (
            row < self.start or (row == self.start and not self.start_inclusive)
        ):
            return False
        return not (
            self.end is not None
            and (row > self.end or (row == self.end and not self.end_inclusive))
        )

    def is_empty(self) -> bool:
        if self.start is None or self.end is None:
            return False
        if self.start < self.end:
            return False
        return not (self.start == self.end and self.start_inclusive and self.end_inclusive)

    def is_unbounded(self) -> bool:
        return self.start is None and self.end is None

    def intersect(self, other: RowRange) -> RowRange:
        start, s_inc = self.start, self.start_inclusive
        if other.start is not None and (
            start is None
            or other.start > start
            or (other.start == start and not other.start_inclusive)
        ):
            start, s_inc = other.start, other.start_inclusive
        end, e_inc = self.end, self.end_inclusive
        if other.end is not None and (
            end is None or other.end < end or (other.end == end and not other.end_inclusive)
        ):
            end, e_inc = other.end, other.end_inclusive
        return RowRange(start, end, s_inc, e_inc)

    def overlaps(self, other: RowRange) -> bool:
        return not self.intersect(other).is_empty()

    def mask(self, rows: pa.Array | pa.ChunkedArray) -> pa.Array | None:
        """Boolean mask of `rows` inside the range, or None when every row is inside."""
        m = None
        if self.start is not None:
            s = pa.scalar(self.start, pa.binary())
            m = pc.greater_equal(rows, s) if self.start_inclusive else pc.greater(rows, s)
        if self.end is not None:
            e = pa.scalar(self.end, pa.binary())
            m2 = pc.less_equal(rows, e) if self.end_inclusive else pc.less(rows, e)
            m = m2 if m is None else pc.and_(m, m2)
        return m

    def to_json(self) -> list:
        return [_hex(self.start), _hex(self.end), self.start_inclusive, self.end_inclusive]

    @staticmethod
    def from_json(v: list) -> RowRange:
        return RowRange(_unhex(v[0]), _unhex(v[1]), bool(v[2]), bool(v[3]))


FULL_RANGE = RowRange()


@dataclass(frozen=True, slots=True, order=True)
class Extent:
    """A tablet: the rows (prev_end_row, end_row] of table `table_id`."""

    table_id: str
    prev_end_row: bytes | None
    end_row: bytes | None

    @property
    def range(self) -> RowRange:
        return RowRange(self.prev_end_row, self.end_row)

    def contains(self, row: bytes) -> bool:
        return self.range.contains(row)

    def __str__(self) -> str:
        def show(r: bytes | None, none: str) -> str:
            return none if r is None else r.decode("utf-8", "backslashreplace")

        return f"{self.table_id};{show(self.end_row, '<')};{show(self.prev_end_row, '<')}"


@dataclass(frozen=True, slots=True)
class FileRef:
    """A tablet's reference to an immutable data file, optionally fenced to a row range."""

    path: str
    size: int
    entries: int
    fence: RowRange = FULL_RANGE

    @property
    def uri(self) -> str:
        """Identity of this reference: the path, plus the fence when there is one."""
        if self.fence.is_unbounded():
            return self.path
        return f"{self.path}#{self.fence.to_json()}"

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "size": self.size,
            "entries": self.entries,
            "fence": self.fence.to_json(),
        }

    @staticmethod
    def from_json(d: dict) -> FileRef:
        return FileRef(d["path"], int(d["size"]), int(d["entries"]), RowRange.from_json(d["fence"]))


def _hex(b: bytes | None) -> str | None:
    return None if b is None else b.hex()


def _unhex(s: str | None) -> bytes | None:
    return None if s is None else bytes.fromhex(s)
