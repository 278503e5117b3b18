"""The planner's rules one at a time (PLANNER.md), and properties that must hold for any input.

The acceptance cases (test_planner_cases.py) pin down known plans; these tests say why each rule
exists: projected files, the size cap, forced sets, the look-ahead limit (Fix 1), the lower-ratio
rescue, executor choice, and the priority bands (Fix 2).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lithify.compaction.planner import (
    DefaultCompactionPlanner,
    choose_executor,
    find_files_to_compact,
)
from lithify.compaction.priority import (
    OVERSIZE_MAX,
    OVERSIZE_MIN,
    SYSTEM_MAX,
    SYSTEM_MIN,
    USER_MAX,
    USER_MIN,
    job_order_key,
    job_priority,
    queue_order_key,
    system_priority,
    user_priority,
)
from lithify.compaction.spi import (
    CompactableFile,
    CompactionJob,
    CompactionKind,
    CompactionPlan,
    PlanningParameters,
    RunningCompaction,
)

SYSTEM = CompactionKind.SYSTEM
USER = CompactionKind.USER
M = 2**20

THREE_EXECUTORS = json.dumps(
    [
        {"name": "small", "maxSize": "32M", "numThreads": 1},
        {"name": "medium", "maxSize": "128M", "numThreads": 1},
        {"name": "large", "type": "external", "queue": "DCQ1"},
    ]
)


def f(name: str, size: int) -> CompactableFile:
    return CompactableFile(f"file:///t/{name}", size, 0)


def names(files: Sequence[CompactableFile]) -> list[str]:
    return sorted(x.uri.rsplit("/", 1)[1] for x in files)


def planner(max_open: int = 10, executors: str = THREE_EXECUTORS, **opts: str):
    p = DefaultCompactionPlanner()
    p.init("cs1", {"executors": executors, "maxOpen": str(max_open), **opts})
    return p


def plan(
    p: DefaultCompactionPlanner,
    kind: CompactionKind,
    all_files: Sequence[CompactableFile],
    candidates: Sequence[CompactableFile] | None = None,
    running: Sequence[RunningCompaction] = (),
    ratio: float = 2.0,
    table_file_max: int = 15,
) -> list[CompactionJob]:
    params = PlanningParameters(
        kind=kind,
        ratio=ratio,
        all_files=tuple(all_files),
        candidates=tuple(all_files if candidates is None else candidates),
        running=tuple(running),
        table_file_max=table_file_max,
    )
    return list(p.make_plan(params).jobs)


def doubling(n: int, prefix: str = "D", unit: int = M) -> list[CompactableFile]:
    """Files whose sizes double: no set of them meets a ratio >= 2."""
    return [f(f"{prefix}{i:03d}", unit << i) for i in range(n)]


# -- interface objects ----------------------------------------------------------------------------


def test_compactable_file_identity_is_its_uri() -> None:
    assert f("a", 1) == CompactableFile("file:///t/a", 99, 7)
    assert len({f("a", 1), f("a", 2), f("b", 1)}) == 2


def test_job_and_plan_normalise_to_tuples() -> None:
    job = CompactionJob([f("a", 1)], "i.cs1.small", 1, USER)  # type: ignore[arg-type]
    assert job.files == (f("a", 1),)
    assert job.total_size == 1
    assert CompactionPlan([job]).jobs == (job,)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CompactionJob((), "i.cs1.small", 1, USER)


def test_effective_table_file_max() -> None:
    params = PlanningParameters(SYSTEM, 3.0, (), (), table_file_max=0)
    assert params.effective_table_file_max == 99
    params = PlanningParameters(SYSTEM, 3.0, (), (), table_file_max=-1, scan_files_open_max=50)
    assert params.effective_table_file_max == 49
    assert PlanningParameters(SYSTEM, 3.0, (), ()).effective_table_file_max == 15


def test_make_plan_before_init_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        DefaultCompactionPlanner().make_plan(PlanningParameters(SYSTEM, 3.0, (), ()))


# -- ratio search ---------------------------------------------------------------------------------


def test_ties_break_by_uri() -> None:
    files = [f(n, M) for n in "edcba"]
    assert names(find_files_to_compact(files, 2.5, 3, None)) == ["a", "b", "c"]


def test_fewer_than_two_files_under_the_cap() -> None:
    files = [f("a", 10 * M), f("b", 100 * M), f("c", 100 * M)]
    assert find_files_to_compact(files, 1.0, 10, 50 * M) == []
    assert find_files_to_compact(files[:1], 1.0, 10, None) == []
    assert find_files_to_compact([], 1.0, 10, None) == []


def test_ratio_is_strict() -> None:
    # 2 * 10 == 20: not met at ratio 2, met just below.
    files = [f("a", 10), f("b", 10)]
    assert find_files_to_compact(files, 2.0, 10, None) == []
    assert len(find_files_to_compact(files, 1.99, 10, None)) == 2


def test_cap_is_inclusive() -> None:
    files = [f("a", 10), f("b", 10), f("c", 10)]
    assert len(find_files_to_compact(files, 1.0, 10, 30)) == 3
    assert len(find_files_to_compact(files, 1.0, 10, 29)) == 2


def test_earlier_smaller_best_kept_when_it_does_not_block_the_larger() -> None:
    # {1,1,1,1} meets the ratio, {4,...} later too; the small set's total (4M) does not exceed
    # the next set's largest file (5M), so compacting it first is kept.
    sizes = [1, 1, 1, 1, 5, 5, 5, 5]
    files = [f(f"f{i}", s * M) for i, s in enumerate(sizes)]
    assert names(find_files_to_compact(files, 3.0, 100, None)) == ["f0", "f1", "f2", "f3"]


# -- projected files and running compactions ------------------------------------------------------


def test_projected_file_sorts_after_real_files_of_equal_size() -> None:
    a, b, c = f("a", 10 * M), f("b", 10 * M), f("c", 10 * M)
    x, y = f("x", 5 * M), f("y", 5 * M)
    running = [RunningCompaction(SYSTEM, (x, y))]  # projected output: 10M, like a, b and c
    jobs = plan(planner(max_open=3), SYSTEM, [a, b, c, x, y], [a, b, c], running)
    assert [names(j.files) for j in jobs] == [["a", "b", "c"]]


def test_running_job_of_other_kind_is_ignored() -> None:
    a, b, c = f("a", 10 * M), f("b", 10 * M), f("c", 10 * M)
    x, y = f("x", 5 * M), f("y", 5 * M)
    running = [RunningCompaction(USER, (x, y))]
    jobs = plan(planner(max_open=10), SYSTEM, [a, b, c, x, y], [a, b, c], running)
    assert [names(j.files) for j in jobs] == [["a", "b", "c"]]


def test_set_with_projected_file_is_merged_and_planning_goes_on() -> None:
    # {a, projected} is the first set; it is not a job, but its output joins the pool and the
    # next window yields the real job {c, d}.
    a, c, d = f("a", M), f("c", 10 * M), f("d", 10 * M)
    x, y = f("x", M // 2), f("y", M // 2)
    running = [RunningCompaction(SYSTEM, (x, y))]
    jobs = plan(planner(max_open=2), SYSTEM, [a, c, d, x, y], [a, c, d], running, ratio=1.5)
    assert [names(j.files) for j in jobs] == [["c", "d"]]


def test_planning_stops_after_a_short_set() -> None:
    # The first set has fewer than maxOpen files: the ratio stopped being met, so stop there.
    small = [f(f"s{i}", M) for i in range(4)]
    big = [f(f"b{i}", 100 * M) for i in range(2)]
    jobs = plan(planner(max_open=10), SYSTEM, small + big, ratio=3.0)
    assert [names(j.files) for j in jobs] == [["s0", "s1", "s2", "s3"]]


def test_several_jobs_when_sets_are_full() -> None:
    files = [f(f"f{i:02d}", M) for i in range(25)]
    jobs = plan(planner(max_open=5), SYSTEM, files, ratio=2.0)
    assert len(jobs) == 5
    assert all(len(j.files) == 5 for j in jobs)
    assert {x for j in jobs for x in names(j.files)} == set(names(files))


# -- size cap and executors -----------------------------------------------------------------------


def test_system_cap_is_the_largest_executors_max_size() -> None:
    capped = json.dumps(
        [
            {"name": "small", "maxSize": "32M", "numThreads": 1},
            {"name": "top", "maxSize": "64M", "numThreads": 1},
        ]
    )
    files = [f(f"f{i}", 20 * M) for i in range(5)]
    jobs = plan(planner(executors=capped), SYSTEM, files)
    assert [len(j.files) for j in jobs] == [3]  # 3 * 20M = 60M <= 64M
    # USER is never capped; the largest executor takes what nothing else can.
    jobs = plan(planner(executors=capped), USER, files)
    assert [len(j.files) for j in jobs] == [5]
    assert jobs[0].executor == "i.cs1.top"


def test_no_cap_when_largest_executor_is_unbounded() -> None:
    files = [f(f"f{i}", 100 * M) for i in range(6)]
    jobs = plan(planner(), SYSTEM, files)
    assert [len(j.files) for j in jobs] == [6]
    assert jobs[0].executor == "e.DCQ1"


def test_executor_choice_is_strictly_greater() -> None:
    specs = planner().executors
    assert choose_executor(specs, 32 * M - 1).name == "small"
    assert choose_executor(specs, 32 * M).name == "medium"
    assert choose_executor(specs, 128 * M).name == "large"
    capped = planner(executors='[{"name": "only", "maxSize": "1M", "numThreads": 1}]').executors
    assert choose_executor(capped, 10 * M).name == "only"


# -- USER: look-ahead and forced sets -------------------------------------------------------------


def test_look_ahead_only_when_all_candidates_fit_in_one_job() -> None:
    # Fix 1: with maxOpen 4, {3,4,5,6} is found; the look-ahead would take all five files, more
    # than maxOpen, so it does not apply.
    files = [f("a", 3 * M), f("b", 4 * M), f("c", 5 * M), f("d", 6 * M), f("e", 50 * M)]
    jobs = plan(planner(max_open=4), USER, files)
    assert [names(j.files) for j in jobs] == [["a", "b", "c", "d"]]
    jobs = plan(planner(max_open=5), USER, files)
    assert [names(j.files) for j in jobs] == [["a", "b", "c", "d", "e"]]


@pytest.mark.parametrize(
    ("n", "max_open", "expected_sizes"),
    [
        (1, 5, [1]),  # a single file is still compacted for a user
        (5, 5, [5]),
        (6, 5, [2]),  # 6 - 5 + 1: the next pass has exactly maxOpen files
        (9, 5, [5]),
        (10, 5, [5]),  # 10 // 5 - 1 = 1 batch
        (17, 5, [5, 5]),
        (30, 10, [10, 10]),
    ],
)
def test_forced_sets(n: int, max_open: int, expected_sizes: list[int]) -> None:
    files = doubling(n)
    jobs = plan(planner(max_open=max_open), USER, files, ratio=2.0)
    assert sorted(len(j.files) for j in jobs) == expected_sizes
    chosen = sorted(x for j in jobs for x in names(j.files))
    assert chosen == names(files)[: len(chosen)]  # always the smallest files
    assert all(len(set(names(j.files))) == len(j.files) for j in jobs)


def test_no_forced_sets_while_a_user_job_runs() -> None:
    files = doubling(8)
    running = [RunningCompaction(USER, (f("r1", M), f("r2", M)))]
    assert plan(planner(max_open=5), USER, files, running=running) == []
    running = [RunningCompaction(SYSTEM, (f("r1", M), f("r2", M)))]
    assert len(plan(planner(max_open=5), USER, files, running=running)) == 1


def test_system_never_forced() -> None:
    assert plan(planner(max_open=5), SYSTEM, doubling(4), table_file_max=15) == []


# -- lower-ratio rescue ---------------------------------------------------------------------------


def test_rescue_takes_the_highest_needed_ratio() -> None:
    # Ratio 3 is never met; prefix {1, 1.5} needs 2.5/1.5 = 1.67, {1, 1.5, 2} needs 4.5/2 = 2.25,
    # {.., 8} needs 12.5/8 = 1.56.
    files = [f("a", 1000), f("b", 1500), f("c", 2000), f("d", 8000)]
    jobs = plan(planner(max_open=10), SYSTEM, files, ratio=3.0, table_file_max=3)
    assert [names(j.files) for j in jobs] == [["a", "b", "c"]]


def test_rescue_conditions() -> None:
    files = [f("a", 1000), f("b", 1500), f("c", 2000), f("d", 8000)]
    p = planner(max_open=10)
    # Not over table.file.max.
    assert plan(p, SYSTEM, files, ratio=3.0, table_file_max=4) == []
    # A compaction running (of any kind).
    running = [RunningCompaction(USER, (f("z", 10),))]
    assert plan(p, SYSTEM, files, running=running, ratio=3.0, table_file_max=3) == []
    # Not every file a candidate.
    assert plan(p, SYSTEM, files, files[:3], ratio=3.0, table_file_max=2) == []
    # USER never rescues (it has forced sets instead).
    assert [len(j.files) for j in plan(p, USER, files, ratio=3.0, table_file_max=3)] == [4]


def test_rescue_must_beat_lowest_ratio() -> None:
    files = doubling(10)  # every prefix of the 10 needs just under 2
    best = (2**10 - 1) / 2**9
    jobs = plan(planner(lowestRatio=str(best - 0.001)), SYSTEM, files, ratio=3.0, table_file_max=5)
    assert [len(j.files) for j in jobs] == [10]
    jobs = plan(planner(lowestRatio=str(best)), SYSTEM, files, ratio=3.0, table_file_max=5)
    assert jobs == []


def test_rescue_later_prefix_wins_a_tie() -> None:
    # Equal sizes: every prefix of length k needs ratio k; with maxOpen 3 the windows tie at 3 and
    # the last window wins.
    files = [f(f"f{i}", 1000) for i in range(5)]
    jobs = plan(planner(max_open=3), SYSTEM, files, ratio=10.0, table_file_max=4)
    assert [names(j.files) for j in jobs] == [["f2", "f3", "f4"]]


def test_rescue_skips_empty_files() -> None:
    files = [f("a", 0), f("b", 0), f("c", 0)]
    assert plan(planner(), SYSTEM, files, ratio=3.0, table_file_max=2) == []


# -- priorities -----------------------------------------------------------------------------------


def test_priority_formulas() -> None:
    assert user_priority(10, 4) == 15
    assert user_priority(50_000, 10) == USER_MAX
    assert system_priority(20, 5, 15) == OVERSIZE_MIN + 5 + 5
    assert system_priority(5000, 10, 15) == OVERSIZE_MAX
    assert system_priority(12, 3, 15) == SYSTEM_MIN + 15
    assert system_priority(40_000, 10, 50_000) == SYSTEM_MAX
    assert job_priority(USER, 10, 4, 15) == 15
    assert job_priority(SYSTEM, 10, 4, 15) == SYSTEM_MIN + 14


def test_fix2_oversize_band_only_over_the_limit() -> None:
    # Exactly at table.file.max is not over it.
    assert SYSTEM_MIN <= system_priority(15, 3, 15) <= SYSTEM_MAX
    assert system_priority(16, 3, 15) >= OVERSIZE_MIN


def test_bands_order_work() -> None:
    routine = system_priority(100, 10, 200)
    user = user_priority(2, 2)
    oversize = system_priority(16, 2, 15)
    assert routine < user < oversize


def test_planner_assigns_priorities() -> None:
    p = planner(max_open=10)
    small = [f(f"s{i}", M) for i in range(4)]
    big = [f(f"b{i}", 100 * M) for i in range(2)]
    (job,) = plan(p, SYSTEM, small + big, ratio=3.0, table_file_max=15)
    assert job.priority == SYSTEM_MIN + 6 + 4
    (job,) = plan(p, SYSTEM, small + big, ratio=3.0, table_file_max=5)
    assert job.priority == OVERSIZE_MIN + 4 + 1
    # table.file.max <= 0 means 99: routine band.
    (job,) = plan(p, SYSTEM, small + big, ratio=3.0, table_file_max=0)
    assert job.priority == SYSTEM_MIN + 6 + 4
    (job,) = plan(p, USER, small + big, ratio=3.0)
    assert job.priority == USER_MIN + 6 + len(job.files)


def test_queue_order() -> None:
    jobs = [
        (CompactionJob((f("a", 1),), "x", 5, SYSTEM), 3.0),
        (CompactionJob((f("a", 1), f("b", 1)), "x", 5, SYSTEM), 4.0),
        (CompactionJob((f("a", 1), f("b", 1)), "x", 5, SYSTEM), 1.0),
        (CompactionJob((f("a", 1),), "x", 9, USER), 9.0),
        (CompactionJob((f("a", 1),), "x", -3, SYSTEM), 0.0),
    ]
    ordered = sorted(jobs, key=lambda jc: job_order_key(*jc))
    assert [(j.priority, len(j.files), c) for j, c in ordered] == [
        (9, 1, 9.0),
        (5, 2, 1.0),
        (5, 2, 4.0),
        (5, 1, 3.0),
        (-3, 1, 0.0),
    ]
    assert queue_order_key(5, 2, 1.0) == job_order_key(jobs[2][0], 1.0)


# -- properties for any input ---------------------------------------------------------------------

sizes_st = st.lists(
    st.one_of(st.integers(0, 4 * M), st.integers(0, 2**34)), min_size=0, max_size=40
)


@st.composite
def tablets(draw: st.DrawFn):
    sizes = draw(sizes_st)
    files = [f(f"f{i:03d}", s) for i, s in enumerate(sizes)]
    order = draw(st.permutations(range(len(files))))
    running: list[RunningCompaction] = []
    reserved: set[int] = set()
    pos = 0
    for _ in range(draw(st.integers(0, 3))):
        take = draw(st.integers(1, 4))
        group = order[pos : pos + take]
        pos += take
        if group:
            kind = draw(st.sampled_from([SYSTEM, USER]))
            running.append(RunningCompaction(kind, tuple(files[i] for i in group)))
            reserved.update(group)
    free = [files[i] for i in range(len(files)) if i not in reserved]
    candidates = [x for x in free if draw(st.booleans())] if draw(st.booleans()) else free
    return files, candidates, running


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tablet=tablets(),
    kind=st.sampled_from([SYSTEM, USER]),
    ratio=st.floats(1.0, 5.0),
    max_open=st.integers(2, 12),
    table_file_max=st.integers(-1, 20),
    lowest_ratio=st.floats(1.0, 3.0),
)
def test_plan_invariants(
    tablet: tuple[list[CompactableFile], list[CompactableFile], list[RunningCompaction]],
    kind: CompactionKind,
    ratio: float,
    max_open: int,
    table_file_max: int,
    lowest_ratio: float,
) -> None:
    files, candidates, running = tablet
    p = planner(max_open=max_open, lowestRatio=repr(lowest_ratio))
    jobs = plan(p, kind, files, candidates, running, ratio, table_file_max)
    ids = {s.executor_id for s in p.executors}
    seen: set[str] = set()
    candidate_uris = {x.uri for x in candidates}
    for job in jobs:
        uris = [x.uri for x in job.files]
        assert 1 <= len(uris) <= max_open
        assert len(set(uris)) == len(uris)
        assert set(uris) <= candidate_uris, "a job may only use candidates"
        assert seen.isdisjoint(uris), "jobs must be disjoint"
        seen.update(uris)
        assert job.executor in ids
        assert job.kind == kind
        if kind == SYSTEM:
            assert len(uris) >= 2
            assert SYSTEM_MIN <= job.priority <= OVERSIZE_MAX
        else:
            assert len(uris) >= 2 or len(candidates) == 1
            assert USER_MIN <= job.priority <= USER_MAX
    if not candidates:
        assert jobs == []


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(0, 2**33), min_size=1, max_size=60), max_open=st.integers(2, 12))
def test_user_compaction_converges_to_one_file(sizes: list[int], max_open: int) -> None:
    """Applying USER plans repeatedly ends with one job over every remaining candidate."""
    p = planner(max_open=max_open)
    files = [f(f"f{i:03d}", s) for i, s in enumerate(sizes)]
    for round_no in range(len(sizes) + 1):
        jobs = plan(p, USER, files, ratio=3.0)
        assert jobs, "a user compaction must always make progress"
        if any(len(j.files) == len(files) for j in jobs):
            return
        for k, job in enumerate(jobs):
            out = f(f"r{round_no:03d}_{k}", job.total_size)
            files = [x for x in files if x not in job.files] + [out]
    pytest.fail("user compaction did not converge")


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(1, 2**33), min_size=0, max_size=40), ratio=st.floats(1.0, 5.0))
def test_find_result_meets_ratio_and_window(sizes: list[int], ratio: float) -> None:
    files = [f(f"f{i:03d}", s) for i, s in enumerate(sizes)]
    chosen = find_files_to_compact(files, ratio, 10, None)
    if not chosen:
        return
    assert 2 <= len(chosen) <= 10
    total = sum(x.size for x in chosen)
    assert max(x.size for x in chosen) * ratio < total
    ordered = sorted(files, key=lambda x: (x.size, x.uri))
    start = ordered.index(chosen[0])
    assert ordered[start : start + len(chosen)] == chosen  # consecutive files, smallest first
