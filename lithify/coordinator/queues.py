"""The coordinator's external compaction queues: bounded priority queues, one per queue name.

Pure bookkeeping (no I/O, no threads, no clock of its own: times are passed in), so that the
coordinator core can hold its lock around every call and tests can drive it directly.

* A tablet's queued jobs are replaced as a whole by its newest plan (SYSTEM.md 5.3: a new plan
  replaces the old), across every queue: the planner saw the tablet's current files, the older
  jobs may name files that no longer exist.
* Order: priority descending, then more files first, then oldest first
  (`lithify.compaction.priority.queue_order_key`, the same order as internal executors).
* Bounded: past `max_jobs` a queue rejects its lowest-ranked job, which may be the one just
  offered; rejections are counted, never silent.

Each queue is a list of order keys kept sorted with `bisect`: a queue holds at most a few
thousand entries, so the memmove of an insertion costs microseconds, far less than the metadata
transaction that follows every `take`, and both ends (best to take, worst to reject) are at hand.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lithify.compaction.priority import queue_order_key
from lithify.data.ranges import Extent, FileRef

OrderKey = tuple[int, int, float]
_PLANNED_MEMORY = 1_000_000


@dataclass(frozen=True, slots=True)
class PlannedJob:
    """One job of a tablet's plan, as the tablet server sent it."""

    files: tuple[FileRef, ...]
    executor: str
    priority: int
    kind: str

    @property
    def queue(self) -> str:
        """The external queue of an executor id `e.<queue>`."""
        return queue_of(self.executor)


def planned_job_from_json(d: Mapping[str, Any]) -> PlannedJob:
    """One job of `POST /v1/queues/plan`; ValueError (a 4xx) when the job is malformed."""
    try:
        files = tuple(FileRef.from_json(f) for f in d["files"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        # A file reference the model could not check (it is a plain dict): a malformed call,
        # not a server error.
        raise ValueError(f"a planned job's file is malformed: {e!r}") from None
    if not files:
        raise ValueError("a planned job needs at least one file")
    kind = str(d.get("kind", "SYSTEM"))
    if kind not in ("SYSTEM", "USER"):
        raise ValueError(f"job kind must be SYSTEM or USER, not {kind!r}")
    return PlannedJob(files, str(d["executor"]), int(d["priority"]), kind)


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """A job waiting in a queue: the plan's job plus where it came from and when."""

    extent: Extent
    queue: str
    job: PlannedJob
    seq: int
    enqueued_at: float

    @property
    def order_key(self) -> OrderKey:
        return queue_order_key(self.job.priority, len(self.job.files), self.seq)


@dataclass
class QueueStats:
    """Counters of one queue (totals since the coordinator started) and its current state."""

    queued: int = 0
    dequeued: int = 0
    rejected: int = 0
    depth: int = 0
    oldest_age_s: float = 0.0


@dataclass
class _Queue:
    keys: list[OrderKey] = field(default_factory=list)
    jobs: dict[OrderKey, QueuedJob] = field(default_factory=dict)
    queued: int = 0
    dequeued: int = 0
    rejected: int = 0


def queue_of(executor: str) -> str:
    """`e.<queue>` -> `<queue>`; anything else is not an external executor."""
    if not executor.startswith("e.") or len(executor) <= 2:
        raise ValueError(f"executor {executor!r} is not an external queue (expected e.<queue>)")
    return executor[2:]


class ExternalQueues:
    """Bounded priority queues of external compaction jobs, keyed by queue name.

    Not thread-safe: the coordinator serialises calls with its own lock.
    """

    def __init__(self, max_jobs: int = 10000) -> None:
        if max_jobs < 1:
            raise ValueError(f"a queue must hold at least one job, not {max_jobs}")
        self.max_jobs = max_jobs
        self._queues: dict[str, _Queue] = {}
        self._by_tablet: dict[Extent, list[QueuedJob]] = {}
        # A counter, not a clock, breaks ties: two jobs queued in the same clock tick keep the
        # order they arrived in, and nothing depends on the caller's clock being monotonic.
        self._next_seq = 0
        # Per tablet, the first sequence number of its latest plan: a taken job older than that
        # was superseded and must not be put back (one int per tablet ever planned).
        self._planned_at: dict[Extent, int] = {}

    # -- changes ------------------------------------------------------------------------------

    def plan(self, extent: Extent, jobs: Sequence[PlannedJob], now: float) -> list[QueuedJob]:
        """Replace the tablet's queued jobs by `jobs`; return those that were queued.

        A job may be missing from the result because its queue was full and it ranked lowest
        (counted as rejected). An empty plan simply clears the tablet's queued jobs.
        """
        for old in self._by_tablet.pop(extent, ()):
            self._remove(old)
        if len(self._planned_at) > _PLANNED_MEMORY:
            # Tablets split and merge away over time; forgetting only weakens `put_back`,
            # whose jobs the reservation re-checks against the metadata anyway.
            self._planned_at.clear()
        self._planned_at[extent] = self._next_seq
        accepted: list[QueuedJob] = []
        for job in jobs:
            name = job.queue
            q = self._queues.setdefault(name, _Queue())
            qj = QueuedJob(extent, name, job, self._next_seq, now)
            self._next_seq += 1
            key = qj.order_key
            bisect.insort(q.keys, key)
            q.jobs[key] = qj
            q.queued += 1
            accepted.append(qj)
            if len(q.keys) > self.max_jobs:
                worst = q.jobs.pop(q.keys.pop())
                q.rejected += 1
                if worst.extent == extent:
                    accepted.remove(worst)
                else:
                    self._forget(worst)
        if accepted:
            self._by_tablet[extent] = accepted
        return accepted

    def take(self, queue: str) -> QueuedJob | None:
        """Remove and return the best job of `queue` (None when it is empty)."""
        q = self._queues.get(queue)
        if q is None or not q.keys:
            return None
        qj = q.jobs.pop(q.keys.pop(0))
        q.dequeued += 1
        self._forget(qj)
        return qj

    def put_back(self, qj: QueuedJob) -> bool:
        """Return a taken job to its place (its reservation failed for a passing reason).

        Not done when the tablet was planned again since: the newer plan wins. Returns whether
        the job is queued again; the dequeue is not undone in the counters.
        """
        if qj.seq < self._planned_at.get(qj.extent, -1):
            return False
        q = self._queues.setdefault(qj.queue, _Queue())
        key = qj.order_key
        if len(q.keys) >= self.max_jobs and key > q.keys[-1]:
            q.rejected += 1
            return False
        bisect.insort(q.keys, key)
        q.jobs[key] = qj
        self._by_tablet.setdefault(qj.extent, []).append(qj)
        if len(q.keys) > self.max_jobs:
            worst = q.jobs.pop(q.keys.pop())
            q.rejected += 1
            self._forget(worst)
        return True

    def remove_where(self, predicate: Callable[[QueuedJob], bool]) -> int:
        """Drop every queued job matching `predicate` (cancellation); returns how many."""
        doomed = [qj for jobs in self._by_tablet.values() for qj in jobs if predicate(qj)]
        for qj in doomed:
            self._remove(qj)
            self._forget(qj)
        return len(doomed)

    def clear(self) -> None:
        """Drop every queued job (counters are kept)."""
        for q in self._queues.values():
            q.keys.clear()
            q.jobs.clear()
        self._by_tablet.clear()

    def _remove(self, qj: QueuedJob) -> None:
        q = self._queues.get(qj.queue)
        if q is None:
            return
        key = qj.order_key
        if q.jobs.pop(key, None) is not None:
            i = bisect.bisect_left(q.keys, key)
            del q.keys[i]

    def _forget(self, qj: QueuedJob) -> None:
        """Drop `qj` from its tablet's list (it already left its queue)."""
        jobs = self._by_tablet.get(qj.extent)
        if jobs is None:
            return
        rest = [j for j in jobs if j is not qj]
        if rest:
            self._by_tablet[qj.extent] = rest
        else:
            del self._by_tablet[qj.extent]

    # -- reading ------------------------------------------------------------------------------

    def depth(self, queue: str) -> int:
        q = self._queues.get(queue)
        return 0 if q is None else len(q.keys)

    def names(self) -> list[str]:
        """Every queue that was ever used, sorted."""
        return sorted(self._queues)

    def jobs_of(self, extent: Extent) -> list[QueuedJob]:
        """The tablet's queued jobs (in the order they were planned)."""
        return list(self._by_tablet.get(extent, ()))

    def peek(self, queue: str, limit: int = 10) -> list[QueuedJob]:
        """The best `limit` jobs of `queue`, best first, without taking them."""
        q = self._queues.get(queue)
        if q is None:
            return []
        return [q.jobs[k] for k in q.keys[:limit]]

    def stats(self, now: float) -> dict[str, QueueStats]:
        """Counters, depth and the age of the oldest job, per queue."""
        out: dict[str, QueueStats] = {}
        for name, q in self._queues.items():
            oldest = min((j.enqueued_at for j in q.jobs.values()), default=now)
            out[name] = QueueStats(
                queued=q.queued,
                dequeued=q.dequeued,
                rejected=q.rejected,
                depth=len(q.keys),
                oldest_age_s=max(0.0, now - oldest),
            )
        return out

    def __len__(self) -> int:
        return sum(len(q.keys) for q in self._queues.values())

    def all_jobs(self) -> Iterable[QueuedJob]:
        for q in self._queues.values():
            yield from (q.jobs[k] for k in q.keys)
