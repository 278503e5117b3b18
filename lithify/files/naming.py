"""File names that say where a file came from.

`tables/<table_id>/<K><unique>.parquet`, K = F (flush), C (partial compaction, deletes kept),
A (full compaction, deletes dropped), I (bulk import). The unique part starts with the time in
microseconds (so names sort roughly by creation) and ends with 64 random bits, so that processes
on different hosts never pick the same name. A compaction writes `<final>_tmp_<id>` and renames it
when it commits; the garbage collector recognises leftovers by the `_tmp_` marker.
"""

from __future__ import annotations

import posixpath
import secrets
import time

KINDS = {"F": "flush", "C": "partial compaction", "A": "full compaction", "I": "bulk import"}
TMP_MARKER = "_tmp_"


def new_file_name(kind: str, table_id: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"file kind must be one of {sorted(KINDS)}, got {kind!r}")
    if not table_id or "/" in table_id:
        raise ValueError(f"invalid table id {table_id!r}")
    unique = f"{time.time_ns() // 1000:014x}{secrets.token_hex(8)}"
    return f"tables/{table_id}/{kind}{unique}.parquet"


def tmp_name(final: str, tmp_id: str) -> str:
    if not tmp_id or "/" in tmp_id:
        raise ValueError(f"invalid temporary id {tmp_id!r}")
    return f"{final}{TMP_MARKER}{tmp_id}"


def is_tmp(name: str) -> bool:
    return TMP_MARKER in posixpath.basename(name)


def final_name(name: str) -> str:
    """The name a temporary file will have once committed (a final name is returned as is)."""
    base = posixpath.basename(name)
    i = base.find(TMP_MARKER)
    return name if i < 0 else posixpath.join(posixpath.dirname(name), base[:i])


def kind_of(name: str) -> str:
    """The kind letter of a data file name (of the final name, for a temporary)."""
    base = posixpath.basename(name)
    if not base or base[0] not in KINDS:
        raise ValueError(f"not a lithify data file name: {name!r}")
    return base[0]
