"""A token bucket shared by the reads and writes of a compaction service's internal compactions.

`tserver.compaction.major.service.<svc>.rate.limit` caps the bytes per second that all of the
service's internal compactions read and write together, so background merging cannot starve
foreground scans and writes of disk bandwidth.
"""

from __future__ import annotations

import threading
import time


class TokenBucket:
    """Bytes per second with a one-second burst; a rate of 0 means unlimited."""

    def __init__(self, rate: float, *, clock=time.monotonic, sleep=time.sleep) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        self._rate = float(rate)
        self._tokens = float(rate)
        self._last = clock()

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self._rate = float(rate)
            self._tokens = min(self._tokens, self._rate)

    def acquire(self, nbytes: int) -> float:
        """Take `nbytes` tokens, sleeping until they are there; returns seconds slept.

        A request larger than the burst is allowed to drive the bucket negative, so a single
        large read never blocks forever; the debt is paid by later callers' waits.
        """
        slept = 0.0
        with self._lock:
            if self._rate <= 0:
                return 0.0
            now = self._clock()
            self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate)
            self._last = now
            self._tokens -= nbytes
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
            slept = wait
        return slept
