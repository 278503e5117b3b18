"""The compaction coordinator's logic (docs/EXTERNAL_COMPACTIONS.md), free of HTTP.

The coordinator owns the external queues and the running set. Everything durable lives in the
metadata store; what this object keeps in memory (queued jobs, failure detectors, async requests)
is either re-sent by the tablet server (plans) or rebuilt from the metadata on takeover
(`rebuild`), so a coordinator may die at any instant.

Every metadata write is fenced with `("coordinator", epoch)`: once another process holds the
lease with a newer epoch, each write here raises `LeaseLostError` before changing anything, and
from then on this object refuses all work (`active` is False) so its process can answer 503 and
compactors go to the new coordinator.

Collaborators are injected so that tests run the real logic against a real metadata store and
real files, and only the other processes are stood in for:

* `ask_compactor(address) -> ecid | None`: which ECID a compactor runs now (`GET /v1/running`);
  None or an exception means it cannot confirm, so the compaction is failed.
* `refresh(extents)`: tell the tablet server that these tablets' metadata changed (best effort;
  the process implementation does not block).
* `tserver`: a `TserverClient` for the async requests (user compactions and flushes).

Dependencies point one way: the HTTP app (`app.py`) calls this module, which calls the metadata
store, the storage layer and the reservation rules of the tablet package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from lithify.coordinator.phi import PhiAccrualDetector
from lithify.coordinator.queues import ExternalQueues, PlannedJob, QueuedJob, QueueStats
from lithify.data.ranges import Extent, FileRef
from lithify.errors import ConditionalUpdateError, LithifyError, TableNotFoundError
from lithify.files.naming import new_file_name, tmp_name
from lithify.files.storage import Storage
from lithify.metadata.store import LeaseLostError, MetadataStore, TableInfo, TabletMeta
from lithify.rpc.wire import extent_to_json
from lithify.table.properties import (
    Properties,
    iterator_specs,
    system_properties,
    table_properties,
)
from lithify.tablet import reservation
from lithify.tablet.compactions import _reserve_checked, selection_after_commit
from lithify.tablet.reservation import ReservationError
from lithify.tablet.tablet import newest_first

log = logging.getLogger(__name__)

LEASE_NAME = "coordinator"

#: States of a running external compaction in the coordinator's memory.
RUNNING = "RUNNING"
CANCELLING = "CANCELLING"
COMMITTING = "COMMITTING"

#: States of an asynchronous request (SYSTEM.md 5.6).
REQ_RUNNING = "RUNNING"
REQ_FINISHED = "FINISHED"
REQ_FAILED = "FAILED"
REQ_CANCELLED = "CANCELLED"
NOT_SUBMITTED = "NOT_SUBMITTED"
_REQ_TERMINAL = frozenset({REQ_FINISHED, REQ_FAILED, REQ_CANCELLED})

_RESULT_KEYS = ("entries_read", "entries_written", "bytes_read", "bytes_written")
_ECID_LOCK_STRIPES = 64
#: ECIDs remembered after they ended (a late `failed` still deletes the temporary file, a
#: repeated report is recognised without scanning the metadata).
_GONE_MEMORY = 10000
_REQUEST_MEMORY = 10000
#: How long a finished async request stays answerable before it is forgotten.
_REQUEST_KEEP_S = 3600.0
#: A compactor counts as "seen" for the metrics if it called within this time.
_SEEN_WINDOW_S = 300.0
_SEEN_MEMORY = 4096
#: Above this many running compactions of one table, the check reads the whole table once
#: instead of each tablet.
_CHECK_WHOLE_TABLE = 32
#: Conflicting writes a reservation tolerates before its job is dropped as too busy.
_RESERVE_ATTEMPTS = 20


class NotActiveError(LithifyError):
    """This coordinator is not the active one (standby, closed, or stopping)."""


# ---------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    """The coordinator's tunables; `from_properties` reads the `coordinator.*` properties."""

    lease_ttl_s: float = 5.0
    queue_max: int = 10000
    phi_threshold: float = 8.0
    phi_window: int = 100
    phi_min_std_s: float = 0.5
    check_interval_s: float = 1.0
    #: The interval assumed before a compactor's second status report (contract: 1 s).
    first_interval_s: float = 1.0
    #: How long a client should wait between STATUS polls of an async request.
    request_tick_s: float = 1.0
    #: Table properties are cached this long (they decide iterators, versions and codec).
    table_props_ttl_s: float = 2.0
    #: Jobs one `next_job` call may try (stale jobs are dropped) and the time it may spend.
    reserve_max_jobs: int = 1000
    reserve_max_s: float = 5.0
    #: Suspect compactors asked per check (each ask may wait for a timeout).
    max_asks_per_check: int = 64

    @classmethod
    def from_properties(cls, values: Mapping[str, str], **overrides: Any) -> CoordinatorConfig:
        """From system property values (defaults from `lithify.table.properties`)."""
        p = system_properties(values)
        base = cls(
            lease_ttl_s=p.get_duration("coordinator.lease.ttl"),
            queue_max=p.get_int("coordinator.queue.max"),
            phi_threshold=p.get_float("coordinator.phi.threshold"),
            phi_window=p.get_int("coordinator.phi.window"),
            phi_min_std_s=p.get_duration("coordinator.phi.min.std"),
            check_interval_s=p.get_duration("coordinator.check.interval"),
        )
        return dataclasses.replace(base, **overrides) if overrides else base


# ---------------------------------------------------------------------- JSON helpers


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


def request_id(request: Mapping[str, Any]) -> str:
    """The id of an async request: a hash of all its fields, so a resubmission is recognised."""
    fields = {
        k: request.get(k)
        for k in (
            "op",
            "table",
            "start",
            "end",
            "iterators",
            "hints",
            "client",
            "nonce",
            "cancel_on_client_loss",
        )
    }
    canon = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------- collaborators


class TserverClient(Protocol):
    """What the coordinator asks of the tablet server for async requests."""

    def compact(
        self,
        table: str,
        start: bytes | None,
        end: bytes | None,
        iterators: Sequence[Sequence[Any]],
        hints: Mapping[str, str],
        request_id: str,
    ) -> str | None:
        """Start a user compaction and return once its files are selected.

        Returns the id the tablet server gave the selection (the tablets' `selection.id`);
        None means it used `request_id`.
        """

    def flush(self, table: str) -> None:
        """Flush the table and return when done."""

    def cancel_compaction(self, table: str) -> None:
        """Cancel the table's pending user compaction."""


AskCompactor = Callable[[str], "str | None"]
Refresh = Callable[[Sequence[Extent]], None]


# ---------------------------------------------------------------------- state


@dataclass
class RunningCompaction:
    """An external compaction the coordinator knows to be running (its record is in metadata)."""

    ecid: str
    extent: Extent
    queue: str
    kind: str
    compactor: str
    address: str | None
    selection_id: str | None
    tmp_path: str
    output_path: str
    priority: int
    started: float
    detector: PhiAccrualDetector
    job: dict[str, Any] | None = None
    state: str = RUNNING
    cancel_reason: str | None = None
    status: str = "RESERVED"
    entries_read: int = 0
    entries_written: int = 0

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "ecid": self.ecid,
            "extent": extent_to_json(self.extent),
            "queue": self.queue,
            "kind": self.kind,
            "compactor": self.compactor,
            "address": self.address,
            "state": self.state,
            "status": self.status,
            "entries_read": self.entries_read,
            "entries_written": self.entries_written,
            "started": self.started,
            "phi": round(self.detector.phi(now), 3),
        }


@dataclass
class _Request:
    id: str
    op: str
    table: str
    table_id: str
    body: dict[str, Any]
    state: str = REQ_RUNNING
    error: str | None = None
    submitted: float = 0.0
    ended: float | None = None
    detector: PhiAccrualDetector | None = None
    #: True once the tablet server made the selection (compaction done = no selection left).
    selected: bool = False
    #: The id of the tablets' selection (the tablet server's, or the request id).
    selection_id: str | None = None
    tablets_total: int = 0
    tablets_pending: int = 0
    #: Files selected when the selection was first seen, and what committed passes did.
    files_selected: int = 0
    entries_read: int = 0
    entries_written: int = 0
    bytes_written: int = 0


@dataclass
class RebuildReport:
    committed: int = 0
    cleaned: int = 0
    adopted: int = 0


@dataclass
class CheckReport:
    dead: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    requests_cancelled: list[str] = field(default_factory=list)


@dataclass
class CoordinatorMetrics:
    """A snapshot for `/metrics`."""

    active: bool
    epoch: int
    queues: dict[str, QueueStats]
    running: int
    running_by_queue: dict[str, int]
    compactors_seen: int
    completed: int
    failed: int
    cancelled: int
    stale_dropped: int
    requests: dict[str, int]


@dataclass(frozen=True, slots=True)
class JobRequest:
    """One compactor's ask for work (`POST /v1/compactor/next`), as `next_jobs` takes it."""

    queue: str
    compactor: str
    address: str | None
    ecid: str


#: What `next_jobs` answers per request: the job, None (no work now), or that request's error.
JobAnswer = dict[str, Any] | Exception | None


@dataclass
class _Reservation:
    """One job being reserved for one request.

    `apply` is the reservation rule as a function of the tablet's metadata; the metadata store
    may call it more than once (a conflict re-reads the tablet), and each call records what it
    chose (the record, the input files, the user selection) for the job that is handed out.
    """

    request: JobRequest
    qj: QueuedJob
    props: Properties
    record: dict[str, Any] = field(default_factory=dict)
    files: list[FileRef] = field(default_factory=list)
    selection: dict[str, Any] | None = None

    def apply(self, m: TabletMeta) -> TabletMeta:
        """`m` with the running compaction recorded; ReservationError when the job is stale."""
        job, extent, ecid = self.qj.job, self.qj.extent, self.request.ecid
        by_uri = {f.uri: f for f in m.files}
        wanted = [f.uri for f in job.files]
        if any(u not in by_uri for u in wanted):
            raise ReservationError(f"files of the job are no longer in {m.extent}")
        files = [by_uri[u] for u in wanted]
        selection_id = None
        if job.kind == "USER":
            sel = m.selection
            if sel is None:
                raise ReservationError(f"{m.extent} has no user compaction selected")
            selected = {FileRef.from_json(x).uri for x in sel["files"]}
            if not set(wanted) <= selected:
                raise ReservationError(f"job files of {m.extent} are not all selected")
            selection_id = sel.get("id")
        full = reservation.may_drop_deletes(m, files)
        output = new_file_name("A" if full else "C", extent.table_id)
        record = {
            "ecid": ecid,
            "kind": job.kind,
            "executor": job.executor,
            "queue": self.qj.queue,
            "priority": job.priority,
            "compactor": self.request.compactor,
            "address": self.request.address,
            "tmp_path": tmp_name(output, ecid),
            "output_path": output,
            "propagate_deletes": not full,
            "selection_id": selection_id,
            "started": time.time(),
        }
        new = _reserve_checked(m, ecid, files, record)
        self.record, self.files, self.selection = record, files, m.selection
        return new


# ---------------------------------------------------------------------- the coordinator


class CompactionCoordinator:
    """Queues, reservations, the running set, commits, failure detection and async requests.

    Thread-safe: the HTTP app calls it from many threads. One lock guards the in-memory state
    and is never held during I/O; reports about one ECID are serialised by a striped lock so
    that a repeated `finished` waits for the first and then finds nothing left to do.
    """

    def __init__(
        self,
        meta: MetadataStore,
        storage: Storage,
        epoch: int,
        *,
        config: CoordinatorConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        ask_compactor: AskCompactor | None = None,
        refresh: Refresh | None = None,
        tserver: TserverClient | None = None,
        lease_name: str = LEASE_NAME,
    ) -> None:
        self.meta = meta
        self.storage = storage
        self.epoch = epoch
        self.config = config or CoordinatorConfig()
        self.fence = (lease_name, epoch)
        self._clock = clock
        self._ask = ask_compactor
        self._refresh = refresh
        self._tserver = tserver
        self._lock = threading.RLock()
        self._ecid_locks = [threading.Lock() for _ in range(_ECID_LOCK_STRIPES)]
        self._queues = ExternalQueues(self.config.queue_max)
        self._running: dict[str, RunningCompaction] = {}
        self._gone: OrderedDict[str, str | None] = OrderedDict()
        self._requests: OrderedDict[str, _Request] = OrderedDict()
        self._props: dict[str, tuple[float, Properties]] = {}
        self._seen: dict[str, float] = {}
        self._listeners: list[Callable[[Mapping[str, int]], None]] = []
        self._counts = {"completed": 0, "failed": 0, "cancelled": 0, "stale_dropped": 0}
        self._deposed = False
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lithify-coord-req")

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """False once deposed (a newer epoch holds the lease) or closed."""
        return not self._deposed and not self._closed

    def depose(self) -> None:
        """Stop serving at once (the process saw the lease go); nothing is written afterwards."""
        if not self._deposed:
            log.warning("coordinator epoch %d deposed; no longer serving", self.epoch)
        self._deposed = True

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def add_listener(self, fn: Callable[[Mapping[str, int]], None]) -> None:
        """Call `fn({queue: jobs_added})` after jobs are queued (the app wakes long-polls)."""
        self._listeners.append(fn)

    def _check_active(self) -> None:
        if self._deposed:
            raise LeaseLostError(f"coordinator epoch {self.epoch} was deposed")
        if self._closed:
            raise NotActiveError("coordinator is closed")

    def _fenced(self, fn: Callable[[], Any]) -> Any:
        """Run a fenced metadata write; a lost lease deposes this coordinator for good."""
        try:
            return fn()
        except LeaseLostError:
            self.depose()
            raise

    def _ecid_lock(self, ecid: str) -> threading.Lock:
        return self._ecid_locks[hash(ecid) % _ECID_LOCK_STRIPES]

    def _new_detector(self, first_interval_s: float | None = None) -> PhiAccrualDetector:
        c = self.config
        return PhiAccrualDetector(
            window=c.phi_window,
            min_std_s=c.phi_min_std_s,
            first_interval_s=first_interval_s or c.first_interval_s,
        )

    # -- queues (tablet server -> coordinator) ------------------------------------------------

    def plan(self, extent: Extent, jobs: Sequence[PlannedJob]) -> int:
        """Replace the tablet's queued jobs; returns how many were queued (the rest rejected)."""
        self._check_active()
        for j in jobs:
            j.queue  # noqa: B018 - validates the executor id before anything changes
        with self._lock:
            accepted = self._queues.plan(extent, jobs, self._clock())
        added: dict[str, int] = {}
        for qj in accepted:
            added[qj.queue] = added.get(qj.queue, 0) + 1
        if added:
            for fn in self._listeners:
                try:
                    fn(added)
                except Exception:  # noqa: BLE001 - a listener must not fail the plan
                    log.exception("queue listener failed")
        return len(accepted)

    def cancel(
        self, table_id: str, extents: Iterable[Extent] | None = None, kind: str | None = None
    ) -> int:
        """Drop matching queued jobs and tell matching running compactions to stop."""
        self._check_active()
        only = None if extents is None else set(extents)

        def matches(extent: Extent, k: str) -> bool:
            return (
                extent.table_id == table_id
                and (only is None or extent in only)
                and (kind is None or k == kind)
            )

        with self._lock:
            n = self._queues.remove_where(lambda qj: matches(qj.extent, qj.job.kind))
            for run in self._running.values():
                if run.state == RUNNING and matches(run.extent, run.kind):
                    run.state = CANCELLING
                    run.cancel_reason = "cancelled"
                    n += 1
        if kind == "USER" and extents is None:
            # The table's user compaction is cancelled (the tablet server's cancel endpoint);
            # a USER cancel naming tablets only drops those tablets' jobs (it is also sent
            # asynchronously, and may arrive after a new user compaction started).
            self._cancel_user_requests(table_id)
        return n

    def _cancel_user_requests(self, table_id: str) -> None:
        """A user compaction of the table was cancelled at the tablet server (another client's
        cancel, passed on here): the compact requests still waiting for it end CANCELLED.

        Without this a request only saw its selection vanish and answered FINISHED. The tablet
        server passes the cancel on before it drops the selection, so a request whose selection
        is still on a tablet now is the one being cancelled; one whose selection is gone already
        finished (or will be judged by `_follow_request`).
        """
        with self._lock:
            reqs = [
                r
                for r in self._requests.values()
                if r.op == "compact"
                and r.table_id == table_id
                and r.state == REQ_RUNNING
                and r.selected
            ]
        if not reqs:
            return
        try:
            tablets = self.meta.tablets(table_id)
        except TableNotFoundError:
            return  # deleted: `_follow_request` ends its requests
        pending = {m.selection.get("id") for m in tablets if m.selection}
        for req in reqs:
            if req.selection_id in pending and self._end_request(
                req, REQ_CANCELLED, "cancelled by another client"
            ):
                log.info("request %s (compact %s): cancelled by another client", req.id, req.table)

    def queue_depth(self, queue: str) -> int:
        with self._lock:
            return self._queues.depth(queue)

    def has_work(self, queue: str, ecid: str) -> bool:
        """Whether `next_job` could answer now without waiting (cheap, no I/O)."""
        with self._lock:
            return self._queues.depth(queue) > 0 or ecid in self._running

    # -- reservation (compactor -> coordinator) -----------------------------------------------

    def next_job(self, queue: str, compactor: str, address: str | None, ecid: str) -> dict | None:
        """Reserve the best job of `queue` for `compactor` under `ecid`; None if there is none.

        Never waits for work (the app's long-poll does). Stale jobs (the tablet no longer has
        the files, or they are reserved, or the tablet is gone) are dropped and the next is
        tried, at most `reserve_max_jobs` of them or `reserve_max_s`. Asking again with the
        same ECID (a lost answer) returns the same job. A batch of one of `next_jobs`.
        """
        answer = self.next_jobs([JobRequest(queue, compactor, address, ecid)])[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def next_jobs(self, requests: Sequence[JobRequest]) -> list[JobAnswer]:
        """Serve several `next_job` requests together: group commit of their reservations.

        Each round takes one job for every request still unanswered and reserves all of them
        with one `MetadataStore.mutate_tablets` call (one read and one write transaction, each
        reservation its own compare-and-set on its tablet's version), which costs little more
        than reserving one. Winners get their job; a request whose job was stale goes on to
        its next job in the next round. Bounded like `next_job`: at most `reserve_max_jobs`
        rounds and `reserve_max_s`. The answers come back in the order of `requests`; an
        error is the answer of the requests it concerns (an invalid ECID its own; a lost lease
        or a database error those of that round, whose jobs go back to the queue), so a
        request answered in an earlier round always keeps its reserved job.
        """
        self._check_active()
        answers: list[JobAnswer] = [None] * len(requests)
        live: list[int] = []
        repeats: list[int] = []
        firsts: set[str] = set()
        now = self._clock()
        with self._lock:
            for i, req in enumerate(requests):
                if not req.ecid or "/" in req.ecid:
                    answers[i] = ValueError(f"invalid ECID {req.ecid!r}")
                    continue
                self._saw(req.compactor, now)
                known = self._running.get(req.ecid)
                if known is not None:
                    answers[i] = known.job if known.compactor == req.compactor else None
                elif req.ecid in firsts:
                    repeats.append(i)  # the same ECID twice in one batch: a retry of the first
                elif req.ecid not in self._gone:
                    firsts.add(req.ecid)
                    live.append(i)
        deadline = now + self.config.reserve_max_s
        for _ in range(self.config.reserve_max_jobs):
            with self._lock:
                taken = [(i, self._queues.take(requests[i].queue)) for i in live]
            batch = [(i, qj) for i, qj in taken if qj is not None]
            if not batch:
                break
            try:
                runs = self._reserve_all([(requests[i], qj) for i, qj in batch])
            except Exception as e:  # noqa: BLE001 - the answer of this round's requests
                if not isinstance(e, LeaseLostError):  # deposed: the queues die with this core
                    self._put_back([qj for _, qj in batch])
                for i, _ in batch:
                    answers[i] = e
                break
            live = []
            failed: list[QueuedJob] = []
            for (i, qj), run in zip(batch, runs, strict=True):
                if isinstance(run, RunningCompaction):
                    answers[i] = run.job
                elif isinstance(run, Exception):
                    answers[i] = run
                    failed.append(qj)
                else:
                    live.append(i)  # stale: try the next job
            self._put_back(failed)
            if live:
                with self._lock:
                    self._counts["stale_dropped"] += len(live)
            if not live or self._clock() > deadline:
                break
        if repeats:
            with self._lock:
                for i in repeats:
                    known = self._running.get(requests[i].ecid)
                    if known is not None and known.compactor == requests[i].compactor:
                        answers[i] = known.job
        return answers

    def _put_back(self, jobs: Sequence[QueuedJob]) -> None:
        """Return taken jobs whose reservation failed for a passing reason (not staleness)."""
        if jobs:
            with self._lock:
                for qj in jobs:
                    self._queues.put_back(qj)

    def _table_props(self, table_id: str) -> Properties:
        now = self._clock()
        with self._lock:
            hit = self._props.get(table_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        props = table_properties(self._table_by_id(table_id).properties)
        with self._lock:
            self._props[table_id] = (now + self.config.table_props_ttl_s, props)
        return props

    def _table_by_id(self, table_id: str) -> TableInfo:
        """`get_table` looks names up first; make sure a table *named* like this id does not
        answer in place of the table that has it."""
        info = self.meta.get_table(table_id)
        if info.id == table_id:
            return info
        for t in self.meta.list_tables():
            if t.id == table_id:
                return t
        raise TableNotFoundError(f"table id {table_id!r} does not exist")

    def _reserve_all(
        self, pairs: Sequence[tuple[JobRequest, QueuedJob]]
    ) -> list[RunningCompaction | Exception | None]:
        """Reserve each job for its request in one conditional update of many tablets.

        Per pair: the running compaction; None when the job is stale (its files gone or
        reserved, its tablet or table gone, or the tablet kept changing under us); or the
        unexpected error of that pair. A lost lease or a database error raises for all.
        """
        results: list[RunningCompaction | Exception | None] = [None] * len(pairs)
        todo: list[tuple[int, _Reservation]] = []
        for k, (req, qj) in enumerate(pairs):
            try:
                props = self._table_props(qj.extent.table_id)
            except TableNotFoundError:
                continue
            todo.append((k, _Reservation(req, qj, props)))
        if not todo:
            return results
        # The only competitor of a reservation is the tablet server's occasional update of
        # the same tablet, so a conflict is retried at once (no backoff).
        outcomes = self._fenced(
            lambda: self.meta.mutate_tablets(
                [(r.qj.extent, r.apply) for _, r in todo],
                max_attempts=_RESERVE_ATTEMPTS,
                fence=self.fence,
                backoff=False,
            )
        )
        for (k, r), outcome in zip(todo, outcomes, strict=True):
            error = outcome.error
            if isinstance(error, ReservationError):
                log.debug("dropping stale job of %s: %s", r.qj.extent, error)
            elif isinstance(error, ConditionalUpdateError):
                log.info("dropping job of %s: tablet too busy to reserve (%s)", r.qj.extent, error)
            elif error is not None:
                results[k] = error
            elif outcome.meta is not None:
                results[k] = self._start_running(r)
            # else: the tablet is gone (split, merged, table deleted)
        return results

    def _start_running(self, r: _Reservation) -> RunningCompaction:
        """The job for a reservation that was written, now in the running set."""
        qj, req, props, record = r.qj, r.request, r.props, r.record
        extent, kind = qj.extent, qj.job.kind
        iterators = [[c, dict(o)] for c, o in iterator_specs(props, "majc")]
        if kind == "USER" and r.selection is not None:
            iterators += [[c, dict(o)] for c, o in r.selection.get("iterators", [])]
        job = {
            "ecid": req.ecid,
            "extent": extent_to_json(extent),
            "inputs": [f.to_json() for f in newest_first(r.files)],
            "output_path": record["output_path"],
            "tmp_path": record["tmp_path"],
            "propagate_deletes": record["propagate_deletes"],
            "versions": props.get_int("table.versions"),
            "iterators": iterators,
            "compression": props["table.file.compress.type"],
            "kind": kind,
            "queue": qj.queue,
            "priority": qj.job.priority,
        }
        detector = self._new_detector()
        detector.heartbeat(self._clock())
        run = RunningCompaction(
            ecid=req.ecid,
            extent=extent,
            queue=qj.queue,
            kind=kind,
            compactor=req.compactor,
            address=req.address,
            selection_id=record["selection_id"],
            tmp_path=record["tmp_path"],
            output_path=record["output_path"],
            priority=qj.job.priority,
            started=record["started"],
            detector=detector,
            job=job,
        )
        with self._lock:
            self._running[req.ecid] = run
        if log.isEnabledFor(logging.INFO):
            log.info(
                "Reserved %s on %s for %s from %s (ecid %s, compactor %s)",
                extent,
                qj.queue,
                kind,
                [f.path.rsplit("/", 1)[-1] for f in r.files],
                req.ecid,
                req.compactor,
            )
        return run

    # -- reports (compactor -> coordinator) ---------------------------------------------------

    def status(
        self,
        ecid: str,
        compactor: str,
        state: str,
        entries_read: int = 0,
        entries_written: int = 0,
        *,
        lookup: bool = True,
    ) -> bool | None:
        """A status report (also the heartbeat); returns whether the compactor must stop.

        An ECID this coordinator does not know is looked up in the metadata (adopted if it is
        recorded there, else the compactor is told to stop); with `lookup=False` the answer is
        None instead, so an event loop can answer the usual case without leaving its thread.
        """
        self._check_active()
        now = self._clock()
        with self._lock:
            self._saw(compactor, now)
            run = self._running.get(ecid)
            if run is not None:
                run.detector.heartbeat(now)
                run.status = state
                run.entries_read = int(entries_read)
                run.entries_written = int(entries_written)
                return run.state == CANCELLING
            if ecid in self._gone:
                return True
        if not lookup:
            return None
        run = self._adopt_unknown(ecid)
        return run is None

    def finished(self, ecid: str, compactor: str, result: Mapping[str, Any]) -> None:
        """Commit a finished compaction: final state, rename, commit, forget (all repeatable).

        A report for an ECID that is neither running nor recorded (a repeat after the commit,
        or a compaction cancelled meanwhile) changes nothing.
        """
        self._check_active()
        with self._lock:
            self._saw(compactor, self._clock())
        with self._ecid_lock(ecid):
            with self._lock:
                run = self._running.get(ecid)
                gone = ecid in self._gone
                tmp = self._gone.get(ecid)
            if run is None and not gone:
                run = self._adopt_unknown(ecid)
            if run is None:
                # Committed already (a repeat), or failed meanwhile (judged dead, cancelled):
                # then its output is nobody's and its temporary file can go.
                if tmp:
                    self.storage.delete(tmp)
                log.debug("finished report for unknown ECID %s: nothing to do", ecid)
                return
            with self._lock:
                run.state = COMMITTING
            try:
                data = self._put_final_state(run, result)
                outcome = self._commit_final(ecid, run.extent, data)
            except BaseException:
                with self._lock:
                    if run.state == COMMITTING:
                        run.state = RUNNING
                raise
            with self._lock:
                self._running.pop(ecid, None)
                self._remember_gone(ecid, None)
                self._counts["completed" if outcome == "committed" else "cancelled"] += 1
                if outcome == "committed" and run.kind == "USER" and run.selection_id:
                    self._count_user_pass(run.selection_id, data)

    def _put_final_state(self, run: RunningCompaction, result: Mapping[str, Any]) -> dict[str, Any]:
        """Commit step 1. The paths sit at the top level of the final state's data, where the
        garbage collector looks (`MetadataStore.referenced_files`)."""
        data: dict[str, Any] = {k: int(result.get(k, 0)) for k in _RESULT_KEYS}
        data.update(
            tmp_path=run.tmp_path,
            output_path=run.output_path,
            kind=run.kind,
            queue=run.queue,
            compactor=run.compactor,
        )
        self._fenced(
            lambda: self.meta.put_final_state(
                run.ecid, run.extent.table_id, run.extent, "FINISHED", data, fence=self.fence
            )
        )
        return data

    def record_final_state(self, ecid: str, result: Mapping[str, Any]) -> dict[str, Any]:
        """Only step 1 of `finished` (tests use it to stage a crash before the commit)."""
        self._check_active()
        with self._lock:
            run = self._running.get(ecid)
        if run is None:
            raise LithifyError(f"compaction {ecid} is not running")
        return self._put_final_state(run, result)

    def failed(self, ecid: str, compactor: str, state: str = "FAILED", error: str = "") -> None:
        """A compaction failed or was cancelled: delete its temporary file, release its files."""
        self._check_active()
        with self._lock:
            self._saw(compactor, self._clock())
        with self._ecid_lock(ecid):
            with self._lock:
                run = self._running.get(ecid)
                gone = ecid in self._gone
                tmp = self._gone.get(ecid)
            if run is None:
                if gone:
                    if tmp:
                        self.storage.delete(tmp)
                    return
                run = self._adopt_unknown(ecid)
                if run is None:
                    return
            cancelled = state == "CANCELLED" or run.state == CANCELLING
            if error:
                log.info("compaction %s of %s %s: %s", ecid, run.extent, state.lower(), error)
            self._release(run, "cancelled" if cancelled else "failed")

    def _release(self, run: RunningCompaction, outcome: str) -> None:
        """Delete the temporary output and remove the record (the files become candidates)."""
        self.storage.delete(run.tmp_path)
        self._fenced(
            lambda: self.meta.mutate_tablet(
                run.extent, lambda m: reservation.release(m, run.ecid), fence=self.fence
            )
        )
        with self._lock:
            self._running.pop(run.ecid, None)
            self._remember_gone(run.ecid, run.tmp_path)
            self._counts[outcome] += 1
        self._notify_tserver([run.extent])

    def _saw(self, compactor: str, now: float) -> None:
        """Note a call from `compactor` (lock held); forget long-silent ones past a bound."""
        self._seen[compactor] = now
        if len(self._seen) > _SEEN_MEMORY:
            cutoff = now - _SEEN_WINDOW_S
            self._seen = {k: t for k, t in self._seen.items() if t >= cutoff}

    def _count_user_pass(self, selection_id: str, data: Mapping[str, Any]) -> None:
        """Add a committed pass of a user compaction to its request's progress (lock held)."""
        for req in self._requests.values():
            if req.selection_id == selection_id:
                req.entries_read += int(data.get("entries_read", 0))
                req.entries_written += int(data.get("entries_written", 0))
                req.bytes_written += int(data.get("bytes_written", 0))

    def _remember_gone(self, ecid: str, tmp_path: str | None) -> None:
        self._gone[ecid] = tmp_path
        self._gone.move_to_end(ecid)
        while len(self._gone) > _GONE_MEMORY:
            self._gone.popitem(last=False)

    def _commit_final(self, ecid: str, extent: Extent, data: Mapping[str, Any]) -> str:
        """Steps 2-4 of the commit, each repeatable: rename, commit, delete the final state.

        Returns "committed", or "dropped" when the record had vanished (the output is deleted
        unless a tablet already references it, i.e. this is a repeat after the commit).
        """
        tmp, output = str(data["tmp_path"]), str(data["output_path"])
        written = int(data.get("entries_written", 0))
        out_ref: FileRef | None = None
        if written > 0:
            if self.storage.exists(tmp):
                self.storage.rename(tmp, output)
            elif not self.storage.exists(output):
                # Neither file: the result is lost (deleted by hand?). Fail it: the inputs
                # are intact and become candidates again.
                log.error(
                    "compaction %s of %s: output %s is missing; failing it", ecid, extent, tmp
                )
                self._fenced(
                    lambda: self.meta.mutate_tablet(
                        extent, lambda m: reservation.release(m, ecid), fence=self.fence
                    )
                )
                self._fenced(lambda: self.meta.delete_final_state(ecid, fence=self.fence))
                self._notify_tserver([extent])
                return "dropped"
            out_ref = FileRef(output, int(data.get("bytes_written", 0)), written)
        else:
            self.storage.delete(tmp)

        def commit(m: TabletMeta) -> TabletMeta | None:
            rec = m.compactions.get(ecid)
            if rec is None:
                return None
            inputs = {FileRef.from_json(x) for x in rec["inputs"]}
            user = rec.get("kind") == "USER"
            return reservation.commit(m, ecid, out_ref).replace(
                selection=selection_after_commit(m, inputs, out_ref, user)
            )

        new = self._fenced(lambda: self.meta.mutate_tablet(extent, commit, fence=self.fence))
        outcome = "committed"
        if new is None:
            if out_ref is not None and self._output_referenced(extent.table_id, output):
                pass  # committed before a crash, the final state outlived it: a repeat
            else:
                # Cancelled, split, merged or deleted meanwhile: nothing may reference it.
                outcome = "dropped"
                if out_ref is not None:
                    self.storage.delete(output)
            log.info("compaction %s of %s: record gone at commit (%s)", ecid, extent, outcome)
        else:
            log.info(
                "Compacted %s created %s (ecid %s)",
                extent,
                output.rsplit("/", 1)[-1] if out_ref else "(nothing)",
                ecid,
            )
        self._fenced(lambda: self.meta.delete_final_state(ecid, fence=self.fence))
        self._notify_tserver([extent])
        return outcome

    def _output_referenced(self, table_id: str, path: str) -> bool:
        try:
            tablets = self.meta.tablets(table_id)
        except TableNotFoundError:
            return False
        return any(f.path == path for m in tablets for f in m.files)

    def _notify_tserver(self, extents: Sequence[Extent]) -> None:
        if self._refresh is None:
            return
        try:
            self._refresh(list(extents))
        except Exception as e:  # noqa: BLE001 - best effort (contract: refresh)
            log.debug("refresh of %s failed: %s", extents, e)

    # -- adoption and rebuild -----------------------------------------------------------------

    def _run_from_record(self, extent: Extent, rec: Mapping[str, Any]) -> RunningCompaction:
        detector = self._new_detector()
        # Treated as just heard from: its compactor gets the usual time to report.
        detector.heartbeat(self._clock())
        return RunningCompaction(
            ecid=str(rec["ecid"]),
            extent=extent,
            queue=str(rec.get("queue") or ""),
            kind=str(rec.get("kind", "SYSTEM")),
            compactor=str(rec.get("compactor") or ""),
            address=rec.get("address"),
            selection_id=rec.get("selection_id"),
            tmp_path=str(rec["tmp_path"]),
            output_path=str(rec["output_path"]),
            priority=int(rec.get("priority", 0)),
            started=float(rec.get("started", time.time())),
            detector=detector,
        )

    def _adopt_unknown(self, ecid: str) -> RunningCompaction | None:
        """Look for `ecid` in the metadata (a record this coordinator did not reserve).

        Rare: `rebuild` adopts every record at takeover. Returns the adopted compaction, or
        None (remembered, so the next report for it needs no scan).
        """
        for table in self.meta.list_tables():
            try:
                tablets = self.meta.tablets(table.id)
            except TableNotFoundError:
                continue
            for m in tablets:
                rec = m.compactions.get(ecid)
                if rec is not None and rec.get("ecid") == ecid:
                    run = self._run_from_record(m.extent, rec)
                    with self._lock:
                        return self._running.setdefault(ecid, run)
        with self._lock:
            if ecid in self._running:
                return self._running[ecid]
            self._remember_gone(ecid, None)
        return None

    def rebuild(self) -> RebuildReport:
        """Takeover: commit left-over final states, then adopt every running record."""
        self._check_active()
        report = RebuildReport()
        for fs in self.meta.final_states():
            with self._ecid_lock(fs.ecid):
                if fs.state == "FINISHED":
                    self._commit_final(fs.ecid, fs.extent, fs.data)
                    report.committed += 1
                else:
                    tmp = fs.data.get("tmp_path")
                    if isinstance(tmp, str):
                        self.storage.delete(tmp)
                    self._fenced(
                        lambda fs=fs: self.meta.mutate_tablet(
                            fs.extent, lambda m: reservation.release(m, fs.ecid), fence=self.fence
                        )
                    )
                    self._fenced(
                        lambda fs=fs: self.meta.delete_final_state(fs.ecid, fence=self.fence)
                    )
                    report.cleaned += 1
                with self._lock:
                    self._remember_gone(fs.ecid, None)
        for table in self.meta.list_tables():
            try:
                tablets = self.meta.tablets(table.id)
            except TableNotFoundError:
                continue
            for m in tablets:
                for key, rec in m.compactions.items():
                    if not isinstance(rec, Mapping) or rec.get("ecid") != key:
                        continue  # an internal compaction of the tablet server
                    run = self._run_from_record(m.extent, rec)
                    with self._lock:
                        if key not in self._running:
                            self._running[key] = run
                            report.adopted += 1
        log.info(
            "coordinator epoch %d rebuilt: %d committed, %d cleaned, %d running adopted",
            self.epoch,
            report.committed,
            report.cleaned,
            report.adopted,
        )
        return report

    # -- periodic check -----------------------------------------------------------------------

    def check(self) -> CheckReport:
        """Fail dead compactions, cancel vanished ones, follow async requests.

        Called every `coordinator.check.interval`. Every loop is bounded: one metadata read per
        table with running compactions, at most `max_asks_per_check` compactors asked.
        """
        self._check_active()
        report = CheckReport()
        now = self._clock()
        with self._lock:
            runs = [r for r in self._running.values() if r.state != COMMITTING]
            suspects = [r for r in runs if r.detector.is_suspect(now, self.config.phi_threshold)]
        self._check_records(runs, report)
        suspects = suspects[: self.config.max_asks_per_check]
        for run in suspects:
            answer = None
            if self._ask is not None and run.address:
                try:
                    answer = self._ask(run.address)
                except Exception as e:  # noqa: BLE001 - unreachable is an answer too
                    log.debug("compactor %s at %s unreachable: %s", run.compactor, run.address, e)
            if answer == run.ecid:
                continue
            with self._ecid_lock(run.ecid):
                with self._lock:
                    current = self._running.get(run.ecid)
                    still = (
                        current is run
                        and run.state != COMMITTING
                        and run.detector.is_suspect(self._clock(), self.config.phi_threshold)
                    )
                if not still:
                    continue
                log.warning(
                    "compactor %s (%s) stopped reporting compaction %s of %s; failing it",
                    run.compactor,
                    run.address,
                    run.ecid,
                    run.extent,
                )
                self._release(run, "cancelled" if run.state == CANCELLING else "failed")
                report.dead.append(run.ecid)
        self._check_requests(report)
        return report

    def _check_records(self, runs: Sequence[RunningCompaction], report: CheckReport) -> None:
        """Cancel running compactions whose record vanished or whose user selection ended."""
        by_table: dict[str, list[RunningCompaction]] = {}
        for r in runs:
            if r.state == RUNNING:
                by_table.setdefault(r.extent.table_id, []).append(r)
        for table_id, group in by_table.items():
            metas: dict[Extent, TabletMeta] = {}
            if len(group) > _CHECK_WHOLE_TABLE:
                with contextlib.suppress(TableNotFoundError):  # deleted: all vanished
                    metas = {m.extent: m for m in self.meta.tablets(table_id)}
            else:
                for run in group:
                    found = self.meta.get_tablet(run.extent)
                    if found is not None:
                        metas[run.extent] = found
            for run in group:
                m = metas.get(run.extent)
                reason = None
                if m is None:
                    reason = "tablet gone"
                elif run.ecid not in m.compactions:
                    reason = "record gone"
                elif run.kind == "USER" and (
                    m.selection is None or m.selection.get("id") != run.selection_id
                ):
                    reason = "user compaction cancelled"
                if reason is None:
                    continue
                with self._lock:
                    if run.state == RUNNING and self._running.get(run.ecid) is run:
                        run.state = CANCELLING
                        run.cancel_reason = reason
                        report.cancelled.append(run.ecid)
                        log.info("cancelling compaction %s of %s: %s", run.ecid, run.extent, reason)

    # -- async requests (SYSTEM.md 5.6) -------------------------------------------------------

    def submit_request(self, body: Mapping[str, Any]) -> tuple[str, float]:
        """SUBMIT: start a compact or flush request once; returns (id, tick)."""
        self._check_active()
        op = body.get("op")
        if op not in ("compact", "flush"):
            raise ValueError(f"request op must be compact or flush, not {op!r}")
        rid = request_id(body)
        tick = self.config.request_tick_s
        with self._lock:
            req = self._requests.get(rid)
            if req is not None:
                if req.detector is not None:
                    req.detector.heartbeat(self._clock())
                return rid, tick
        info = self.meta.get_table(str(body["table"]))
        detector = None
        if body.get("cancel_on_client_loss"):
            detector = self._new_detector(first_interval_s=tick)
            detector.heartbeat(self._clock())
        req = _Request(rid, op, info.name, info.id, dict(body), submitted=self._clock())
        req.detector = detector
        with self._lock:
            if rid in self._requests:
                return rid, tick
            self._requests[rid] = req
            self._trim_requests()
        self._pool.submit(self._start_request, req)
        return rid, tick

    def _start_request(self, req: _Request) -> None:
        tserver = self._tserver
        try:
            if tserver is None:
                raise LithifyError("no tablet server is known to the coordinator")
            body = req.body
            if req.op == "flush":
                tserver.flush(req.table)
                self._end_request(req, REQ_FINISHED)
                return
            start = body.get("start")
            end = body.get("end")
            selection_id = tserver.compact(
                req.table,
                None if start is None else bytes.fromhex(start),
                None if end is None else bytes.fromhex(end),
                list(body.get("iterators") or []),
                dict(body.get("hints") or {}),
                req.id,
            )
            with self._lock:
                req.selection_id = selection_id if isinstance(selection_id, str) else req.id
                req.selected = True
            self._follow_request(req)
        except Exception as e:  # noqa: BLE001 - reported to the client as FAILED
            log.info("request %s (%s %s) failed: %s", req.id, req.op, req.table, e)
            self._end_request(req, REQ_FAILED, str(e))

    def _end_request(self, req: _Request, state: str, error: str | None = None) -> bool:
        with self._lock:
            if req.state in _REQ_TERMINAL:
                return False
            req.state = state
            req.error = error
            req.ended = self._clock()
            return True

    def _follow_request(self, req: _Request) -> None:
        """A selected user compaction is done when no tablet still carries its selection."""
        if req.op != "compact" or not req.selected or req.state in _REQ_TERMINAL:
            return
        try:
            tablets = self.meta.tablets(req.table_id)
        except TableNotFoundError:
            self._end_request(req, REQ_FAILED, f"table {req.table!r} was deleted")
            return
        sid = req.selection_id
        mine = [m for m in tablets if m.selection and m.selection.get("id") == sid]
        pending = len(mine)
        with self._lock:
            if req.tablets_total == 0:
                req.files_selected = sum(len(m.selection.get("files", ())) for m in mine)
            req.tablets_pending = pending
            req.tablets_total = max(req.tablets_total, pending)
        if pending == 0:
            self._end_request(req, REQ_FINISHED)

    def request_status(self, rid: str) -> dict[str, Any]:
        """STATUS: the state (NOT_SUBMITTED when unknown here), the next tick and progress."""
        self._check_active()
        with self._lock:
            req = self._requests.get(rid)
            if req is not None and req.detector is not None:
                req.detector.heartbeat(self._clock())
        if req is None:
            return {"state": NOT_SUBMITTED, "tick_s": self.config.request_tick_s, "progress": {}}
        self._follow_request(req)
        return self._request_json(req)

    def cancel_request(self, rid: str) -> dict[str, Any]:
        """CANCEL: stop the request (a flush cannot be stopped, only forgotten)."""
        self._check_active()
        with self._lock:
            req = self._requests.get(rid)
        if req is None:
            return {"state": NOT_SUBMITTED, "tick_s": self.config.request_tick_s, "progress": {}}
        self._cancel_request(req, "cancelled by the client")
        return self._request_json(req)

    def _cancel_request(self, req: _Request, why: str) -> None:
        if not self._end_request(req, REQ_CANCELLED, why):
            return
        if req.op != "compact":
            return
        with self._lock:
            self._queues.remove_where(
                lambda qj: qj.extent.table_id == req.table_id and qj.job.kind == "USER"
            )
            for run in self._running.values():
                if (
                    run.state == RUNNING
                    and run.kind == "USER"
                    and run.selection_id is not None
                    and run.selection_id == req.selection_id
                ):
                    run.state = CANCELLING
                    run.cancel_reason = why
        tserver = self._tserver
        if tserver is not None:
            self._pool.submit(self._tserver_cancel, tserver, req.table)

    @staticmethod
    def _tserver_cancel(tserver: TserverClient, table: str) -> None:
        try:
            tserver.cancel_compaction(table)
        except Exception as e:  # noqa: BLE001 - the client already has its answer
            log.warning("cancelling the user compaction of %s on the tablet server: %s", table, e)

    def _request_json(self, req: _Request) -> dict[str, Any]:
        with self._lock:
            progress: dict[str, Any] = {"op": req.op, "table": req.table}
            if req.op == "compact":
                progress.update(
                    selection_made=req.selected,
                    tablets_total=req.tablets_total,
                    tablets_pending=req.tablets_pending,
                    selected=req.files_selected,
                    entries_read=req.entries_read,
                    entries_written=req.entries_written,
                    bytes_written=req.bytes_written,
                )
            if req.error:
                progress["error"] = req.error
            return {"state": req.state, "tick_s": self.config.request_tick_s, "progress": progress}

    def _check_requests(self, report: CheckReport) -> None:
        now = self._clock()
        with self._lock:
            live = [r for r in self._requests.values() if r.state == REQ_RUNNING]
        for req in live:
            if req.detector is not None and req.detector.is_suspect(now, self.config.phi_threshold):
                log.info("request %s: its client stopped polling; cancelling", req.id)
                self._cancel_request(req, "client lost")
                report.requests_cancelled.append(req.id)
            else:
                self._follow_request(req)
        with self._lock:
            self._trim_requests()

    def _trim_requests(self) -> None:
        now = self._clock()
        for rid in [
            r.id
            for r in self._requests.values()
            if r.ended is not None and now - r.ended > _REQUEST_KEEP_S
        ]:
            del self._requests[rid]
        while len(self._requests) > _REQUEST_MEMORY:
            self._requests.popitem(last=False)

    # -- observation --------------------------------------------------------------------------

    def running(self) -> list[dict[str, Any]]:
        now = self._clock()
        with self._lock:
            return [r.to_json(now) for r in self._running.values()]

    def running_ecids(self) -> set[str]:
        with self._lock:
            return set(self._running)

    def queued(self, queue: str, limit: int = 10) -> list[QueuedJob]:
        with self._lock:
            return self._queues.peek(queue, limit)

    def metrics(self) -> CoordinatorMetrics:
        now = self._clock()
        with self._lock:
            by_queue: dict[str, int] = {}
            for r in self._running.values():
                by_queue[r.queue] = by_queue.get(r.queue, 0) + 1
            requests: dict[str, int] = {}
            for req in self._requests.values():
                requests[req.state] = requests.get(req.state, 0) + 1
            return CoordinatorMetrics(
                active=self.active,
                epoch=self.epoch,
                queues=self._queues.stats(now),
                running=len(self._running),
                running_by_queue=by_queue,
                compactors_seen=sum(1 for t in self._seen.values() if now - t <= _SEEN_WINDOW_S),
                completed=self._counts["completed"],
                failed=self._counts["failed"],
                cancelled=self._counts["cancelled"],
                stale_dropped=self._counts["stale_dropped"],
                requests=requests,
            )
