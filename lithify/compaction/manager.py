"""The compaction manager of a tablet server: services, dispatch, planning and job hand-off.

For each tablet it asks the table's dispatcher which service plans each kind of compaction,
asks that service's planner for a plan, and queues the jobs on the executors the plan names,
replacing the tablet's queued jobs that the new plan no longer contains (running jobs are never
touched by planning). It knows nothing of files, SQL or HTTP: the host (the store or tablet
server) describes tablets as `TabletView`s and executes jobs, and an optional sink takes jobs for
external queues.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lithify.compaction.dispatcher import DISPATCHER_OPTS_PREFIX, DISPATCHER_PROPERTY
from lithify.compaction.executor import ExecutorStats, InternalExecutor, QueuedJob
from lithify.compaction.plugins import DEFAULT_DISPATCHER, make_dispatcher
from lithify.compaction.rate_limit import TokenBucket
from lithify.compaction.service import (
    DEFAULT_SERVICE,
    ServiceConfig,
    build_planner,
    parse_service_configs,
)
from lithify.compaction.spi import (
    CompactableFile,
    CompactionDispatcher,
    CompactionJob,
    CompactionKind,
    CompactionPlanner,
    PlanningParameters,
    RunningCompaction,
)
from lithify.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TabletView:
    """What planning needs to know of one tablet, as plain data."""

    extent: Hashable
    table_id: str
    all_files: tuple[CompactableFile, ...]
    reserved: frozenset[str]
    running: tuple[RunningCompaction, ...]
    table_properties: Mapping[str, str]
    #: URIs selected by a pending user compaction and not yet compacted by it (None: no user
    #: compaction pending).
    selected: frozenset[str] | None = None
    user_hints: Mapping[str, str] = field(default_factory=dict)
    #: The user compaction must wait (a system compaction holds some of its selected files).
    user_blocked: bool = False


class CompactionHost(Protocol):
    def tablet_view(self, extent: Hashable) -> TabletView | None: ...

    def extents(self) -> list[Hashable]: ...

    def execute(
        self, extent: Hashable, qjob: QueuedJob, service: str, bucket: TokenBucket | None
    ) -> None: ...


#: Receives every plan's jobs for external queues (possibly none, so that stale ones are dropped).
ExternalSink = Callable[[Hashable, Sequence[CompactionJob]], None]


@dataclass
class _LiveService:
    config: ServiceConfig
    planner: CompactionPlanner | None
    error: str | None
    bucket: TokenBucket


class _RateLimitedLog:
    """Log an error at most once per interval per message key (dispatch errors repeat a lot)."""

    def __init__(self, interval: float = 60.0) -> None:
        self._last: dict[str, float] = {}
        self._interval = interval

    def error(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self._interval:
            self._last[key] = now
            log.error(msg, *args)


class CompactionManager:
    def __init__(
        self,
        host: CompactionHost,
        system_props: Mapping[str, str],
        *,
        scan_files_open_max: int = 100,
        external_sink: ExternalSink | None = None,
    ) -> None:
        self._host = host
        self._lock = threading.RLock()
        self._services: dict[str, _LiveService] = {}
        self._executors: dict[str, InternalExecutor] = {}
        self._dispatchers: dict[tuple, CompactionDispatcher] = {}
        self._scan_files_open_max = scan_files_open_max
        self._external_sink = external_sink
        self._errors = _RateLimitedLog()
        self._stop = threading.Event()
        self._periodic: threading.Thread | None = None
        self.reconfigure(system_props)

    # -- configuration ------------------------------------------------------------------------

    @staticmethod
    def validate(system_props: Mapping[str, str]) -> dict[str, ServiceConfig]:
        """Parse and check every service (planners loaded and initialised); nothing is applied."""
        configs = parse_service_configs(system_props)
        for cfg in configs.values():
            build_planner(cfg)
        return configs

    def reconfigure(self, system_props: Mapping[str, str]) -> None:
        """Apply a new configuration while running.

        Threads are resized, new services start, removed services stop (their queued jobs are
        cancelled, running ones finish). A configuration that fails to parse is rejected whole
        with ConfigError before anything changes. A service whose planner fails to initialise
        is kept but plans nothing and reports itself misconfigured until fixed.
        """
        configs = parse_service_configs(system_props)
        with self._lock:
            wanted_execs: dict[str, int] = {}
            live: dict[str, _LiveService] = {}
            for name, cfg in configs.items():
                try:
                    planner, error = build_planner(cfg), None
                except ConfigError as e:
                    planner, error = None, str(e)
                    log.error("compaction service %s is misconfigured: %s", name, e)
                old = self._services.get(name)
                bucket = old.bucket if old else TokenBucket(cfg.rate_limit)
                bucket.set_rate(cfg.rate_limit)
                live[name] = _LiveService(cfg, planner, error, bucket)
                for spec in cfg.executors:
                    if spec.type == "internal":
                        wanted_execs[spec.executor_id] = int(spec.num_threads or 1)
            for exec_id, ex in list(self._executors.items()):
                if exec_id not in wanted_execs:
                    ex.shutdown()
                    del self._executors[exec_id]
                    log.info("stopped executor %s (its service or executor was removed)", exec_id)
            for exec_id, threads in wanted_execs.items():
                ex = self._executors.get(exec_id)
                if ex is None:
                    self._executors[exec_id] = InternalExecutor(exec_id, threads)
                elif ex.threads != threads:
                    ex.resize(threads)
            self._services = live
            self._dispatchers.clear()

    def service_errors(self) -> dict[str, str]:
        with self._lock:
            return {n: s.error for n, s in self._services.items() if s.error}

    def services(self) -> dict[str, ServiceConfig]:
        with self._lock:
            return {n: s.config for n, s in self._services.items()}

    # -- dispatch -----------------------------------------------------------------------------

    def _dispatcher(self, props: Mapping[str, str]) -> CompactionDispatcher:
        spec = props.get(DISPATCHER_PROPERTY, DEFAULT_DISPATCHER)
        opts = {
            k[len(DISPATCHER_OPTS_PREFIX) :]: v
            for k, v in props.items()
            if k.startswith(DISPATCHER_OPTS_PREFIX)
        }
        key = (spec, tuple(sorted(opts.items())))
        with self._lock:
            d = self._dispatchers.get(key)
            if d is None:
                d = self._dispatchers[key] = make_dispatcher(spec, opts)
            return d

    def service_for(
        self, kind: CompactionKind, props: Mapping[str, str], hints: Mapping[str, str]
    ) -> str:
        """The service of a compaction; falls back to `default` (logging why) on any problem."""
        try:
            name = self._dispatcher(props).dispatch(kind, hints, props)
        except Exception as e:
            self._errors.error(
                f"dispatch:{props.get(DISPATCHER_PROPERTY)}",
                "dispatcher %s failed (%s); using service %s",
                props.get(DISPATCHER_PROPERTY),
                e,
                DEFAULT_SERVICE,
            )
            return DEFAULT_SERVICE
        with self._lock:
            if name not in self._services:
                self._errors.error(
                    f"missing:{name}",
                    "dispatcher chose service %r which does not exist; using service %s",
                    name,
                    DEFAULT_SERVICE,
                )
                return DEFAULT_SERVICE
        return name

    # -- planning -----------------------------------------------------------------------------

    def plan(self, extent: Hashable) -> int:
        """Plan one tablet now; returns the number of jobs it has queued afterwards."""
        view = self._host.tablet_view(extent)
        if view is None:
            return 0
        props = view.table_properties
        by_executor: dict[str, list[QueuedJob]] = {}
        external: dict[str, list[CompactionJob]] = {}
        kinds = [CompactionKind.SYSTEM]
        if view.selected is not None and not view.user_blocked:
            kinds.append(CompactionKind.USER)
        for kind in kinds:
            hints = view.user_hints if kind == CompactionKind.USER else {}
            service = self.service_for(kind, props, hints)
            with self._lock:
                live = self._services[service]
            if live.planner is None:
                continue
            selected = view.selected or frozenset()
            if kind == CompactionKind.SYSTEM:
                cands = [
                    f
                    for f in view.all_files
                    if f.uri not in view.reserved and f.uri not in selected
                ]
            else:
                cands = [
                    f for f in view.all_files if f.uri in selected and f.uri not in view.reserved
                ]
            params = PlanningParameters(
                kind=kind,
                ratio=float(props.get("table.compaction.major.ratio", "3")),
                all_files=view.all_files,
                candidates=cands,
                running=view.running,
                table_file_max=int(props.get("table.file.max", "15")),
                table_properties=props,
                service=service,
                table_id=view.table_id,
                scan_files_open_max=self._scan_files_open_max,
            )
            try:
                plan = live.planner.make_plan(params)
            except Exception:
                self._errors.error(
                    f"plan:{service}", "planner of service %s failed for %s", service, extent
                )
                log.debug("planner failure", exc_info=True)
                continue
            for job in plan.jobs:
                if job.executor.startswith("e."):
                    external.setdefault(job.executor, []).append(job)
                    continue
                run = self._runner(extent, service, live.bucket)
                by_executor.setdefault(job.executor, []).append(QueuedJob(extent, job, run))
        queued = 0
        with self._lock:
            executors = dict(self._executors)
        for exec_id, ex in executors.items():
            ex.replace_tablet_jobs(extent, by_executor.get(exec_id, []))
            queued += sum(1 for q in ex.queued_jobs() if q.tablet == extent)
        unknown = set(by_executor) - set(executors)
        for exec_id in unknown:
            self._errors.error(f"exec:{exec_id}", "plan names unknown executor %s", exec_id)
        if self._external_sink is not None:
            self._external_sink(extent, [j for js in external.values() for j in js])
        elif external:
            self._errors.error(
                "external",
                "jobs for external queues %s but no compaction coordinator is configured",
                sorted(external),
            )
        return queued

    def _runner(
        self, extent: Hashable, service: str, bucket: TokenBucket
    ) -> Callable[[QueuedJob], None]:
        def run(q: QueuedJob) -> None:
            self._host.execute(extent, q, service, bucket)

        return run

    def plan_all(self) -> None:
        for extent in self._host.extents():
            if self._stop.is_set():
                return
            try:
                self.plan(extent)
            except Exception:
                log.exception("planning %s failed", extent)

    def start_periodic(self, delay: Callable[[], float]) -> None:
        """Plan every tablet every `delay()` seconds until shutdown."""

        def loop() -> None:
            while not self._stop.wait(max(0.1, delay())):
                self.plan_all()

        self._periodic = threading.Thread(target=loop, name="compaction-planner", daemon=True)
        self._periodic.start()

    # -- control and observation ----------------------------------------------------------------

    def cancel(self, predicate: Callable[[QueuedJob], bool], *, running: bool = True) -> int:
        with self._lock:
            executors = list(self._executors.values())
        return sum(ex.cancel(predicate, running=running) for ex in executors)

    def executor_stats(self) -> dict[str, ExecutorStats]:
        with self._lock:
            return {k: ex.stats() for k, ex in self._executors.items()}

    def executor(self, executor_id: str) -> InternalExecutor | None:
        with self._lock:
            return self._executors.get(executor_id)

    def running_jobs(self) -> list[QueuedJob]:
        with self._lock:
            executors = list(self._executors.values())
        return [q for ex in executors for q in ex.running_jobs()]

    def idle(self) -> bool:
        return all(s.queued == 0 and s.running == 0 for s in self.executor_stats().values())

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.05)
        return self.idle()

    def shutdown(self, *, wait: bool = True) -> None:
        self._stop.set()
        with self._lock:
            executors = list(self._executors.values())
        for ex in executors:
            ex.cancel(lambda q: True, running=True)
            ex.shutdown(wait=wait)
        if self._periodic is not None:
            self._periodic.join(timeout=5)


def uris(files: Iterable[CompactableFile]) -> frozenset[str]:
    return frozenset(f.uri for f in files)
