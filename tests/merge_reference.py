"""Naive, obviously-correct reference implementations used by the merge and compaction tests."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from lithify.data.key import ENTRY_SCHEMA, sort_tuple

Entry = tuple[bytes, bytes, bytes, bytes, int, bool, bytes]


def to_entries(table: pa.Table | pa.RecordBatch) -> list[Entry]:
    cols = [table.column(n).to_pylist() for n in ENTRY_SCHEMA.names]
    return list(zip(*cols, strict=True))


def to_table(entries: Sequence[Entry]) -> pa.Table:
    cols = list(zip(*entries, strict=True)) if entries else [[] for _ in ENTRY_SCHEMA.names]
    return pa.table(
        {n: pa.array(list(c), f.type) for n, f, c in zip(ENTRY_SCHEMA.names, ENTRY_SCHEMA, cols, strict=True)},
        schema=ENTRY_SCHEMA,
    )


def sort_entries(entries: Sequence[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: sort_tuple(*e[:6]))


def reference_merge(
    sources: Sequence[Sequence[Entry]],
    *,
    versions: int | None,
    propagate_deletes: bool,
    min_timestamp: int | None = None,
) -> list[Entry]:
    """Entry-at-a-time merge: sources newest first, the rules of SYSTEM.md section 1."""
    tagged = [
        (sort_tuple(*e[:6]), si, j, e) for si, src in enumerate(sources) for j, e in enumerate(src)
    ]
    tagged.sort(key=lambda t: (t[0], t[1], t[2]))
    out: list[Entry] = []
    prev = None
    col = None
    deletes = puts = 0
    for key, _, _, e in tagged:
        if key == prev:
            continue
        prev = key
        if key[:4] != col:
            col, deletes, puts = key[:4], 0, 0
        if e[5]:
            if deletes == 0 and propagate_deletes:
                out.append(e)
            deletes += 1
        else:
            if deletes == 0 and (versions is None or puts < versions):
                out.append(e)
            puts += 1
    if min_timestamp is not None:
        out = [e for e in out if e[4] >= min_timestamp]
    return out
