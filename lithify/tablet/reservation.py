"""Reservation rules for compactions, as pure functions over a tablet's metadata.

A running compaction reserves its input files in the tablet's metadata. These functions compute
the new metadata for reserve, commit and release; the caller applies them with a conditional
update, so a tablet that changed underneath is re-read and the rule re-checked. Rules:

* a file is reserved by at most one running compaction, and only while the tablet still has it;
* the input set is fixed at reservation and cannot change under a running compaction;
* a commit replaces exactly the reserved inputs by the output and drops the record, once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from lithify.data.ranges import FileRef
from lithify.errors import LithifyError
from lithify.metadata.store import TabletMeta


class ReservationError(LithifyError):
    """The files cannot be reserved (gone, or reserved by another compaction)."""


def reserved_files(meta: TabletMeta) -> set[FileRef]:
    """Files held by the tablet's running compactions."""
    return {FileRef.from_json(f) for rec in meta.compactions.values() for f in rec["inputs"]}


def may_drop_deletes(meta: TabletMeta, inputs: Iterable[FileRef]) -> bool:
    """Deletes may be dropped only when the inputs are all of the tablet's files."""
    return set(inputs) == set(meta.files)


def reserve(
    meta: TabletMeta, cid: str, inputs: Iterable[FileRef], record: dict[str, Any]
) -> TabletMeta:
    """Metadata with compaction `cid` recorded as running over `inputs`."""
    inputs = list(inputs)
    if cid in meta.compactions:
        raise ReservationError(f"compaction {cid} is already recorded on {meta.extent}")
    if not inputs:
        raise ReservationError(f"compaction {cid} has no input files")
    present = set(meta.files)
    missing = [f.path for f in inputs if f not in present]
    if missing:
        raise ReservationError(f"files {missing} are no longer in tablet {meta.extent}")
    taken = reserved_files(meta)
    busy = [f.path for f in inputs if f in taken]
    if busy:
        raise ReservationError(f"files {busy} of {meta.extent} are reserved by another compaction")
    rec = dict(record)
    rec["inputs"] = [f.to_json() for f in inputs]
    rec.setdefault("started", time.time())
    return meta.replace(compactions={**meta.compactions, cid: rec})


def commit(meta: TabletMeta, cid: str, output: FileRef | None) -> TabletMeta:
    """Metadata with the inputs of `cid` replaced by `output` (None: the output was empty)."""
    rec = meta.compactions.get(cid)
    if rec is None:
        raise ReservationError(f"compaction {cid} is not running on {meta.extent}")
    inputs = {FileRef.from_json(f) for f in rec["inputs"]}
    files = [f for f in meta.files if f not in inputs]
    if output is not None:
        files.append(output)
    rest = {k: v for k, v in meta.compactions.items() if k != cid}
    return meta.replace(files=tuple(files), compactions=rest)


def release(meta: TabletMeta, cid: str) -> TabletMeta | None:
    """Metadata without the record of `cid` (None when there is nothing to release)."""
    if cid not in meta.compactions:
        return None
    rest = {k: v for k, v in meta.compactions.items() if k != cid}
    return meta.replace(compactions=rest)
