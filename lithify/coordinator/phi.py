"""Phi-accrual failure detection (Hayashibara et al., as used by Akka and Cassandra).

A fixed timeout has to be tuned for the slowest healthy peer and then reacts slowly to every
failure. A phi-accrual detector instead learns the distribution of the intervals between a peer's
heartbeats and reports a suspicion level: phi = -log10(P(a heartbeat arrives later than now)).
phi = 1 means a 10% chance that the peer is still fine, phi = 8 one in 10^8. The caller picks the
threshold; the detector adapts to whatever rhythm the peer really keeps (a compactor reporting
every second, a client polling every few seconds).

The tail probability of the normal distribution is approximated with the logistic function
1 / (1 + exp(y * (1.5976 + 0.070566 y^2))) (error below 1.4e-4 over the whole line), computed
in log space so that phi keeps growing smoothly instead of overflowing for long silences.

Pure: time is always passed in (seconds, any monotonic clock), so tests need no sleeping.
"""

from __future__ import annotations

import math
from collections import deque

_LN10 = math.log(10.0)


class PhiAccrualDetector:
    """Suspicion that a peer died, from the intervals between its heartbeats.

    `window` intervals are kept (a sliding window, so the detector follows a peer whose rhythm
    changes). Before the first real interval the detector assumes one of `first_interval_s`
    with a deviation of a quarter of it (as Akka does), so a peer that sends a single heartbeat
    and dies is still detected. `min_std_s` keeps a perfectly regular peer from being judged
    dead the instant it is a little late.
    """

    def __init__(
        self,
        *,
        window: int = 100,
        min_std_s: float = 0.5,
        first_interval_s: float = 1.0,
    ) -> None:
        if window < 2:
            raise ValueError(f"phi window must be at least 2 intervals, not {window}")
        if not min_std_s > 0:
            raise ValueError(f"phi minimum deviation must be positive, not {min_std_s}")
        if not first_interval_s > 0:
            raise ValueError(f"first interval must be positive, not {first_interval_s}")
        self._intervals: deque[float] = deque(maxlen=window)
        self._sum = 0.0
        self._sum_sq = 0.0
        self._min_std = min_std_s
        self._last: float | None = None
        # Two samples mean +- deviation give exactly that mean and deviation.
        spread = first_interval_s / 4.0
        self._add(first_interval_s - spread)
        self._add(first_interval_s + spread)

    @property
    def last_heartbeat(self) -> float | None:
        """When the last heartbeat arrived (None before the first)."""
        return self._last

    @property
    def samples(self) -> int:
        """Intervals currently in the window (including the two assumed at the start)."""
        return len(self._intervals)

    def _add(self, interval: float) -> None:
        if len(self._intervals) == self._intervals.maxlen:
            old = self._intervals[0]
            self._sum -= old
            self._sum_sq -= old * old
        self._intervals.append(interval)
        self._sum += interval
        self._sum_sq += interval * interval

    def mean(self) -> float:
        return self._sum / len(self._intervals)

    def std(self) -> float:
        """The window's standard deviation, but never below `min_std_s`."""
        n = len(self._intervals)
        mean = self._sum / n
        var = max(0.0, self._sum_sq / n - mean * mean)
        return max(math.sqrt(var), self._min_std)

    def heartbeat(self, now: float) -> None:
        """Record a heartbeat at `now`; a clock that went backwards adds no interval."""
        if self._last is not None and now > self._last:
            self._add(now - self._last)
        if self._last is None or now > self._last:
            self._last = now

    def phi(self, now: float) -> float:
        """Suspicion level at `now`: 0 before any heartbeat, growing while the peer is silent."""
        if self._last is None:
            return 0.0
        elapsed = max(0.0, now - self._last)
        y = (elapsed - self.mean()) / self.std()
        z = y * (1.5976 + 0.070566 * y * y)
        # phi = -log10(1 / (1 + e^z)) = log10(1 + e^z), a softplus, evaluated without overflow.
        softplus = z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))
        return softplus / _LN10

    def is_suspect(self, now: float, threshold: float) -> bool:
        """Whether phi at `now` has passed `threshold`."""
        return self.phi(now) > threshold
