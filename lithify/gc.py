"""The garbage collector: deletes data files that nothing refers to any more.

A file is garbage when no tablet's file set or running compaction refers to it and no scan,
flush or compaction of this process is using it. Compactions and table deletes never delete
files themselves; they only drop references, and this collector removes the files later, so a
scan that started before a compaction committed can still finish reading its inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from lithify.files.in_use import FilesInUse
from lithify.files.storage import Storage
from lithify.metadata.store import MetadataStore

log = logging.getLogger(__name__)

DATA_PREFIX = "tables"


def find_garbage(storage: Storage, meta: MetadataStore, in_use: FilesInUse) -> set[str]:
    """Data files that no tablet or compaction refers to and nothing in this process uses.

    The order of the reads matters: list the files first, then what is in use, then what is
    referenced, so that a file created during the pass is always seen as used or referenced.
    """
    candidates = storage.list_files(DATA_PREFIX)
    busy = in_use.snapshot()
    referenced = meta.referenced_files()
    return {p for p in candidates if p not in referenced and p not in busy}


def collect_garbage(
    storage: Storage,
    meta: MetadataStore,
    in_use: FilesInUse,
    *,
    only: Collection[str] | None = None,
) -> list[str]:
    """Delete unreferenced files under the data directory; returns the deleted paths.

    With `only`, just those of them that are also in `only`: a caller that deletes what two
    passes some time apart both found spares files that a slow reader with an out-of-date view
    of a tablet (its tablet server not yet told of an external commit) may still open.
    """
    deleted = []
    for path in sorted(find_garbage(storage, meta, in_use)):
        if only is not None and path not in only:
            continue
        storage.delete(path)
        deleted.append(path)
    if deleted:
        log.info("garbage collector deleted %d file(s)", len(deleted))
    return deleted
