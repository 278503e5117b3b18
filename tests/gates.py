"""Bounded waiting and a gate that holds compactions open, shared by the in-process tests.

Tests that must see a compaction "running" or "queued" cannot guess it from timing: a compaction
whose iterator names a gate blocks inside the merge until the test opens the gate (never longer
than `max_wait`, so a failing test cannot hang).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa

from lithify.compaction.iterators import CompactionIterator

WAIT_S = 30.0


def wait_until(cond: Callable[[], bool], timeout: float = WAIT_S, poll_s: float = 0.02) -> bool:
    """Poll `cond` until it holds or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll_s)
    return cond()


@dataclass
class Gate:
    """Compactions whose iterator names this gate block in `apply` until the gate opens.

    `active` is how many compactions are inside the gate now, `peak` the most at once,
    `entered` how many ever entered.
    """

    name: str
    max_wait: float = WAIT_S
    opened: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0
    peak: int = 0
    entered: int = 0

    def open(self) -> None:
        self.opened.set()

    def hold(self, *, only_first: bool = False) -> bool:
        """Block the calling thread inside the gate until it opens (at most `max_wait`).

        With `only_first`, only the first caller ever is held; the others pass at once.
        Returns whether this caller was held.
        """
        with self.lock:
            if only_first and self.entered:
                return False
            self.active += 1
            self.entered += 1
            self.peak = max(self.peak, self.active)
        try:
            self.opened.wait(self.max_wait)
        finally:
            with self.lock:
                self.active -= 1
        return True

    def iterator(self) -> tuple[str, dict[str, str]]:
        """The (class, options) of a compaction iterator that passes through this gate."""
        return (f"{__name__}:GatedIterator", {"gate": self.name})


GATES: dict[str, Gate] = {}


@contextmanager
def new_gate() -> Iterator[Gate]:
    """A registered gate, opened and forgotten on exit (pass or fail)."""
    g = Gate(f"g{uuid.uuid4().hex[:8]}")
    GATES[g.name] = g
    try:
        yield g
    finally:
        g.open()
        GATES.pop(g.name, None)


class GatedIterator(CompactionIterator):
    """Keeps every entry; blocks on the gate named by option `gate` (if it is registered)."""

    def init(self, options: Mapping[str, str]) -> None:
        self.gate = GATES.get(options.get("gate", ""))

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self.gate is not None:
            self.gate.hold()
        return batch
