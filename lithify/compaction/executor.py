"""Internal executors: thread pools inside the tablet server with a priority queue of jobs.

Jobs are ordered by priority (higher first), then by number of files (more first), then age.
A new plan for a tablet replaces the tablet's queued jobs that it no longer contains; running
jobs are never touched by planning, only by explicit cancellation. The pool can be resized
while running, and shut down with its queued jobs cancelled while running ones finish.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from lithify.compaction.priority import job_order_key
from lithify.compaction.spi import CompactionJob
from lithify.compaction.thread_priority import lower_current_thread

log = logging.getLogger(__name__)


@dataclass(eq=False)
class QueuedJob:
    """A planned job waiting for (or holding) a thread; `run` does the work."""

    tablet: Hashable
    job: CompactionJob
    run: Callable[[QueuedJob], None]
    created: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    seq: int = 0

    @property
    def file_set(self) -> frozenset[str]:
        return frozenset(f.uri for f in self.job.files)

    def order_key(self) -> tuple[int, int, float, int]:
        return (*job_order_key(self.job, self.created), self.seq)


@dataclass
class ExecutorStats:
    queued: int
    running: int
    completed: int
    failed: int
    cancelled: int


class InternalExecutor:
    """A resizable pool of threads taking jobs from a priority queue."""

    def __init__(self, executor_id: str, threads: int) -> None:
        self.executor_id = executor_id
        self._cv = threading.Condition()
        self._heap: list[tuple[tuple, QueuedJob]] = []
        self._running: set[QueuedJob] = set()
        self._threads: list[threading.Thread] = []
        self._target = 0
        self._stopped = False
        self._seq = itertools.count()
        self.completed = self.failed = self.cancelled = 0
        self.resize(threads)

    # -- queue ------------------------------------------------------------------------------

    def submit(self, qjob: QueuedJob) -> None:
        with self._cv:
            if self._stopped:
                qjob.cancelled.set()
                return
            qjob.seq = next(self._seq)
            heapq.heappush(self._heap, (qjob.order_key(), qjob))
            self._cv.notify()

    def replace_tablet_jobs(self, tablet: Hashable, jobs: Iterable[QueuedJob]) -> int:
        """Queue `jobs` for `tablet`, dropping its queued jobs the new plan no longer has.

        Returns how many new jobs were queued (jobs already queued with the same files stay,
        keeping their age).
        """
        new = {q.file_set: q for q in jobs}
        added = 0
        with self._cv:
            kept: list[tuple[tuple, QueuedJob]] = []
            present: set[frozenset[str]] = set()
            for entry in self._heap:
                q = entry[1]
                if q.tablet == tablet and q.file_set not in new:
                    q.cancelled.set()
                    continue
                if q.tablet == tablet:
                    present.add(q.file_set)
                kept.append(entry)
            self._heap = kept
            heapq.heapify(self._heap)
            for files, q in new.items():
                if files not in present:
                    q.seq = next(self._seq)
                    heapq.heappush(self._heap, (q.order_key(), q))
                    added += 1
            self._cv.notify_all()
        return added

    def cancel(self, predicate: Callable[[QueuedJob], bool], *, running: bool = True) -> int:
        """Cancel queued (and, with running=True, signal running) jobs matching `predicate`."""
        n = 0
        with self._cv:
            kept = []
            for entry in self._heap:
                if predicate(entry[1]):
                    entry[1].cancelled.set()
                    self.cancelled += 1
                    n += 1
                else:
                    kept.append(entry)
            self._heap = kept
            heapq.heapify(self._heap)
            if running:
                for q in self._running:
                    if predicate(q):
                        q.cancelled.set()
                        n += 1
        return n

    def queued_jobs(self) -> list[QueuedJob]:
        with self._cv:
            return [e[1] for e in sorted(self._heap, key=lambda e: e[0])]

    def running_jobs(self) -> list[QueuedJob]:
        with self._cv:
            return list(self._running)

    def stats(self) -> ExecutorStats:
        with self._cv:
            return ExecutorStats(
                len(self._heap), len(self._running), self.completed, self.failed, self.cancelled
            )

    # -- threads ----------------------------------------------------------------------------

    @property
    def threads(self) -> int:
        return self._target

    def resize(self, threads: int) -> None:
        """Change the pool size now; surplus threads exit after their current job."""
        if threads < 1:
            raise ValueError(f"executor {self.executor_id}: threads must be >= 1, got {threads}")
        with self._cv:
            self._target = threads
            self._threads = [t for t in self._threads if t.is_alive()]
            for _ in range(threads - len(self._threads)):
                t = threading.Thread(
                    target=self._worker, name=f"compact-{self.executor_id}", daemon=True
                )
                self._threads.append(t)
                t.start()
            self._cv.notify_all()

    def _should_exit(self) -> bool:
        alive = sum(1 for t in self._threads if t.is_alive())
        return self._stopped or alive > self._target

    def _worker(self) -> None:
        me = threading.current_thread()
        lower_current_thread()
        while True:
            with self._cv:
                while not self._heap and not self._should_exit():
                    self._cv.wait(timeout=1.0)
                if self._should_exit():
                    self._threads = [t for t in self._threads if t is not me]
                    return
                _, qjob = heapq.heappop(self._heap)
                if qjob.cancelled.is_set():
                    continue
                self._running.add(qjob)
            try:
                qjob.run(qjob)
                outcome = "cancelled" if qjob.cancelled.is_set() else "completed"
            except Exception:
                outcome = "cancelled" if qjob.cancelled.is_set() else "failed"
                if outcome == "failed":
                    log.exception("compaction on %s failed", self.executor_id)
            with self._cv:
                self._running.discard(qjob)
                setattr(self, outcome, getattr(self, outcome) + 1)
                self._cv.notify_all()

    def shutdown(self, *, wait: bool = False, timeout: float = 60.0) -> None:
        """Cancel queued jobs and stop the threads; running jobs finish first."""
        with self._cv:
            self._stopped = True
            for _, q in self._heap:
                q.cancelled.set()
                self.cancelled += 1
            self._heap = []
            self._cv.notify_all()
            threads = list(self._threads)
        if wait:
            deadline = time.monotonic() + timeout
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
