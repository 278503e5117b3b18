"""The default compaction planner: Accumulo's ratio planner, as specified in PLANNER.md.

The idea: a tablet's files are kept in a roughly logarithmic set of sizes. A set of files is worth
merging when its largest file is small next to the total (`largest * ratio < total`), because then
every byte rewritten buys a real reduction in the number of files. The planner looks for the
largest such set among the smallest files, never more than `maxOpen` files at once, and sends it
to the executor sized for it.

Two deliberate fixes against Accumulo are described in PLANNER.md: a job never holds more than
`maxOpen` files (Fix 1), and the priority band for tablets over `table.file.max` is used only
when the tablet really is over it (Fix 2, in `priority.py`).

Planning runs after every flush and periodically for every tablet, so the inner loops work on
plain lists of sizes and prefix sums and only build job objects at the end.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from itertools import accumulate
from operator import attrgetter

from lithify.compaction.executors_config import (
    DEFAULT_LOWEST_RATIO,
    DEFAULT_MAX_OPEN,
    ExecutorSpec,
    PlannerOptions,
    parse_planner_options,
)
from lithify.compaction.priority import job_priority
from lithify.compaction.spi import (
    CompactableFile,
    CompactionJob,
    CompactionKind,
    CompactionPlan,
    CompactionPlanner,
    PlanningParameters,
)

__all__ = [
    "DEFAULT_EXECUTORS_JSON",
    "DEFAULT_LOWEST_RATIO",
    "DEFAULT_MAX_OPEN",
    "DefaultCompactionPlanner",
    "choose_executor",
    "find_files_to_compact",
]

#: The executors of the `default` service out of the box.
DEFAULT_EXECUTORS_JSON = (
    '[{"name": "small", "type": "internal", "maxSize": "32M", "numThreads": 2}, '
    '{"name": "medium", "type": "internal", "maxSize": "128M", "numThreads": 2}, '
    '{"name": "large", "type": "internal", "numThreads": 2}]'
)

_SIZE_URI = attrgetter("size", "uri")
_EMPTY_PLAN = CompactionPlan()
_USER = CompactionKind.USER
_SYSTEM = CompactionKind.SYSTEM


def _capped_count(prefix: Sequence[int], max_size: int | None) -> int:
    """How many of the smallest files fit under `max_size` (all of them without a cap)."""
    n = len(prefix) - 1
    if max_size is None or prefix[n] <= max_size:
        return n
    return bisect_right(prefix, max_size) - 1


def _search(
    sizes: Sequence[int],
    prefix: Sequence[int],
    ratio: float,
    max_files: int,
    max_size: int | None,
) -> tuple[int, int]:
    """The ratio search over ascending `sizes` (with `prefix[k]` = sum of the first k sizes).

    Returns the chosen files as the index range [start, end), or (0, 0) when nothing qualifies.
    Any chosen set is a prefix of a window of consecutive files, hence a range.
    """
    n = _capped_count(prefix, max_size)
    if n < 2:
        return (0, 0)
    width = max_files if max_files < n else n
    for start in range(max(1, n - max_files + 1)):
        end = start + width
        base = prefix[start]
        good = -1
        best = -1
        best_total = 0
        for c in range(start + 1, end):
            size = sizes[c]
            if size * ratio < prefix[c + 1] - base:
                good = c
            elif good == c - 1:
                # The prefix ending at `good` met the ratio and this file breaks it. Prefer it
                # unless a smaller best exists that does not grow past this prefix's largest file:
                # compacting that one first does not stop this one from being compacted later.
                if best < 0 or best_total > sizes[good]:
                    best = good
                    best_total = prefix[c] - base
                else:
                    break
        if good == end - 1 and (best < 0 or best_total > sizes[good]):
            best = good
        if best >= 0:
            return (start, best + 1)
    return (0, 0)


def find_files_to_compact(
    files: Iterable[CompactableFile],
    ratio: float,
    max_files: int,
    max_size: int | None,
) -> list[CompactableFile]:
    """The set of files the ratio search picks, smallest first; empty when none qualifies.

    Files are ordered by (size, URI). With `max_size`, only the longest run of smallest files
    whose total is <= `max_size` is considered. See PLANNER.md "Ratio search".
    """
    ordered = sorted(files, key=_SIZE_URI)
    sizes = [f.size for f in ordered]
    start, end = _search(sizes, [0, *accumulate(sizes)], ratio, max_files, max_size)
    return ordered[start:end]


def choose_executor(executors: Sequence[ExecutorSpec], total_size: int) -> ExecutorSpec:
    """The first executor (ascending `max_size`) that takes more than `total_size` bytes.

    An executor without `max_size` takes anything; if none fits, the largest executor runs it.
    """
    for spec in executors:
        if spec.max_size is None or spec.max_size > total_size:
            return spec
    return executors[-1]


def _forced_sets(ordered: list[CompactableFile], max_open: int) -> list[list[CompactableFile]]:
    """USER sets when the ratio finds nothing: progress towards one file, never over `max_open`.

    When the files are not many more than `max_open`, compact only as many of the smallest as
    needed for the next pass to hold exactly `max_open` files, so that the last pass (which has
    to rewrite everything) is not preceded by a needlessly big one.
    """
    n = len(ordered)
    if n <= max_open:
        return [ordered]
    batches = n // max_open - 1
    if batches > 0:
        return [ordered[k * max_open : (k + 1) * max_open] for k in range(batches)]
    return [ordered[: n - max_open + 1]]


def _lower_ratio_rescue(
    ordered: list[CompactableFile],
    max_open: int,
    max_size: int | None,
    lowest_ratio: float,
) -> list[CompactableFile] | None:
    """For a tablet over `table.file.max` with nothing to do: the set with the best ratio.

    Over the same windows as the ratio search, each prefix of two or more files with a non-empty
    largest file could be compacted at any ratio below `total / largest`; take the prefix where
    that is highest (a later one on a tie), if it beats `lowest_ratio`.
    """
    sizes = [f.size for f in ordered]
    n = _capped_count([0, *accumulate(sizes)], max_size)
    if n < 2:
        return None
    width = max_open if max_open < n else n
    best_ratio = -1.0
    best_start = best_end = 0
    for start in range(max(1, n - max_open + 1)):
        total = sizes[start]
        for c in range(start + 1, start + width):
            size = sizes[c]
            total += size
            if size > 0:
                needed = total / size
                if needed >= best_ratio:
                    best_ratio = needed
                    best_start = start
                    best_end = c + 1
    if best_ratio > lowest_ratio:
        return ordered[best_start:best_end]
    return None


class DefaultCompactionPlanner(CompactionPlanner):
    """The ratio planner of PLANNER.md, with internal and external executors.

    Options (`tserver.compaction.major.service.<svc>.planner.opts.*`): `executors` (JSON; the
    `default` service has `DEFAULT_EXECUTORS_JSON` when it is not set), `maxOpen` (default 10),
    `lowestRatio` (default 1.1). Stateless between calls, so one instance serves many threads.
    """

    def __init__(self) -> None:
        self._service = ""
        self._options: PlannerOptions | None = None

    def init(self, service: str, options: Mapping[str, str]) -> None:
        default_executors = DEFAULT_EXECUTORS_JSON if service == "default" else None
        parsed = parse_planner_options(service, options, default_executors=default_executors)
        self._service = service
        # One assignment, so a plan made while init runs sees either the old or the new options.
        self._options = parsed

    @property
    def service(self) -> str:
        return self._service

    @property
    def executors(self) -> tuple[ExecutorSpec, ...]:
        """The executors, in ascending `max_size` order (the unbounded one last)."""
        return self._options.executors if self._options else ()

    @property
    def max_open(self) -> int:
        return self._options.max_open if self._options else DEFAULT_MAX_OPEN

    @property
    def lowest_ratio(self) -> float:
        return self._options.lowest_ratio if self._options else DEFAULT_LOWEST_RATIO

    def make_plan(self, params: PlanningParameters) -> CompactionPlan:
        options = self._options
        if options is None:
            raise RuntimeError("DefaultCompactionPlanner.make_plan called before init")
        candidates = params.candidates
        if not candidates:
            return _EMPTY_PLAN
        kind = params.kind
        ratio = params.ratio
        max_open = options.max_open
        executors = options.executors
        # SYSTEM jobs never exceed what the largest executor is meant to take; USER has no cap.
        cap = executors[-1].max_size if kind == _SYSTEM else None

        ordered = sorted(candidates, key=_SIZE_URI)
        # The pool: parallel lists of sizes and files, ascending; None marks a projected file
        # (the future output of a running or planned job).
        sizes = [f.size for f in ordered]
        pool: list[CompactableFile | None] = list(ordered)
        projected = 0
        for running in params.running:
            if running.kind == kind:
                total = sum(f.size for f in running.files)
                at = bisect_right(sizes, total)
                sizes.insert(at, total)
                pool.insert(at, None)
                projected += 1

        found: list[list[CompactableFile]] = []
        while True:
            prefix = [0, *accumulate(sizes)]
            start, end = _search(sizes, prefix, ratio, max_open, cap)
            if start == end:
                break
            chosen = pool[start:end]
            in_chosen = sum(1 for f in chosen if f is None) if projected else 0
            total = prefix[end] - prefix[start]
            del sizes[start:end]
            del pool[start:end]
            at = bisect_right(sizes, total)
            sizes.insert(at, total)
            pool.insert(at, None)
            projected += 1 - in_chosen
            if not in_chosen:
                found.append(chosen)  # type: ignore[arg-type]  # no None in it
            if end - start < max_open and found:
                break

        if kind == _USER:
            if len(found) == 1:
                found = _look_ahead(found[0], ordered, ratio, max_open)
            elif not found and not any(r.kind == _USER for r in params.running):
                found = _forced_sets(ordered, max_open)
        elif (
            not found
            and not params.running
            and len(params.all_files) == len(ordered)
            and len(ordered) > params.effective_table_file_max
        ):
            rescued = _lower_ratio_rescue(ordered, max_open, cap, options.lowest_ratio)
            if rescued is not None:
                found = [rescued]

        if not found:
            return _EMPTY_PLAN
        return CompactionPlan(tuple(_job(files, params, executors) for files in found))


def _look_ahead(
    job: list[CompactableFile],
    ordered: list[CompactableFile],
    ratio: float,
    max_open: int,
) -> list[list[CompactableFile]]:
    """USER: compact everything now if the pass after `job` would not meet the ratio.

    A user compaction must end in one file; if compacting `job` leaves a set that no longer
    meets the ratio, the next pass would rewrite `job`'s output anyway, so do it all at once.
    Only when everything fits in one job (Fix 1).
    """
    if not len(job) < len(ordered) <= max_open:
        return [job]
    in_job = {id(f) for f in job}
    rest = [f.size for f in ordered if id(f) not in in_job]
    output = sum(f.size for f in job)
    rest.insert(bisect_right(rest, output), output)
    start, end = _search(rest, [0, *accumulate(rest)], ratio, max_open, None)
    if start == end:
        return [ordered]
    return [job]


def _job(
    files: list[CompactableFile], params: PlanningParameters, executors: Sequence[ExecutorSpec]
) -> CompactionJob:
    """Wrap a chosen set of files as a job: executor by total size, priority by PLANNER.md."""
    total = 0
    for f in files:
        total += f.size
    executor = choose_executor(executors, total)
    priority = job_priority(
        params.kind, len(params.all_files), len(files), params.effective_table_file_max
    )
    return CompactionJob(tuple(files), executor.executor_id, priority, params.kind)
