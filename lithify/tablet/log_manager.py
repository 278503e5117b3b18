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
from pathlib import Path

import pyarrow as pa

from lithify.metadata.store import MetadataStore
from lithify.tablet.wal import WriteAheadLog

log = logging.getLogger(__name__)


class LogManager:
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

    def _open_new(self) -> WriteAheadLog:
        gen = self._meta.next_log_generation()
        path = self._dir / f"{gen:012d}.wal"
        wal = WriteAheadLog.create(path, gen, "flush", flush_interval_s=self._flush_interval_s)
        self._meta.add_log(str(path), gen)
        log.info("opened write-ahead log %s", path)
        return wal

    def current(self) -> WriteAheadLog:
        """The log new writes go to, rolled over once it passes the size limit."""
        with self._lock:
            cur = self._current
            if cur is None or cur.size_bytes >= self._max_size:
                if cur is not None:
                    cur.close()
                cur = self._current = self._open_new()
            return cur

    def append(self, tablet: str, table: pa.Table, durability: str) -> tuple[int, str]:
        """Append a tablet's entries; returns (sequence number, log path) once durable."""
        wal = self.current()
        seq = wal.append(tablet, table, durability=durability)
        return seq, str(wal.path)

    def release_unreferenced(self, referenced: set[str]) -> list[str]:
        """Delete logs that no tablet lists any more (never the current one)."""
        with self._lock:
            current = str(self._current.path) if self._current else None
        removed = []
        for path, _gen in self._meta.list_logs():
            if path in referenced or path == current:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            self._meta.remove_log(path)
            removed.append(path)
        return removed

    def close(self) -> None:
        with self._lock:
            if self._current is not None:
                self._current.close()
                self._current = None
