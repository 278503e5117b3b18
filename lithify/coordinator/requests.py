"""Asynchronous requests (SYSTEM.md 5.6): SUBMIT, STATUS and CANCEL of a compact or a flush.

A client submits a request and polls its state; the request id is a hash of the request
(`request_id`), so a resubmission after a lost answer is recognised. A compact request asks the
tablet server for a user compaction, which selects files on every tablet concerned; the
request is done when no tablet carries its selection any more (`AsyncRequests.follow`).

Requests live only in the coordinator's memory: after a failover a STATUS answers
NOT_SUBMITTED and the client resubmits or gives up, as it chose. A request submitted with
`cancel_on_client_loss` is cancelled when its client stops polling (a phi-accrual detector over
the polls, judged by `AsyncRequests.check`).

Cancelling a compact request also stops its queued and running compactions; that is the
coordinator's business, reached through the `stop_user_work` callback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from lithify.coordinator.config import CoordinatorConfig
from lithify.coordinator.phi import PhiAccrualDetector
from lithify.errors import LithifyError, TableNotFoundError
from lithify.metadata.store import MetadataStore

log = logging.getLogger(__name__)

#: States of an asynchronous request.
REQ_RUNNING = "RUNNING"
REQ_FINISHED = "FINISHED"
REQ_FAILED = "FAILED"
REQ_CANCELLED = "CANCELLED"
NOT_SUBMITTED = "NOT_SUBMITTED"
_REQ_TERMINAL = frozenset({REQ_FINISHED, REQ_FAILED, REQ_CANCELLED})

_REQUEST_MEMORY = 10000
#: How long a finished async request stays answerable before it is forgotten.
_REQUEST_KEEP_S = 3600.0
#: The fields of a request that make its id.
_ID_FIELDS = (
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


def request_id(request: Mapping[str, Any]) -> str:
    """The id of an async request: a hash of all its fields, so a resubmission is recognised."""
    fields = {k: request.get(k) for k in _ID_FIELDS}
    canon = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


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


@dataclass
class AsyncRequest:
    """One submitted request and what is known of its progress."""

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


class AsyncRequests:
    """The coordinator's async requests: SUBMIT, STATUS, CANCEL and their periodic follow-up.

    `lock` is the coordinator's lock (its state and the requests' change together when a user
    compaction's pass commits); it is never held while the tablet server or the metadata store
    is called. The tablet server is called from a small thread pool owned here, so SUBMIT and
    CANCEL answer at once. `stop_user_work(table_id, selection_id, why)` stops a cancelled
    compact request's queued and running compactions (called without the lock).
    """

    def __init__(
        self,
        meta: MetadataStore,
        config: CoordinatorConfig,
        clock: Callable[[], float],
        lock: threading.RLock,
        tserver: TserverClient | None,
        stop_user_work: Callable[[str, str | None, str], None],
    ) -> None:
        self.meta = meta
        self.config = config
        self._clock = clock
        self._lock = lock
        self._tserver = tserver
        self._stop_user_work = stop_user_work
        self._requests: OrderedDict[str, AsyncRequest] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lithify-coord-req")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the three calls ----------------------------------------------------------------------

    def submit(self, body: Mapping[str, Any]) -> tuple[str, float]:
        """SUBMIT: start a compact or flush request once; returns (id, tick)."""
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
            detector = self.config.new_detector(first_interval_s=tick)
            detector.heartbeat(self._clock())
        req = AsyncRequest(rid, op, info.name, info.id, dict(body), submitted=self._clock())
        req.detector = detector
        with self._lock:
            if rid in self._requests:
                return rid, tick
            self._requests[rid] = req
            self._trim()
        self._pool.submit(self._start, req)
        return rid, tick

    def status(self, rid: str) -> dict[str, Any]:
        """STATUS: the state (NOT_SUBMITTED when unknown here), the next tick and progress."""
        with self._lock:
            req = self._requests.get(rid)
            if req is not None and req.detector is not None:
                req.detector.heartbeat(self._clock())
        if req is None:
            return self._not_submitted()
        self.follow(req)
        return self._to_json(req)

    def cancel(self, rid: str) -> dict[str, Any]:
        """CANCEL: stop the request (a flush cannot be stopped, only forgotten)."""
        with self._lock:
            req = self._requests.get(rid)
        if req is None:
            return self._not_submitted()
        self._cancel(req, "cancelled by the client")
        return self._to_json(req)

    # -- following requests -------------------------------------------------------------------

    def follow(self, req: AsyncRequest) -> None:
        """A selected user compaction is done when no tablet still carries its selection."""
        if req.op != "compact" or not req.selected or req.state in _REQ_TERMINAL:
            return
        try:
            tablets = self.meta.tablets(req.table_id)
        except TableNotFoundError:
            self._end(req, REQ_FAILED, f"table {req.table!r} was deleted")
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
            self._end(req, REQ_FINISHED)

    def check(self) -> list[str]:
        """Cancel requests whose client stopped polling, follow the others; returns the ids of
        the requests cancelled (called every `coordinator.check.interval`)."""
        now = self._clock()
        cancelled: list[str] = []
        with self._lock:
            live = [r for r in self._requests.values() if r.state == REQ_RUNNING]
        for req in live:
            if req.detector is not None and req.detector.is_suspect(now, self.config.phi_threshold):
                log.info("request %s: its client stopped polling; cancelling", req.id)
                self._cancel(req, "client lost")
                cancelled.append(req.id)
            else:
                self.follow(req)
        with self._lock:
            self._trim()
        return cancelled

    def cancel_selected(self, table_id: str) -> None:
        """A user compaction of the table was cancelled at the tablet server (another client's
        cancel, passed on here): the compact requests still waiting for it end CANCELLED.

        Without this a request only saw its selection vanish and answered FINISHED. The tablet
        server passes the cancel on before it drops the selection, so a request whose selection
        is still on a tablet now is the one being cancelled; one whose selection is gone already
        finished (or will be judged by `follow`).
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
            return  # deleted: `follow` ends its requests
        pending = {m.selection.get("id") for m in tablets if m.selection}
        for req in reqs:
            if req.selection_id in pending and self._end(
                req, REQ_CANCELLED, "cancelled by another client"
            ):
                log.info("request %s (compact %s): cancelled by another client", req.id, req.table)

    def count_pass(self, selection_id: str, data: Mapping[str, Any]) -> None:
        """Add a committed pass of a user compaction to its request's progress (lock held)."""
        for req in self._requests.values():
            if req.selection_id == selection_id:
                req.entries_read += int(data.get("entries_read", 0))
                req.entries_written += int(data.get("entries_written", 0))
                req.bytes_written += int(data.get("bytes_written", 0))

    def counts_by_state(self) -> dict[str, int]:
        """How many requests are in each state, for the metrics (lock held)."""
        counts: dict[str, int] = {}
        for req in self._requests.values():
            counts[req.state] = counts.get(req.state, 0) + 1
        return counts

    # -- internals ----------------------------------------------------------------------------

    def _start(self, req: AsyncRequest) -> None:
        """Run in the pool: ask the tablet server to flush, or to select a user compaction."""
        tserver = self._tserver
        try:
            if tserver is None:
                raise LithifyError("no tablet server is known to the coordinator")
            body = req.body
            if req.op == "flush":
                tserver.flush(req.table)
                self._end(req, REQ_FINISHED)
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
            self.follow(req)
        except Exception as e:  # noqa: BLE001 - reported to the client as FAILED
            log.info("request %s (%s %s) failed: %s", req.id, req.op, req.table, e)
            self._end(req, REQ_FAILED, str(e))

    def _end(self, req: AsyncRequest, state: str, error: str | None = None) -> bool:
        """Move `req` to a terminal state; False when it had one already."""
        with self._lock:
            if req.state in _REQ_TERMINAL:
                return False
            req.state = state
            req.error = error
            req.ended = self._clock()
            return True

    def _cancel(self, req: AsyncRequest, why: str) -> None:
        if not self._end(req, REQ_CANCELLED, why):
            return
        if req.op != "compact":
            return
        self._stop_user_work(req.table_id, req.selection_id, why)
        tserver = self._tserver
        if tserver is not None:
            self._pool.submit(self._tserver_cancel, tserver, req.table)

    @staticmethod
    def _tserver_cancel(tserver: TserverClient, table: str) -> None:
        try:
            tserver.cancel_compaction(table)
        except Exception as e:  # noqa: BLE001 - the client already has its answer
            log.warning("cancelling the user compaction of %s on the tablet server: %s", table, e)

    def _not_submitted(self) -> dict[str, Any]:
        return {"state": NOT_SUBMITTED, "tick_s": self.config.request_tick_s, "progress": {}}

    def _to_json(self, req: AsyncRequest) -> dict[str, Any]:
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

    def _trim(self) -> None:
        """Forget requests that ended long ago, and the oldest past a bound (lock held)."""
        now = self._clock()
        for rid in [
            r.id
            for r in self._requests.values()
            if r.ended is not None and now - r.ended > _REQUEST_KEEP_S
        ]:
            del self._requests[rid]
        while len(self._requests) > _REQUEST_MEMORY:
            self._requests.popitem(last=False)
