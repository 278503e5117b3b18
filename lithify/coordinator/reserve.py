"""Reserving queued jobs for compactors: the record, the job handed out, the group commit.

A compactor's `POST /v1/compactor/next` becomes a `JobRequest`. The coordinator takes a queued
job for it and reserves the job's files in the tablet's metadata with a conditional update that
records the running compaction under the compactor's ECID (docs/EXTERNAL_COMPACTIONS.md,
"Records in the tablet metadata"). `Reservation.apply` is that update as a function of the
tablet's metadata; `Reserver.reserve_all` writes many of them in one `mutate_tablets` call (the
group commit), each still its own compare-and-set that fails alone when its tablet changed.
`Reservation.job` is the JSON job the compactor then receives.

Which requests get which queued jobs, and the retries over stale jobs, are the coordinator's
(`CompactionCoordinator.next_jobs`): this module only turns (request, job) pairs into records.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lithify.coordinator.commit import Guard
from lithify.coordinator.queues import QueuedJob
from lithify.data.ranges import FileRef
from lithify.errors import ConditionalUpdateError, TableNotFoundError
from lithify.files.naming import new_file_name, tmp_name
from lithify.metadata.store import MetadataStore, TableInfo, TabletMeta
from lithify.rpc.wire import extent_to_json
from lithify.table.properties import Properties, iterator_specs, table_properties
from lithify.tablet import reservation
from lithify.tablet.compactions import _reserve_checked
from lithify.tablet.reservation import ReservationError
from lithify.tablet.tablet import newest_first

log = logging.getLogger(__name__)

#: Conflicting writes a reservation tolerates before its job is dropped as too busy.
_RESERVE_ATTEMPTS = 20


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
class Reservation:
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

    def job(self) -> dict[str, Any]:
        """The job the compactor receives (docs/EXTERNAL_COMPACTIONS.md, `ExternalJob`), once
        `apply` was written: the table's iterators, versions and codec, plus a user
        compaction's own iterators."""
        qj, props, record = self.qj, self.props, self.record
        iterators = [[c, dict(o)] for c, o in iterator_specs(props, "majc")]
        if qj.job.kind == "USER" and self.selection is not None:
            iterators += [[c, dict(o)] for c, o in self.selection.get("iterators", [])]
        return {
            "ecid": self.request.ecid,
            "extent": extent_to_json(qj.extent),
            "inputs": [f.to_json() for f in newest_first(self.files)],
            "output_path": record["output_path"],
            "tmp_path": record["tmp_path"],
            "propagate_deletes": record["propagate_deletes"],
            "versions": props.get_int("table.versions"),
            "iterators": iterators,
            "compression": props["table.file.compress.type"],
            "kind": qj.job.kind,
            "queue": qj.queue,
            "priority": qj.job.priority,
        }


class TablePropsCache:
    """Table properties by table id, each kept `ttl_s` (a reservation needs them for every job,
    and they change rarely)."""

    def __init__(self, meta: MetadataStore, clock: Callable[[], float], ttl_s: float) -> None:
        self.meta = meta
        self._clock = clock
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Properties]] = {}

    def get(self, table_id: str) -> Properties:
        """The table's properties; TableNotFoundError when the table is gone."""
        now = self._clock()
        with self._lock:
            hit = self._cache.get(table_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        props = table_properties(self._table_by_id(table_id).properties)
        with self._lock:
            self._cache[table_id] = (now + self._ttl_s, props)
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


class Reserver:
    """Writes reservations: many jobs in one fenced conditional update of many tablets."""

    def __init__(
        self,
        meta: MetadataStore,
        fence: tuple[str, int],
        guard: Guard[Any],
        props: TablePropsCache,
    ) -> None:
        self.meta = meta
        self.fence = fence
        self._guard = guard
        self._props = props

    def reserve_all(
        self, pairs: Sequence[tuple[JobRequest, QueuedJob]]
    ) -> list[Reservation | Exception | None]:
        """Reserve each job for its request in one conditional update of many tablets.

        Per pair: the written reservation; None when the job is stale (its files gone or
        reserved, its tablet or table gone, or the tablet kept changing under us); or the
        unexpected error of that pair. A lost lease or a database error raises for all.
        """
        results: list[Reservation | Exception | None] = [None] * len(pairs)
        todo: list[tuple[int, Reservation]] = []
        for k, (req, qj) in enumerate(pairs):
            try:
                props = self._props.get(qj.extent.table_id)
            except TableNotFoundError:
                continue
            todo.append((k, Reservation(req, qj, props)))
        if not todo:
            return results
        # The only competitor of a reservation is the tablet server's occasional update of
        # the same tablet, so a conflict is retried at once (no backoff).
        outcomes = self._guard(
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
                results[k] = r
                _log_reserved(r)
            # else: the tablet is gone (split, merged, table deleted)
        return results


def _log_reserved(r: Reservation) -> None:
    """The line tests and operators read to see what ran where (tests/test_faults_config.py)."""
    if log.isEnabledFor(logging.INFO):
        log.info(
            "Reserved %s on %s for %s from %s (ecid %s, compactor %s)",
            r.qj.extent,
            r.qj.queue,
            r.qj.job.kind,
            [f.path.rsplit("/", 1)[-1] for f in r.files],
            r.request.ecid,
            r.request.compactor,
        )
