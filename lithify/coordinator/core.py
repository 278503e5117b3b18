"""The compaction coordinator (docs/EXTERNAL_COMPACTIONS.md): the class that wires its parts.

The coordinator owns the external queues and the running set. Everything durable lives in the
metadata store; what it keeps in memory (queued jobs, failure detectors, async requests) is
either re-sent by the tablet server (plans) or rebuilt from the metadata on takeover
(`rebuild`), so a coordinator may die at any instant.

Every metadata write is fenced with `("coordinator", epoch)`: once another process holds the
lease with a newer epoch, each write raises `LeaseLostError` before changing anything, and from
then on this object refuses all work (`active` is False) so its process can answer 503 and
compactors go to the new coordinator.

The parts, one concept each (this class holds the shared lock and the calls' order):

* `config.py`: `CoordinatorConfig`, from the `coordinator.*` system properties;
* `queues.py`: the external queues the tablet server's plans fill (pure);
* `reserve.py`: a queued job reserved for a compactor, group-committed (`next_jobs`);
* `running.py`: the running set, and the judgements of dead or vanished compactions (`check`);
* `commit.py`: the final state and the commit protocol, or the release of a failed compaction;
* `requests.py`: the asynchronous requests SUBMIT / STATUS / CANCEL (SYSTEM.md 5.6).

Collaborators from outside are injected so that tests run the real logic against a real
metadata store and real files, and only the other processes are stood in for:

* `ask_compactor(address) -> ecid | None`: which ECID a compactor runs now (`GET /v1/running`);
  None or an exception means it cannot confirm, so the compaction is failed.
* `refresh(extents)`: tell the tablet server that these tablets' metadata changed (best effort;
  the process implementation does not block).
* `tserver`: a `TserverClient` for the async requests (user compactions and flushes).

Dependencies point one way: the HTTP app (`app.py`) calls this module, which calls its parts,
the metadata store, the storage layer and the reservation rules of the tablet package.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lithify.coordinator.commit import (
    COMMITTED,
    BackgroundCommits,
    Committer,
    Refresh,
    final_state_data,
)
from lithify.coordinator.config import CoordinatorConfig
from lithify.coordinator.phi import PhiAccrualDetector
from lithify.coordinator.queues import (
    ExternalQueues,
    PlannedJob,
    QueuedJob,
    QueueStats,
    planned_job_from_json,
)
from lithify.coordinator.requests import (
    NOT_SUBMITTED,
    AsyncRequests,
    TserverClient,
    request_id,
)
from lithify.coordinator.reserve import (
    JobAnswer,
    JobRequest,
    Reservation,
    Reserver,
    TablePropsCache,
)
from lithify.coordinator.running import (
    CANCELLING,
    COMMITTING,
    AskCompactor,
    RunningCompaction,
    RunningSet,
    SeenCompactors,
    confirmed_by,
    find_record,
    records,
    suspected,
    vanished,
)
from lithify.data.ranges import Extent
from lithify.errors import LithifyError
from lithify.files.storage import Storage
from lithify.metadata.store import FinalState, LeaseLostError, MetadataStore

#: Names other modules imported from here before the split; they stay importable.
__all__ = [
    "LEASE_NAME",
    "NOT_SUBMITTED",
    "CheckReport",
    "CompactionCoordinator",
    "CoordinatorConfig",
    "CoordinatorMetrics",
    "JobAnswer",
    "JobRequest",
    "NotActiveError",
    "RebuildReport",
    "RunningCompaction",
    "TserverClient",
    "planned_job_from_json",
    "request_id",
]

log = logging.getLogger(__name__)

LEASE_NAME = "coordinator"

_ECID_LOCK_STRIPES = 64
#: How long `close` lets queued background commits run; what is left a successor commits.
_CLOSE_DRAIN_S = 5.0


class NotActiveError(LithifyError):
    """This coordinator is not the active one (standby, closed, or stopping)."""


@dataclass
class RebuildReport:
    """What a takeover found: final states committed or cleaned, running records adopted, and
    final states whose recovery failed (left in the metadata, to be retried)."""

    committed: int = 0
    cleaned: int = 0
    adopted: int = 0
    failed: int = 0


@dataclass
class CheckReport:
    """What one periodic check did, by ECID (compactions) and id (requests)."""

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
        self._lock = threading.RLock()
        self._ecid_locks = [threading.Lock() for _ in range(_ECID_LOCK_STRIPES)]
        self._queues = ExternalQueues(self.config.queue_max)
        self._running = RunningSet()
        self._seen = SeenCompactors()
        self._listeners: list[Callable[[Mapping[str, int]], None]] = []
        self._counts = {"completed": 0, "failed": 0, "cancelled": 0, "stale_dropped": 0}
        self._deposed = False
        self._closed = False
        self._committer = Committer(meta, storage, self.fence, self._fenced, refresh)
        self._commits: BackgroundCommits[tuple[RunningCompaction, dict[str, Any]]] = (
            BackgroundCommits(self._commit_one)
        )
        props = TablePropsCache(meta, clock, self.config.table_props_ttl_s)
        self._reserver = Reserver(meta, self.fence, self._fenced, props)
        self._requests = AsyncRequests(
            meta, self.config, clock, self._lock, tserver, self._stop_user_work
        )

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
        """Stop serving; queued commits get `_CLOSE_DRAIN_S` (this coordinator still holds
        its lease while it closes), and whatever is left a successor's `rebuild` commits."""
        self._closed = True
        self._requests.close()
        if not self._commits.close(_CLOSE_DRAIN_S):
            log.warning("closing with commits pending; the next coordinator finishes them")

    def drain_commits(self, timeout: float | None = None) -> bool:
        """Wait until the background commits of the `finished` reports so far are done (tests,
        and `close`); False when `timeout` passed first."""
        return self._commits.drain(timeout)

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

    def _heard_now(self) -> PhiAccrualDetector:
        """A fresh detector that has just heard from its peer (a reserved or adopted
        compaction: its compactor gets the usual time to report)."""
        detector = self.config.new_detector()
        detector.heartbeat(self._clock())
        return detector

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
                if matches(run.extent, run.kind) and run.request_cancel("cancelled"):
                    n += 1
        if kind == "USER" and extents is None:
            # The table's user compaction is cancelled (the tablet server's cancel endpoint);
            # a USER cancel naming tablets only drops those tablets' jobs (it is also sent
            # asynchronously, and may arrive after a new user compaction started).
            self._requests.cancel_selected(table_id)
        return n

    def _stop_user_work(self, table_id: str, selection_id: str | None, why: str) -> None:
        """A compact request was cancelled: drop the table's queued user jobs and stop the
        running compactions of its selection."""
        with self._lock:
            self._queues.remove_where(
                lambda qj: qj.extent.table_id == table_id and qj.job.kind == "USER"
            )
            if selection_id is None:
                return
            for run in self._running.values():
                if run.kind == "USER" and run.selection_id == selection_id:
                    run.request_cancel(why)

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
                self._seen.saw(req.compactor, now)
                if req.ecid in self._running:
                    answers[i] = self._job_of(req)
                elif req.ecid in firsts:
                    repeats.append(i)  # the same ECID twice in one batch: a retry of the first
                elif not self._running.ended(req.ecid):
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
                results = self._reserver.reserve_all([(requests[i], qj) for i, qj in batch])
            except Exception as e:  # noqa: BLE001 - the answer of this round's requests
                if not isinstance(e, LeaseLostError):  # deposed: the queues die with this core
                    self._put_back([qj for _, qj in batch])
                for i, _ in batch:
                    answers[i] = e
                break
            live = []
            failed: list[QueuedJob] = []
            for (i, qj), result in zip(batch, results, strict=True):
                if isinstance(result, Reservation):
                    answers[i] = self._start_running(result).job
                elif isinstance(result, Exception):
                    answers[i] = result
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
                    answers[i] = self._job_of(requests[i])
        return answers

    def _job_of(self, req: JobRequest) -> dict[str, Any] | None:
        """The job already reserved under `req.ecid` for this compactor (a retried request), or
        None (lock held)."""
        known = self._running.get(req.ecid)
        return known.job if known is not None and known.compactor == req.compactor else None

    def _put_back(self, jobs: Sequence[QueuedJob]) -> None:
        """Return taken jobs whose reservation failed for a passing reason (not staleness)."""
        if jobs:
            with self._lock:
                for qj in jobs:
                    self._queues.put_back(qj)

    def _start_running(self, r: Reservation) -> RunningCompaction:
        """A written reservation, now in the running set with the job its compactor gets."""
        run = RunningCompaction.from_record(r.qj.extent, r.record, self._heard_now(), r.job())
        with self._lock:
            self._running.put(run)
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
            self._seen.saw(compactor, now)
            run = self._running.get(ecid)
            if run is not None:
                run.detector.heartbeat(now)
                run.status = state
                run.entries_read = int(entries_read)
                run.entries_written = int(entries_written)
                return run.state == CANCELLING
            if self._running.ended(ecid):
                return True
        if not lookup:
            return None
        run = self._adopt_unknown(ecid)
        return run is None

    def finished(self, ecid: str, compactor: str, result: Mapping[str, Any]) -> None:
        """Record the final state of a finished compaction, then commit it in the background.

        Returns once the final state is written: that is the durable decision (SYSTEM.md 5.5),
        so the compactor may go on to its next job. The rest of the commit (rename, commit,
        forget; all repeatable) runs on the background committer (`_commit_one`), and a
        successor's `rebuild` finishes it if this coordinator dies first. Until then the
        compaction stays in the running set as COMMITTING, which failure detection and
        cancellation leave alone (its compactor no longer reports on it).

        A report for an ECID that is committing already, or neither running nor recorded (a
        repeat after the commit, or a compaction cancelled meanwhile), changes nothing.
        """
        self._check_active()
        with self._ecid_lock(ecid):
            run = self._report_target(ecid, compactor)
            if run is None:
                log.debug("finished report for unknown ECID %s: nothing to do", ecid)
                return
            with self._lock:
                if run.state == COMMITTING:
                    return  # a repeated report: the final state is written, the commit queued
                before, run.state = run.state, COMMITTING
            try:
                data = self._put_final_state(run, result)
            except BaseException:
                with self._lock:
                    run.state = before
                raise
        if not self._commits.submit((run, data)):
            # Closed meanwhile: nothing here commits it, and the next coordinator may have
            # rebuilt already. The compactor reports again to it (writing the final state again
            # is harmless).
            raise NotActiveError(f"coordinator is closed; compaction {ecid} not committed")

    def _commit_one(self, item: tuple[RunningCompaction, dict[str, Any]]) -> bool:
        """The background commit of a recorded final state, and its bookkeeping.

        Returns False to be tried again later (a passing error); True when done, or when it is
        a successor's to finish (deposed: the fenced writes fail; closed: no retries).
        """
        run, data = item
        if self._deposed:
            return True
        try:
            outcome = self._committer.commit(run.ecid, run.extent, data)
        except LeaseLostError:
            log.warning("compaction %s: deposed before its commit; left to the successor", run.ecid)
            return True
        except Exception:
            log.exception("commit of compaction %s of %s failed", run.ecid, run.extent)
            return self._closed
        with self._lock:
            self._running.end(run.ecid)
            self._counts["completed" if outcome == COMMITTED else "cancelled"] += 1
            if outcome == COMMITTED and run.kind == "USER" and run.selection_id:
                self._requests.count_pass(run.selection_id, data)
        return True

    def failed(self, ecid: str, compactor: str, state: str = "FAILED", error: str = "") -> None:
        """A compaction failed or was cancelled: delete its temporary file, release its files."""
        self._check_active()
        with self._ecid_lock(ecid):
            run = self._report_target(ecid, compactor)
            if run is None or run.state == COMMITTING:
                return  # ended, or finished already: its recorded final state decides
            cancelled = state == "CANCELLED" or run.state == CANCELLING
            if error:
                log.info("compaction %s of %s %s: %s", ecid, run.extent, state.lower(), error)
            self._release(run, "cancelled" if cancelled else "failed")

    def _report_target(self, ecid: str, compactor: str) -> RunningCompaction | None:
        """The running compaction a final report (`finished`, `failed`) is about (ECID lock
        held), adopted from the metadata if need be; None when it already ended or is unknown.

        An ended compaction's output is nobody's: a temporary file it left (it was judged dead
        or cancelled while its compactor still wrote) is deleted now.
        """
        with self._lock:
            self._seen.saw(compactor, self._clock())
            run = self._running.get(ecid)
            ended = self._running.ended(ecid)
            tmp = self._running.leftover_tmp(ecid)
        if run is not None:
            return run
        if ended:
            if tmp:
                self.storage.delete(tmp)
            return None
        return self._adopt_unknown(ecid)

    def _put_final_state(self, run: RunningCompaction, result: Mapping[str, Any]) -> dict[str, Any]:
        """Commit step 1 for `run`; returns the final state's data."""
        data = final_state_data(
            result,
            tmp_path=run.tmp_path,
            output_path=run.output_path,
            kind=run.kind,
            queue=run.queue,
            compactor=run.compactor,
        )
        self._committer.put_final_state(run.ecid, run.extent, data)
        return data

    def record_final_state(self, ecid: str, result: Mapping[str, Any]) -> dict[str, Any]:
        """Only step 1 of `finished` (tests use it to stage a crash before the commit)."""
        self._check_active()
        with self._lock:
            run = self._running.get(ecid)
        if run is None:
            raise LithifyError(f"compaction {ecid} is not running")
        return self._put_final_state(run, result)

    def _release(self, run: RunningCompaction, outcome: str) -> None:
        """Delete the temporary output and remove the record (the files become candidates)."""
        self._committer.release(run.extent, run.ecid, run.tmp_path)
        with self._lock:
            self._running.end(run.ecid, run.tmp_path)
            self._counts[outcome] += 1

    # -- adoption and rebuild -----------------------------------------------------------------

    def _adopt_unknown(self, ecid: str) -> RunningCompaction | None:
        """Look for `ecid` in the metadata (a record this coordinator did not reserve).

        Rare: `rebuild` adopts every record at takeover. Returns the adopted compaction, or
        None (remembered, so the next report for it needs no scan).
        """
        found = find_record(self.meta, ecid)
        if found is not None:
            run = RunningCompaction.from_record(*found, self._heard_now())
            with self._lock:
                return self._running.add(run)
        with self._lock:
            known = self._running.get(ecid)
            if known is None:
                self._running.end(ecid)
            return known

    def rebuild(self) -> RebuildReport:
        """Takeover: commit left-over final states, then adopt every running record.

        A final state whose recovery fails stays in the metadata (and does not stop the
        takeover): a FINISHED one is queued on the background committer, which retries it;
        any other is tried again at the next takeover.
        """
        self._check_active()
        report = RebuildReport()
        retry: list[FinalState] = []
        for fs in self.meta.final_states():
            with self._ecid_lock(fs.ecid):
                try:
                    recovered = self._committer.recover(fs)
                except LeaseLostError:
                    raise
                except Exception:
                    log.exception(
                        "takeover: recovery of final state %s (%s) of %s failed; temporary %s,"
                        " output %s; left to retry",
                        fs.ecid,
                        fs.state,
                        fs.extent,
                        fs.data.get("tmp_path"),
                        fs.data.get("output_path"),
                    )
                    report.failed += 1
                    if fs.state == "FINISHED" and {"tmp_path", "output_path"} <= fs.data.keys():
                        retry.append(fs)
                    continue
                if recovered:
                    report.committed += 1
                else:
                    report.cleaned += 1
                with self._lock:
                    self._running.end(fs.ecid)
        for extent, rec in records(self.meta):
            run = RunningCompaction.from_record(extent, rec, self._heard_now())
            with self._lock:
                if self._running.add(run) is run:
                    report.adopted += 1
        for fs in retry:
            self._retry_commit(fs)
        log.info(
            "coordinator epoch %d rebuilt: %d committed, %d cleaned, %d running adopted,"
            " %d final states failed",
            self.epoch,
            report.committed,
            report.cleaned,
            report.adopted,
            report.failed,
        )
        return report

    def _retry_commit(self, fs: FinalState) -> None:
        """Queue the commit of a FINISHED final state that `rebuild` failed to recover, as
        COMMITTING (the running record adopted for it, else one made from the final state)."""
        fallback = RunningCompaction.from_record(
            fs.extent, {**fs.data, "ecid": fs.ecid}, self._heard_now()
        )
        with self._lock:
            run = self._running.add(fallback)
            run.state = COMMITTING
        self._commits.submit((run, dict(fs.data)))

    # -- periodic check -----------------------------------------------------------------------

    def check(self) -> CheckReport:
        """Fail dead compactions, cancel vanished ones, follow async requests.

        Called every `coordinator.check.interval`. Every loop is bounded: one metadata read per
        table with running compactions, at most `max_asks_per_check` compactors asked.
        """
        self._check_active()
        report = CheckReport()
        threshold = self.config.phi_threshold
        now = self._clock()
        with self._lock:
            runs = [r for r in self._running.values() if r.state != COMMITTING]
            suspects = [r for r in runs if suspected(r, now, threshold)]
        for run, reason in vanished(self.meta, runs):
            with self._lock:
                if self._running.get(run.ecid) is run and run.request_cancel(reason):
                    report.cancelled.append(run.ecid)
                    log.info("cancelling compaction %s of %s: %s", run.ecid, run.extent, reason)
        for run in suspects[: self.config.max_asks_per_check]:
            if confirmed_by(self._ask, run):
                continue
            with self._ecid_lock(run.ecid):
                with self._lock:
                    still = self._running.get(run.ecid) is run and suspected(
                        run, self._clock(), threshold
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
        report.requests_cancelled = self._requests.check()
        return report

    # -- async requests (SYSTEM.md 5.6) -------------------------------------------------------

    def submit_request(self, body: Mapping[str, Any]) -> tuple[str, float]:
        """SUBMIT: start a compact or flush request once; returns (id, tick)."""
        self._check_active()
        return self._requests.submit(body)

    def request_status(self, rid: str) -> dict[str, Any]:
        """STATUS: the state (NOT_SUBMITTED when unknown here), the next tick and progress."""
        self._check_active()
        return self._requests.status(rid)

    def cancel_request(self, rid: str) -> dict[str, Any]:
        """CANCEL: stop the request (a flush cannot be stopped, only forgotten)."""
        self._check_active()
        return self._requests.cancel(rid)

    # -- observation --------------------------------------------------------------------------

    def running(self) -> list[dict[str, Any]]:
        now = self._clock()
        with self._lock:
            return [r.to_json(now) for r in self._running.values()]

    def running_ecids(self) -> set[str]:
        with self._lock:
            return self._running.ecids()

    def queued(self, queue: str, limit: int = 10) -> list[QueuedJob]:
        with self._lock:
            return self._queues.peek(queue, limit)

    def metrics(self) -> CoordinatorMetrics:
        now = self._clock()
        with self._lock:
            return CoordinatorMetrics(
                active=self.active,
                epoch=self.epoch,
                queues=self._queues.stats(now),
                running=len(self._running),
                running_by_queue=self._running.by_queue(),
                compactors_seen=self._seen.count(now),
                completed=self._counts["completed"],
                failed=self._counts["failed"],
                cancelled=self._counts["cancelled"],
                stale_dropped=self._counts["stale_dropped"],
                requests=self._requests.counts_by_state(),
            )
