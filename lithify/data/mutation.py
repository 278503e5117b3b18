"""Mutations (the unit of atomic write) and validation of entry batches written by clients.

A mutation is one row with several column updates, applied atomically. Clients may also write
Arrow tables directly; both paths end in `validate_entries`, which produces a table in
`ENTRY_SCHEMA` (timestamps still possibly null: the tablet assigns those).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lithify.data.key import ENTRY_SCHEMA
from lithify.errors import InvalidMutationError

#: Like ENTRY_SCHEMA, but a null timestamp means "let the server assign one".
INPUT_SCHEMA = pa.schema(
    [f.with_nullable(True) if f.name == "timestamp" else f for f in ENTRY_SCHEMA]
)


@dataclass(frozen=True, slots=True)
class ColumnUpdate:
    family: bytes
    qualifier: bytes
    visibility: bytes
    timestamp: int | None
    deleted: bool
    value: bytes


@dataclass(slots=True)
class Mutation:
    """Changes to one row. Build with `put` and `delete`, then hand to a writer."""

    row: bytes
    updates: list[ColumnUpdate] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.row = _as_bytes(self.row, "row")
        if not self.row:
            raise InvalidMutationError("mutation row must not be empty")

    def put(
        self,
        family: bytes | str,
        qualifier: bytes | str,
        value: bytes | str,
        *,
        visibility: bytes | str = b"",
        timestamp: int | None = None,
    ) -> Mutation:
        self.updates.append(
            ColumnUpdate(
                _as_bytes(family, "family"),
                _as_bytes(qualifier, "qualifier"),
                _as_bytes(visibility, "visibility"),
                _check_ts(timestamp),
                False,
                _as_bytes(value, "value"),
            )
        )
        return self

    def delete(
        self,
        family: bytes | str,
        qualifier: bytes | str,
        *,
        visibility: bytes | str = b"",
        timestamp: int | None = None,
    ) -> Mutation:
        self.updates.append(
            ColumnUpdate(
                _as_bytes(family, "family"),
                _as_bytes(qualifier, "qualifier"),
                _as_bytes(visibility, "visibility"),
                _check_ts(timestamp),
                True,
                b"",
            )
        )
        return self


def _as_bytes(v: bytes | str, name: str) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, bytearray | memoryview):
        return bytes(v)
    raise InvalidMutationError(f"mutation {name} must be bytes or str, got {type(v).__name__}")


def _check_ts(ts: int | None) -> int | None:
    if ts is None:
        return None
    if not isinstance(ts, int) or isinstance(ts, bool) or not (0 <= ts < 2**63):
        raise InvalidMutationError(f"mutation timestamp must be an int in [0, 2^63), got {ts!r}")
    return ts


def mutations_to_table(mutations: Iterable[Mutation]) -> pa.Table:
    """Column-wise Arrow table of the updates of `mutations`, in INPUT_SCHEMA."""
    cols: dict[str, list] = {name: [] for name in INPUT_SCHEMA.names}
    for m in mutations:
        if not isinstance(m, Mutation):
            raise InvalidMutationError(f"expected a Mutation, got {type(m).__name__}")
        if not m.updates:
            raise InvalidMutationError(f"mutation for row {m.row!r} has no updates")
        for u in m.updates:
            cols["row"].append(m.row)
            cols["family"].append(u.family)
            cols["qualifier"].append(u.qualifier)
            cols["visibility"].append(u.visibility)
            cols["timestamp"].append(u.timestamp)
            cols["deleted"].append(u.deleted)
            cols["value"].append(u.value)
    return pa.table(cols, schema=INPUT_SCHEMA)


def validate_entries(table: pa.Table | pa.RecordBatch) -> pa.Table:
    """Check a client's entry table and cast it to INPUT_SCHEMA.

    Accepts any column order and string columns where bytes are expected; `visibility`,
    `timestamp`, `deleted`, `value` may be absent (empty, server time, put, empty). Raises
    InvalidMutationError naming the column at fault.

    Every write passes through here, so the checks are vectorised and a column that already has
    the right type is neither cast nor copied; defaults for absent columns are built from zeroed
    buffers rather than Python lists (which cost more than the rest of the checks together).
    """
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    n = table.num_rows
    unknown = set(table.column_names) - set(INPUT_SCHEMA.names)
    if unknown:
        raise InvalidMutationError(
            f"unknown entry column(s) {sorted(unknown)}; expected {INPUT_SCHEMA.names}"
        )
    arrays = []
    for f in INPUT_SCHEMA:
        if f.name in table.column_names:
            col = table.column(f.name)
        elif f.name in _DEFAULTS:
            col = _DEFAULTS[f.name](n)
        else:
            raise InvalidMutationError(f"entry column {f.name!r} is missing")
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise InvalidMutationError(
                    f"entry column {f.name!r} has type {col.type}, expected {f.type}: {e}"
                ) from None
        if not f.nullable and col.null_count:
            raise InvalidMutationError(f"entry column {f.name!r} has {col.null_count} null(s)")
        arrays.append(col)
    out = pa.Table.from_arrays(arrays, schema=INPUT_SCHEMA)
    if n and pc.min(pc.binary_length(out.column("row"))).as_py() == 0:
        raise InvalidMutationError("entry column 'row' has an empty row")
    ts = out.column("timestamp")
    if n and ts.null_count < n and pc.min(ts).as_py() < 0:
        raise InvalidMutationError("entry column 'timestamp' has a negative timestamp")
    return out


def _empty_binary(n: int) -> pa.Array:
    """`n` empty byte strings: all-zero offsets and no data."""
    offsets = pa.py_buffer(np.zeros(n + 1, dtype=np.int32))
    return pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(b"")])


def _all_false(n: int) -> pa.Array:
    """`n` False values: a zeroed bitmap."""
    return pa.Array.from_buffers(
        pa.bool_(), n, [None, pa.py_buffer(np.zeros((n + 7) // 8, np.uint8))]
    )


#: Builders of the columns a client may leave out, by column name.
_DEFAULTS: dict[str, Callable[[int], pa.Array]] = {
    "visibility": _empty_binary,
    "timestamp": lambda n: pa.nulls(n, pa.int64()),
    "deleted": _all_false,
    "value": _empty_binary,
}
