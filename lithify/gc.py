"""The garbage collector: deletes data files that nothing refers to any more.

A file is garbage when no tablet's file set or running compaction refers to it and no scan,
flush or compaction of this process is using it. Compactions and table deletes never delete
files themselves; they only drop references, and this collector removes the files later, so a
scan that started before a compaction committed can still finish reading its inputs.
"""

from __future__ import annotations

import logging

from lithify.files.in_use import FilesInUse
from lithify.files.storage import Storage
from lithify.metadata.store import MetadataStore

log = logging.getLogger(__name__)

DATA_PREFIX = "tables"


def collect_garbage(storage: Storage, meta: MetadataStore, in_use: FilesInUse) -> list[str]:
    """Delete unreferenced files under the data directory; returns the deleted paths.

    The order of the reads matters: list the files first, then what is in use, then what is
    referenced, so that a file created during the pass is always seen as used or referenced.
    """
    candidates = storage.list_files(DATA_PREFIX)
    busy = in_use.snapshot()
    referenced = meta.referenced_files()
    deleted = []
    for path in candidates:
        if path in referenced or path in busy:
            continue
        storage.delete(path)
        deleted.append(path)
    if deleted:
        log.info("garbage collector deleted %d file(s)", len(deleted))
    return deleted
