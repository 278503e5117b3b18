"""The coordinator's external queues: order, replacement per tablet, bounds and counters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lithify.coordinator.queues import ExternalQueues, PlannedJob, queue_of
from lithify.data.ranges import Extent, FileRef


def ext(i: int, table: str = "t") -> Extent:
    return Extent(table, None if i == 0 else b"%04d" % (i - 1), b"%04d" % i)


def job(prio: int, nfiles: int = 1, queue: str = "q", tag: str = "", kind: str = "SYSTEM"):
    files = tuple(FileRef(f"tables/t/F{tag}{prio}_{k}.parquet", 10, 1) for k in range(nfiles))
    return PlannedJob(files, f"e.{queue}", prio, kind)


def take_all(q: ExternalQueues, name: str = "q") -> list:
    out = []
    while (j := q.take(name)) is not None:
        out.append(j)
    return out


def test_order_is_priority_then_files_then_oldest() -> None:
    q = ExternalQueues()
    q.plan(ext(1), [job(5, 1, tag="a")], now=1.0)
    q.plan(ext(2), [job(5, 3, tag="b")], now=2.0)
    q.plan(ext(3), [job(9, 1, tag="c")], now=3.0)
    q.plan(ext(4), [job(5, 1, tag="d")], now=4.0)
    got = [(j.extent, j.job.priority, len(j.job.files)) for j in take_all(q)]
    assert got == [(ext(3), 9, 1), (ext(2), 5, 3), (ext(1), 5, 1), (ext(4), 5, 1)]
    assert q.take("q") is None
    assert q.take("never-used") is None


def test_a_new_plan_replaces_the_tablets_jobs_in_every_queue() -> None:
    q = ExternalQueues()
    q.plan(ext(1), [job(1, queue="a"), job(2, queue="b")], now=0.0)
    q.plan(ext(2), [job(3, queue="a")], now=0.0)
    q.plan(ext(1), [job(7, queue="a", tag="new")], now=1.0)
    assert q.depth("a") == 2 and q.depth("b") == 0
    assert [j.job.priority for j in take_all(q, "a")] == [7, 3]
    q.plan(ext(2), [job(3, queue="a")], now=2.0)
    q.plan(ext(2), [], now=3.0)  # an empty plan clears the tablet
    assert len(q) == 0
    assert q.jobs_of(ext(2)) == []


def test_bounded_queue_rejects_the_lowest_ranked_job() -> None:
    q = ExternalQueues(max_jobs=3)
    for i, prio in enumerate([5, 1, 9]):
        assert len(q.plan(ext(i), [job(prio)], now=float(i))) == 1
    # A better job pushes out the worst (priority 1) ...
    assert len(q.plan(ext(10), [job(7)], now=10.0)) == 1
    # ... and a worse one is itself rejected.
    assert q.plan(ext(11), [job(0)], now=11.0) == []
    stats = q.stats(now=20.0)["q"]
    assert (stats.queued, stats.rejected, stats.depth) == (5, 2, 3)
    assert q.jobs_of(ext(1)) == [] and q.jobs_of(ext(11)) == []
    assert [j.job.priority for j in take_all(q)] == [9, 7, 5]
    assert q.stats(now=20.0)["q"].dequeued == 3


def test_rejection_within_one_plan_keeps_the_tablet_list_consistent() -> None:
    q = ExternalQueues(max_jobs=2)
    accepted = q.plan(ext(1), [job(1, tag="x"), job(2, tag="y"), job(3, tag="z")], now=0.0)
    assert [j.job.priority for j in accepted] == [2, 3]
    assert [j.job.priority for j in q.jobs_of(ext(1))] == [2, 3]
    q.plan(ext(1), [], now=1.0)
    assert len(q) == 0


def test_oldest_age_and_stats() -> None:
    q = ExternalQueues()
    q.plan(ext(1), [job(1)], now=10.0)
    q.plan(ext(2), [job(9)], now=15.0)
    assert q.stats(now=20.0)["q"].oldest_age_s == pytest.approx(10.0)
    q.take("q")  # the priority-9 job, the younger one
    assert q.stats(now=20.0)["q"].oldest_age_s == pytest.approx(10.0)
    q.take("q")
    assert q.stats(now=20.0)["q"].oldest_age_s == 0.0


def test_put_back_unless_the_tablet_was_planned_again() -> None:
    q = ExternalQueues()
    q.plan(ext(1), [job(4, tag="a"), job(3, tag="b")], now=0.0)
    first = q.take("q")
    assert first is not None and q.put_back(first)
    assert [j.job.priority for j in take_all(q)] == [4, 3]
    q.plan(ext(1), [job(4)], now=1.0)
    stale = q.take("q")
    assert stale is not None
    q.plan(ext(1), [], now=2.0)  # replanned meanwhile: the taken job is superseded
    assert not q.put_back(stale)
    assert len(q) == 0


def test_remove_where_for_cancellation() -> None:
    q = ExternalQueues()
    q.plan(ext(1, "t"), [job(1, kind="USER")], now=0.0)
    q.plan(ext(2, "t"), [job(2)], now=0.0)
    q.plan(ext(1, "u"), [job(3, kind="USER")], now=0.0)
    n = q.remove_where(lambda j: j.extent.table_id == "t" and j.job.kind == "USER")
    assert n == 1
    assert sorted(j.job.priority for j in q.all_jobs()) == [2, 3]
    assert q.jobs_of(ext(1, "t")) == []


def test_only_external_executors() -> None:
    assert queue_of("e.DCQ1") == "DCQ1"
    for bad in ("i.default.small", "e.", "DCQ1"):
        with pytest.raises(ValueError):
            queue_of(bad)
    with pytest.raises(ValueError):
        ExternalQueues(max_jobs=0)


@settings(max_examples=80, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(
                st.just("plan"),
                st.integers(0, 5),
                st.lists(st.tuples(st.integers(-3, 3), st.integers(1, 3)), max_size=3),
            ),
            st.tuples(st.just("take"), st.just(0), st.just([])),
        ),
        max_size=40,
    ),
    cap=st.integers(1, 6),
)
def test_matches_a_simple_model(ops: list, cap: int) -> None:
    """Against a brute-force model: a list re-sorted after every change."""
    q = ExternalQueues(max_jobs=cap)
    model: list[tuple[tuple, Extent, int]] = []  # (order key, extent, priority)
    seq = 0
    for op, tablet, jobs in ops:
        if op == "plan":
            model = [m for m in model if m[1] != ext(tablet)]
            for prio, nfiles in jobs:
                model.append(((-prio, -nfiles, seq), ext(tablet), prio))
                seq += 1
                model.sort()
                if len(model) > cap:
                    model.pop()
            q.plan(ext(tablet), [job(p, n, tag=str(i)) for i, (p, n) in enumerate(jobs)], 0.0)
        else:
            got = q.take("q")
            want = model.pop(0) if model else None
            assert (got is None) == (want is None)
            if got is not None and want is not None:
                assert (got.extent, got.job.priority) == (want[1], want[2])
        assert q.depth("q") == len(model)
        assert len(q) == len(model)
