"""Which files this process is reading or writing right now, so the garbage collector spares them.

The metadata says which files tablets refer to; it cannot see a scan still reading a file that a
compaction just replaced, or a flush writing a file not yet committed. Those register here.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class FilesInUse:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: Counter[str] = Counter()

    @contextmanager
    def using(self, paths: Iterable[str]) -> Iterator[None]:
        held = list(paths)
        with self._lock:
            self._count.update(held)
        try:
            yield
        finally:
            with self._lock:
                self._count.subtract(held)
                for p in held:
                    if self._count[p] <= 0:
                        del self._count[p]

    def snapshot(self) -> set[str]:
        with self._lock:
            return set(self._count)
