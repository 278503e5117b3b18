"""The tablet server's write-ahead logs: which one is current, when to roll, when one may go.

All tablets of a server share one log (group commit spans tablets). Each tablet's metadata lists
the logs that may hold its unflushed entries; a log is deleted once no tablet lists it. Log
generations come from the metadata store, so sequence numbers keep increasing across restarts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from lithify.metadata.store import MetadataStore
from lithify.tablet.wal import WriteAheadLog

log = logging.getLogger(__name__)


class LogManager:
    """Which log is current, and which logs may be deleted.

    A writer holds its log with `writing()` from before its append until the tablet's metadata
    lists that log: in between, no tablet references it, and deleting it (or closing it for a
    roll) would lose or fail an acknowledged write. A rolled log stays open until its last
    writer is done.
    """

    def __init__(
        self, meta: MetadataStore, directory: Path, max_size: int, *, flush_interval_s: float = 1.0
    ) -> None:
        self._meta = meta
        self._flush_interval_s = flush_interval_s
        self._dir = directory
        self._dir.mkdir(parents=True, exist_ok=True)
        self._max_size = max_size
        self._lock = threading.Lock()
        self._current: WriteAheadLog | None = None
        self._writers: dict[WriteAheadLog, int] = {}

    def _open_new(self) -> WriteAheadLog:
        gen = self._meta.next_log_generation()
        path = self._dir / f"{gen:012d}.wal"
        wal = WriteAheadLog.create(path, gen, "flush", flush_interval_s=self._flush_interval_s)
        self._meta.add_log(str(path), gen)
        log.info("opened write-ahead log %s", path)
        return wal

    def _current_locked(self) -> WriteAheadLog:
        cur = self._current
        if cur is None or cur.size_bytes >= self._max_size:
            if cur is not None and cur not in self._writers:
                cur.close()  # else its last writer closes it
            cur = self._current = self._open_new()
        return cur

    @contextlib.contextmanager
    def writing(self) -> Iterator[WriteAheadLog]:
        """The log new writes go to (rolled over once it passes the size limit), held for the
        block: it is neither closed nor deleted until the block ends."""
        with self._lock:
            wal = self._current_locked()
            self._writers[wal] = self._writers.get(wal, 0) + 1
        try:
            yield wal
        finally:
            with self._lock:
                left = self._writers.pop(wal) - 1
                if left:
                    self._writers[wal] = left
                elif wal is not self._current:
                    wal.close()

    def release_unreferenced(self, referenced: Callable[[], set[str]]) -> list[str]:
        """Delete the logs that no tablet lists (never the current one, nor one being written).

        `referenced()` reads the tablets' log references. It is called after the logs are
        listed and the held ones noted, so that a write that finished before that point is in
        it, and one that had not is either holding its log or writing to a newer log, one that
        is not in the list.
        """
        with self._lock:
            keep = {str(w.path) for w in self._writers}
            if self._current is not None:
                keep.add(str(self._current.path))
            listed = self._meta.list_logs()
        refs = referenced()
        removed = []
        for path, _gen in listed:
            if path in keep or path in refs:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            self._meta.remove_log(path)
            removed.append(path)
        return removed

    def close(self) -> None:
        with self._lock:
            if self._current is not None and self._current not in self._writers:
                self._current.close()
            self._current = None
