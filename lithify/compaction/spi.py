"""The compaction plug-in interface: what a planner or dispatcher sees and what it returns.

Planners and dispatchers are chosen by configuration (`module:Class`) and may be written by users,
so this module is deliberately small and stable: plain, immutable parameter objects in, plain
results out, and no access to the store, its files or its threads. A plug-in that only depends on
this module cannot corrupt data; the worst a bad plan can do is compact the wrong files, and the
tablet server still checks every job against the files it really has before running it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

__all__ = [
    "CompactableFile",
    "CompactionDispatcher",
    "CompactionJob",
    "CompactionKind",
    "CompactionPlan",
    "CompactionPlanner",
    "PlanningParameters",
    "RunningCompaction",
]


@dataclass(frozen=True, slots=True, eq=False)
class CompactableFile:
    """A file of a tablet as the planner sees it: its identity and estimated size.

    Two values with the same URI are the same file, whatever their size estimates say: estimates
    change as metadata is refreshed, and a job computed from an older estimate must still match
    the file it names.
    """

    uri: str
    size: int
    entries: int = 0

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CompactableFile):
            return self.uri == other.uri
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.uri)


class CompactionKind(StrEnum):
    """Why a compaction runs; the planner treats the two very differently."""

    #: Routine: the planner decides whether and what to compact, to keep reads cheap.
    SYSTEM = "SYSTEM"
    #: Requested by a user: every selected file must eventually end up in one file.
    USER = "USER"


@dataclass(frozen=True, slots=True)
class CompactionJob:
    """One compaction to queue: merge `files` into one file on the executor `executor`.

    `files` is kept as a tuple in the order the planner produced (smallest first for the default
    planner) so that logs are stable; treat it as a set. `executor` is an executor id
    (`i.<service>.<name>` or `e.<queue>`); `priority` is a 16-bit signed number, higher first.
    """

    files: tuple[CompactableFile, ...]
    executor: str
    priority: int
    kind: CompactionKind

    def __post_init__(self) -> None:
        if not isinstance(self.files, tuple):
            object.__setattr__(self, "files", tuple(self.files))
        if not self.files:
            raise ValueError("a compaction job needs at least one file")

    @property
    def total_size(self) -> int:
        """The sum of the input sizes: an estimate of the output size and of the work."""
        return sum(f.size for f in self.files)


@dataclass(frozen=True, slots=True)
class CompactionPlan:
    """What a planner decided for one tablet: zero or more jobs over disjoint sets of files.

    A new plan replaces the tablet's queued jobs; running jobs are not touched.
    """

    jobs: tuple[CompactionJob, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.jobs, tuple):
            object.__setattr__(self, "jobs", tuple(self.jobs))


@dataclass(frozen=True, slots=True)
class RunningCompaction:
    """A compaction already running on the tablet; its files are reserved until it ends.

    Planners see these so they can wait for a running job's output instead of planning work that
    would have to be redone once that output exists.
    """

    kind: CompactionKind
    files: tuple[CompactableFile, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.files, tuple):
            object.__setattr__(self, "files", tuple(self.files))


@dataclass(frozen=True, slots=True)
class PlanningParameters:
    """Everything a planner may base a plan on, for one tablet and one kind of compaction.

    * `all_files`: every file of the tablet.
    * `candidates`: the files this plan may use: not reserved by a running compaction, and for
      USER the selected files not yet compacted.
    * `running`: compactions running on the tablet, of either kind.
    * `table_file_max`: `table.file.max`; a value <= 0 means `scan_files_open_max - 1`
      (`tserver.scan.files.open.max`), see `effective_table_file_max`.
    * `table_properties`: the table's configuration, for planners that want more than the above.
    * `service`: the compaction service doing the planning.
    """

    kind: CompactionKind
    ratio: float
    all_files: Collection[CompactableFile]
    candidates: Collection[CompactableFile]
    running: Collection[RunningCompaction] = ()
    table_file_max: int = 15
    table_properties: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    service: str = "default"
    table_id: str = ""
    scan_files_open_max: int = 100

    @property
    def effective_table_file_max(self) -> int:
        """`table.file.max`, with the "<= 0 means the scan limit minus one" rule applied."""
        if self.table_file_max > 0:
            return self.table_file_max
        return self.scan_files_open_max - 1


class CompactionPlanner(ABC):
    """Decides which files of a tablet to compact, on which executor, at which priority.

    One instance serves one compaction service and is called for many tablets, possibly from
    several threads at once, so `make_plan` must not keep per-tablet state. It is called often
    (after every flush and periodically for every tablet) and must be fast and free of I/O.
    """

    @abstractmethod
    def init(self, service: str, options: Mapping[str, str]) -> None:
        """Configure the planner from the service's `planner.opts.*` options.

        Raise `lithify.errors.ConfigError` naming the property at fault when an option is bad;
        the service then plans nothing and reports itself misconfigured until fixed.
        """

    @abstractmethod
    def make_plan(self, params: PlanningParameters) -> CompactionPlan:
        """Return the jobs to queue now for the tablet described by `params` (possibly none).

        Each job's files must be candidates, jobs must not share files, and each job's executor
        must belong to this service.
        """


class CompactionDispatcher(ABC):
    """Chooses the compaction service of a table's compactions (per table, configurable).

    Kept separate from the planner so that a table can move to another service (for example one
    with external executors) without changing how files are chosen.
    """

    @abstractmethod
    def init(self, options: Mapping[str, str]) -> None:
        """Configure from the table's `table.compaction.dispatcher.opts.*` options."""

    @abstractmethod
    def dispatch(
        self,
        kind: CompactionKind,
        hints: Mapping[str, str],
        table_properties: Mapping[str, str],
    ) -> str:
        """Return the name of the service that should plan and run this compaction.

        `hints` are the execution hints of a user compaction (empty for SYSTEM).
        """
