"""Internal executors and the token bucket, as units (no store, no files).

The executor is where a plan turns into work, so its contracts are checked directly: queue order
(priority, then more files, then older), live resizing, what a new plan for a tablet does to the
tablet's queued and running jobs, cancellation and shutdown. Jobs here are plain callables that
block on events, so every test decides exactly when a job starts and ends; every wait is bounded.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

import pytest

from lithify.compaction.executor import InternalExecutor, QueuedJob
from lithify.compaction.rate_limit import TokenBucket
from lithify.compaction.spi import CompactableFile, CompactionJob, CompactionKind
from lithify.compaction.thread_priority import NICE_INCREMENT
from tests import gates

WAIT_S = 10.0


def wait_until(cond: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    return gates.wait_until(cond, timeout, poll_s=0.01)


def pool_threads(executor_id: str = "i.test.x") -> int:
    """Live worker threads of an executor (workers are named `compact-<executor id>`)."""
    return sum(1 for t in threading.enumerate() if t.name == f"compact-{executor_id}")


def make_job(
    files: list[str], priority: int = 0, kind: CompactionKind = CompactionKind.SYSTEM
) -> CompactionJob:
    return CompactionJob(
        tuple(CompactableFile(f"file:///t/{f}", 100) for f in files), "i.test.x", priority, kind
    )


class Recorder:
    """Runs jobs that record their name and, while `hold` is set, block until it clears.

    `started` counts jobs that began; `active` is how many are inside `run` at once, and `peak`
    the most there ever were, which is how a test sees the pool's real concurrency.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.order: list[str] = []
        self.active = 0
        self.peak = 0
        self.release = threading.Event()
        self.release.set()

    def job(
        self,
        tablet: str,
        files: list[str],
        priority: int = 0,
        *,
        fail: bool = False,
        created: float | None = None,
    ) -> QueuedJob:
        name = f"{tablet}:{','.join(files)}"

        def run(q: QueuedJob) -> None:
            with self.lock:
                self.order.append(name)
                self.active += 1
                self.peak = max(self.peak, self.active)
            try:
                # Bounded: a job never blocks a test for more than WAIT_S.
                deadline = time.monotonic() + WAIT_S
                while not self.release.wait(0.01) and time.monotonic() < deadline:
                    if q.cancelled.is_set():
                        raise RuntimeError("cancelled while running")
                if fail:
                    raise RuntimeError("job failed on purpose")
            finally:
                with self.lock:
                    self.active -= 1

        q = QueuedJob(tablet, make_job(files, priority), run)
        if created is not None:
            q.created = created
        return q

    def names(self) -> list[str]:
        with self.lock:
            return list(self.order)


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def blocked_executor(rec: Recorder, threads: int = 1) -> tuple[InternalExecutor, QueuedJob]:
    """An executor whose threads are all busy with a blocker job, so later jobs stay queued."""
    ex = InternalExecutor("i.test.x", threads)
    rec.release.clear()
    blockers = [rec.job("blocker", [f"b{i}"], priority=100) for i in range(threads)]
    for b in blockers:
        ex.submit(b)
    assert wait_until(lambda: ex.stats().running == threads)
    return ex, blockers[0]


def test_priority_then_file_count_then_age(rec: Recorder) -> None:
    ex, _ = blocked_executor(rec)
    try:
        now = time.monotonic()
        ex.submit(rec.job("t1", ["a"], priority=-5, created=now - 10))
        ex.submit(rec.job("t2", ["b"], priority=7, created=now))
        ex.submit(rec.job("t3", ["c", "d"], priority=7, created=now))
        ex.submit(rec.job("t4", ["e"], priority=7, created=now - 5))
        ex.submit(rec.job("t5", ["f", "g", "h"], priority=-5, created=now))
        queued = [q.tablet for q in ex.queued_jobs()]
        assert queued == ["t3", "t4", "t2", "t5", "t1"]
        rec.release.set()
        assert wait_until(lambda: len(rec.names()) == 6)
        assert rec.names() == ["blocker:b0", "t3:c,d", "t4:e", "t2:b", "t5:f,g,h", "t1:a"]
        assert ex.stats().completed == 6
    finally:
        rec.release.set()
        ex.shutdown(wait=True, timeout=WAIT_S)


def test_resize_up_runs_more_jobs_at_once(rec: Recorder) -> None:
    ex = InternalExecutor("i.test.x", 1)
    try:
        rec.release.clear()
        for i in range(6):
            ex.submit(rec.job(f"t{i}", [f"f{i}"]))
        assert wait_until(lambda: ex.stats().running == 1)
        time.sleep(0.1)
        assert rec.active == 1 and ex.stats().queued == 5
        ex.resize(4)
        assert ex.threads == 4
        assert wait_until(lambda: ex.stats().running == 4)
        assert rec.active == 4 and ex.stats().queued == 2
        rec.release.set()
        assert wait_until(lambda: ex.stats().completed == 6)
        assert rec.peak == 4
    finally:
        rec.release.set()
        ex.shutdown(wait=True, timeout=WAIT_S)


def test_resize_down_lets_running_jobs_finish(rec: Recorder) -> None:
    ex = InternalExecutor("i.test.x", 3)
    try:
        rec.release.clear()
        for i in range(9):
            ex.submit(rec.job(f"t{i}", [f"f{i}"]))
        assert wait_until(lambda: ex.stats().running == 3)
        ex.resize(1)
        assert ex.threads == 1
        # Shrinking interrupts nothing: the three running jobs keep running.
        time.sleep(0.1)
        running = ex.running_jobs()
        assert len(running) == 3 and not any(q.cancelled.is_set() for q in running)
        rec.release.set()
        assert wait_until(lambda: ex.stats().completed == 9)
        assert wait_until(lambda: pool_threads() == 1), "surplus threads did not exit"
        assert ex.stats().failed == 0 and ex.stats().cancelled == 0
    finally:
        rec.release.set()
        ex.shutdown(wait=True, timeout=WAIT_S)


def test_resize_down_then_concurrency_is_one(rec: Recorder) -> None:
    ex = InternalExecutor("i.test.x", 3)
    try:
        ex.resize(1)
        assert wait_until(lambda: pool_threads() == 1)
        rec.release.clear()
        for i in range(4):
            ex.submit(rec.job(f"t{i}", [f"f{i}"]))
        assert wait_until(lambda: ex.stats().running == 1)
        time.sleep(0.2)
        assert ex.stats().running == 1 and rec.peak == 1
        rec.release.set()
        assert wait_until(lambda: ex.stats().completed == 4)
        assert rec.peak == 1
    finally:
        rec.release.set()
        ex.shutdown(wait=True, timeout=WAIT_S)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_workers_and_their_threads_run_at_a_lower_cpu_priority() -> None:
    """Compactions must yield the CPU to writers: a worker and a thread it starts (as a
    compaction starts subcompaction threads) run NICE_INCREMENT above the caller (capped)."""
    seen: list[int] = []
    done = threading.Event()

    def run(q: QueuedJob) -> None:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        child = threading.Thread(
            target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        )
        child.start()
        child.join(WAIT_S)
        done.set()

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    ex = InternalExecutor("i.test.x", 1)
    try:
        ex.submit(QueuedJob("t", make_job(["a"]), run))
        assert done.wait(WAIT_S)
    finally:
        ex.shutdown()
    want = min(19, base + NICE_INCREMENT)
    assert seen == [want, want]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base


def test_resize_rejects_zero_threads() -> None:
    ex = InternalExecutor("i.test.x", 1)
    try:
        with pytest.raises(ValueError, match="i.test.x"):
            ex.resize(0)
        assert ex.threads == 1
    finally:
        ex.shutdown(wait=True, timeout=WAIT_S)


def test_replace_tablet_jobs_semantics(rec: Recorder) -> None:
    ex, blocker = blocked_executor(rec)
    try:
        keep = rec.job("t1", ["a", "b"])
        drop = rec.job("t1", ["c", "d"])
        other = rec.job("t2", ["x", "y"])
        for q in (keep, drop, other):
            ex.submit(q)
        age = keep.created
        # A new plan for t1 still has {a, b} (as a fresh QueuedJob) and adds {e, f}.
        same = rec.job("t1", ["a", "b"])
        new = rec.job("t1", ["e", "f"])
        added = ex.replace_tablet_jobs("t1", [same, new])
        assert added == 1
        queued = ex.queued_jobs()
        assert drop.cancelled.is_set() and drop not in queued
        assert keep in queued and same not in queued and keep.created == age
        assert new in queued and other in queued and not other.cancelled.is_set()
        # A plan for the tablet whose job is running leaves the running job alone.
        assert ex.replace_tablet_jobs("blocker", []) == 0
        assert not blocker.cancelled.is_set() and ex.running_jobs() == [blocker]
        # An empty plan for t1 drops every queued job of t1 and nothing else.
        ex.replace_tablet_jobs("t1", [])
        assert [q.tablet for q in ex.queued_jobs()] == ["t2"]
        assert keep.cancelled.is_set() and new.cancelled.is_set()
        rec.release.set()
        assert wait_until(lambda: ex.stats().completed == 2)
        assert sorted(rec.names()) == ["blocker:b0", "t2:x,y"]
    finally:
        rec.release.set()
        ex.shutdown(wait=True, timeout=WAIT_S)


def test_cancel_queued_and_running(rec: Recorder) -> None:
    ex, blocker = blocked_executor(rec)
    try:
        a, b, c = rec.job("t1", ["a"]), rec.job("t2", ["b"]), rec.job("t1", ["c"])
        for q in (a, b, c):
            ex.submit(q)
        # running=False: only queued jobs of t1 go, the running blocker is not signalled.
        assert ex.cancel(lambda q: q.tablet in ("t1", "blocker"), running=False) == 2
        assert a.cancelled.is_set() and c.cancelled.is_set() and not b.cancelled.is_set()
        assert not blocker.cancelled.is_set()
        assert [q.tablet for q in ex.queued_jobs()] == ["t2"]
        assert ex.stats().cancelled == 2
        # running=True signals the running job; it stops (by raising) and counts as cancelled.
        assert ex.cancel(lambda q: q.tablet == "blocker") == 1
        assert blocker.cancelled.is_set()
        assert wait_until(lambda: blocker not in ex.running_jobs())
        rec.release.set()
        assert wait_until(lambda: ex.stats().running == 0 and ex.stats().completed == 1)
        st = ex.stats()
        assert (st.cancelled, st.failed, st.completed) == (3, 0, 1)
        assert "t1:a" not in rec.names() and "t1:c" not in rec.names()
    finally:
        rec.release.set()
        ex.shutdown(wait=True, timeout=WAIT_S)


def test_failed_job_is_counted_and_pool_survives(rec: Recorder) -> None:
    ex = InternalExecutor("i.test.x", 1)
    try:
        ex.submit(rec.job("t1", ["a"], fail=True))
        ex.submit(rec.job("t2", ["b"]))
        assert wait_until(lambda: ex.stats().completed == 1)
        assert ex.stats().failed == 1
    finally:
        ex.shutdown(wait=True, timeout=WAIT_S)


def test_shutdown_cancels_queued_and_finishes_running(rec: Recorder) -> None:
    ex, blocker = blocked_executor(rec, threads=2)
    queued = [rec.job(f"t{i}", [f"f{i}"]) for i in range(3)]
    for q in queued:
        ex.submit(q)
    ex.shutdown(wait=False)
    assert all(q.cancelled.is_set() for q in queued)
    assert ex.stats().queued == 0 and ex.stats().running == 2
    assert not blocker.cancelled.is_set()
    late = rec.job("late", ["z"])
    ex.submit(late)
    assert late.cancelled.is_set() and ex.stats().queued == 0
    rec.release.set()
    assert wait_until(lambda: ex.stats().running == 0)
    assert ex.stats().completed == 2 and ex.stats().cancelled == 3
    assert wait_until(lambda: pool_threads() == 0)
    assert sorted(rec.names()) == ["blocker:b0", "blocker:b1"]


# -- token bucket ---------------------------------------------------------------------------------


class FakeTime:
    """A clock that only moves when the bucket sleeps (or the test advances it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def bucket(rate: float) -> tuple[TokenBucket, FakeTime]:
    t = FakeTime()
    return TokenBucket(rate, clock=t.clock, sleep=t.sleep), t


def test_bucket_unlimited_never_sleeps() -> None:
    b, t = bucket(0)
    assert b.acquire(10**12) == 0.0
    assert t.slept == []


def test_bucket_burst_then_waits() -> None:
    b, t = bucket(1000)
    assert b.acquire(1000) == 0.0  # a full second's burst is available at once
    assert b.acquire(500) == pytest.approx(0.5)
    assert t.slept == [pytest.approx(0.5)]


def test_bucket_refills_with_time_but_caps_at_one_second() -> None:
    b, t = bucket(1000)
    b.acquire(1000)
    t.now += 0.25
    assert b.acquire(250) == 0.0
    t.now += 60  # a long idle period does not bank more than one second of tokens
    assert b.acquire(1000) == 0.0
    assert b.acquire(100) == pytest.approx(0.1)


def test_bucket_large_request_goes_into_debt() -> None:
    b, t = bucket(1000)
    assert b.acquire(3000) == pytest.approx(2.0)
    # Sleeping 2 s paid the debt exactly: the bucket is empty, not negative.
    assert b.acquire(1000) == pytest.approx(1.0)


def test_bucket_long_run_rate() -> None:
    b, t = bucket(1000)
    start = t.now
    for _ in range(20):
        b.acquire(500)
    # 10,000 bytes at 1000 B/s with a 1000-byte burst: 9 seconds.
    assert t.now - start == pytest.approx(9.0)


def test_bucket_set_rate() -> None:
    b, t = bucket(1000)
    b.set_rate(100)
    assert b.rate == 100
    # The burst shrinks to the new rate at once.
    assert b.acquire(100) == 0.0
    assert b.acquire(50) == pytest.approx(0.5)
    b.set_rate(0)
    assert b.acquire(10**9) == 0.0


def test_bucket_is_shared_by_threads() -> None:
    """Concurrent callers together get the rate, not the rate each (real clock, small rate)."""
    b = TokenBucket(20_000)
    b.acquire(20_000)  # start empty
    start = time.monotonic()

    def worker() -> None:
        for _ in range(5):
            b.acquire(1000)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(WAIT_S)
    elapsed = time.monotonic() - start
    # 20,000 bytes at 20,000 B/s from an empty bucket: about one second, certainly not 0.25.
    assert elapsed >= 0.9
