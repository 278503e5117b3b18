"""A compactor's work loop: ask the coordinator for a job, run it, report it until heard.

SYSTEM.md 5.5 and docs/EXTERNAL_COMPACTIONS.md say what a compactor owes the others:

* A fresh ECID before every request, so a job is never confused with an earlier one.
* Long-poll `/v1/compactor/next`; when idle (no job, or no coordinator), back off between
  `compactor.wait.time.job.min` and `.max` with jitter, doubling while idle; a job resets it.
* While running, `/v1/compactor/status` every second: the heartbeat the coordinator's failure
  detector listens to, and the way it says "cancel". The reservation counts as the first sign
  of life, so the first status goes one interval after the job began (a short job sends none).
* The final report (`finished` or `failed`) is retried, re-reading the coordinator's address
  from its lease each time, until a coordinator acknowledges it: a result is never lost while
  coordinators fail over. Status reports continue meanwhile, so the compaction is not judged
  dead.
* A graceful stop finishes the current job (cancelled past `compactor.cancel.grace`) and asks
  for no more. SIGKILL needs nothing: the coordinator notices the silence.

The compaction itself is `run_compaction`, the same code internal executors run; the compactor
writes only the temporary file, never renames and never touches metadata.

Between two jobs the compactor is idle, so the calls there are kept cheap: the coordinator's
address (its lease) is read at most once a second while calls succeed and again after any
failure, the timing properties at most every few seconds, and the job requests go through one
long-lived thread whose keep-alive connection serves job after job.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

from lithify.compaction.compactor_job import (
    CompactionRequest,
    CompactionResult,
    run_compaction,
)
from lithify.data.ranges import FileRef
from lithify.errors import CompactionCancelledError, LithifyError
from lithify.files.naming import tmp_name
from lithify.files.storage import Storage
from lithify.files.writer import DEFAULT_COMPRESSION
from lithify.metadata.store import MetadataStore
from lithify.rpc.client import RpcClient, RpcError
from lithify.rpc.wire import extent_from_json
from lithify.server.instance import COORDINATOR_LEASE, lease_holder
from lithify.table.properties import system_properties
from lithify.units import format_size

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 1.0
#: While calls to it succeed, the coordinator's address is taken from its lease at most this
#: often (a failed call reads the lease again at once).
LEASE_RECHECK_S = 1.0
#: The timing properties (`Timing`) are read again at most this often.
TIMING_RECHECK_S = 5.0
#: Longest pause between two attempts at a final report.
REPORT_MAX_DELAY_S = 10.0
#: After a graceful stop began, how long past the grace final reports are still retried; then
#: the process gives up on them (the coordinator fails the job when it notices the silence).
STOP_REPORT_LIMIT_S = 30.0


@dataclass(frozen=True)
class Timing:
    """The compactor's clocks, from system properties (read again every `TIMING_RECHECK_S`)."""

    wait_min_s: float
    wait_max_s: float
    cancel_grace_s: float


def request_from_job(
    job: dict[str, Any], ecid: str, threads: int | None = None
) -> CompactionRequest:
    """The compaction a job describes, to run on at most `threads` threads (None: the cores);
    LithifyError when the job is malformed."""
    try:
        extent = extent_from_json(job["extent"])
        output = str(job["output_path"])
        inputs = [FileRef.from_json(x) for x in job["inputs"]]
        expected_tmp = tmp_name(output, ecid)
        if job.get("tmp_path") not in (None, expected_tmp):
            raise LithifyError(f"job {ecid}: tmp_path {job['tmp_path']!r} is not {expected_tmp!r}")
        versions = job.get("versions", 1)
        return CompactionRequest(
            inputs=inputs,
            extent_range=extent.range,
            output_path=output,
            tmp_id=ecid,
            propagate_deletes=bool(job["propagate_deletes"]),
            versions=None if versions is None else int(versions),
            iterators=[
                (str(c), {str(k): str(v) for k, v in o.items()})
                for c, o in job.get("iterators") or ()
            ],
            compression=str(job.get("compression") or DEFAULT_COMPRESSION),
            **({} if threads is None else {"subcompactions": threads}),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LithifyError(f"job {ecid} is malformed: {e!r}") from None


class _Job:
    """One running job: its progress and whether it must stop."""

    def __init__(self, ecid: str, job: dict[str, Any]) -> None:
        self.ecid = ecid
        self.job = job
        self.read = 0
        self.written = 0
        self.cancel = threading.Event()
        self.reported = threading.Event()
        self.started = time.monotonic()

    def progress(self, read: int, written: int) -> None:
        self.read, self.written = read, written


class _CallThread:
    """One long-lived daemon thread that makes the job requests (`/v1/compactor/next`).

    A long-poll runs off the job loop so that a stop need not wait it out; a thread per request
    did that too, but each one opened a new connection to the coordinator (the client keeps one
    per thread), a TCP handshake and a new server connection for every job. A daemon thread
    also never holds up the process's exit.
    """

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="next-job", daemon=True)
            self._thread.start()
        fut: Future[Any] = Future()
        self._calls.put((fn, fut))
        return fut

    def _run(self) -> None:
        while True:
            fn, fut = self._calls.get()
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the waiting job loop
                fut.set_exception(e)


class Compactor:
    """Runs compaction jobs of one external queue, one at a time, until `stop` is called."""

    def __init__(
        self,
        *,
        meta: MetadataStore,
        storage: Storage,
        secret: str,
        queue: str,
        compactor_id: str,
        address: str,
        poll_wait_s: float = 30.0,
        threads: int | None = None,
    ) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._meta = meta
        #: Threads one compaction may use (None: every core); see `CompactionRequest`.
        self.threads = threads
        self._storage = storage
        self._secret = secret
        self.queue = queue
        self.id = compactor_id
        self.address = address
        self._poll_wait_s = poll_wait_s
        self._stopping = threading.Event()
        self._stop_time = 0.0
        self._clients: dict[str, RpcClient] = {}
        self._url: str | None = None
        self._url_read_at = 0.0
        self._calls = _CallThread()
        self._job: _Job | None = None
        self._timing = Timing(1.0, 300.0, 30.0)  # the defaults, until the properties are read
        self._timing = self._read_timing()
        self._timing_read_at = time.monotonic()
        self.completed = 0
        self.failed = 0
        self.cancelled = 0

    # -- observation --------------------------------------------------------------------------

    @property
    def running_ecid(self) -> str | None:
        """The ECID this compactor works on (until its final report is acknowledged)."""
        job = self._job
        return None if job is None else job.ecid

    def state(self) -> dict[str, Any]:
        job = self._job
        return {
            "compactor": self.id,
            "queue": self.queue,
            "ecid": None if job is None else job.ecid,
            "entries_read": 0 if job is None else job.read,
            "entries_written": 0 if job is None else job.written,
            "stopping": self._stopping.is_set(),
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
        }

    # -- control ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Graceful stop: take no more work; the current job has `compactor.cancel.grace`."""
        if not self._stopping.is_set():
            self._stop_time = time.monotonic()
            self._stopping.set()
            job = self._job
            log.info(
                "stopping: %s",
                f"finishing {job.ecid} (grace {self._timing.cancel_grace_s:g}s)"
                if job
                else "no job running",
            )

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _read_timing(self) -> Timing:
        try:
            props = system_properties(self._meta.get_system_properties())
            lo = props.get_duration("compactor.wait.time.job.min")
            hi = props.get_duration("compactor.wait.time.job.max")
            grace = props.get_duration("compactor.cancel.grace")
        except Exception as e:
            log.warning("cannot read compactor properties (%s); using defaults", e)
            return self._timing
        return Timing(max(0.01, lo), max(lo, hi), grace)

    # -- the coordinator ----------------------------------------------------------------------

    def _refresh_timing(self) -> None:
        """Read the timing properties again when the last read is `TIMING_RECHECK_S` old."""
        if time.monotonic() - self._timing_read_at >= TIMING_RECHECK_S:
            self._timing = self._read_timing()
            self._timing_read_at = time.monotonic()

    def _coordinator(self) -> RpcClient | None:
        """A client for the coordinator that holds the lease (None: nobody does), read from the
        lease unless it was read less than `LEASE_RECHECK_S` ago and no call failed since."""
        url = self._url
        if url is None or time.monotonic() - self._url_read_at >= LEASE_RECHECK_S:
            try:
                url, _ = lease_holder(self._meta, COORDINATOR_LEASE)
            except Exception as e:
                log.warning("cannot read the coordinator lease: %s", e)
                return None
            self._url, self._url_read_at = url, time.monotonic()
        if url is None:
            return None
        client = self._clients.get(url)
        if client is None:
            try:
                client = RpcClient(url, self._secret, timeout=30.0)
            except ValueError:
                log.error("the coordinator lease names a bad URL %r", url)
                return None
            self._clients[url] = client
        return client

    def _forget_coordinator(self) -> None:
        """A call failed: the next one reads the lease again (another coordinator may hold it)."""
        self._url = None

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Ask for work and do it until `stop`; returns once the last job is reported."""
        backoff = self._timing.wait_min_s
        while not self._stopping.is_set():
            self._refresh_timing()
            ecid = uuid.uuid4().hex
            job = self._next_job(ecid)
            if self._stopping.is_set() and job is None:
                break
            if job is None:
                pause = random.uniform(
                    self._timing.wait_min_s, max(self._timing.wait_min_s, backoff)
                )
                self._stopping.wait(pause)
                backoff = min(self._timing.wait_max_s, max(backoff, self._timing.wait_min_s) * 2)
                continue
            backoff = self._timing.wait_min_s
            self._run_job(ecid, job)
        log.info("compactor %s stopped", self.id)

    def _next_job(self, ecid: str) -> dict[str, Any] | None:
        """Long-poll for a job reserved under `ecid`; None when there is none (or no answer).

        The call runs on the job-request thread so that a stop request does not wait out the
        poll.
        """
        client = self._coordinator()
        if client is None:
            log.debug("no coordinator holds the lease; waiting")
            return None
        body = {
            "queue": self.queue,
            "compactor": self.id,
            "address": self.address,
            "ecid": ecid,
            "wait_s": self._poll_wait_s,
        }
        fut = self._calls.submit(
            lambda: client.call(
                "POST", "/v1/compactor/next", body, timeout=self._poll_wait_s + 15.0
            )
        )
        while not fut.done() and not self._stopping.is_set():
            wait_futures([fut], timeout=0.2)
        if not fut.done():
            # Stopping while the poll waits: a job may still be reserved for this ECID. Say it
            # is cancelled so it runs elsewhere at once (best effort: unanswered, the
            # coordinator finds out when it asks /v1/running).
            self._post_once(
                "/v1/compactor/failed",
                {
                    "ecid": ecid,
                    "compactor": self.id,
                    "state": "CANCELLED",
                    "error": "compactor stopping",
                },
            )
            return None
        try:
            reply = fut.result()
        except Exception as e:  # noqa: BLE001 - no answer is no job; the loop backs off
            self._forget_coordinator()
            log.info("asking %s for work failed: %s", client.base_url, e)
            return None
        job = reply.get("job") if isinstance(reply, dict) else None
        if job is not None and job.get("ecid", ecid) != ecid:
            log.error("the coordinator answered ECID %s with a job for %s", ecid, job.get("ecid"))
            return None
        return job

    def _post_once(self, path: str, body: dict[str, Any], timeout: float = 3.0) -> Any:
        client = self._coordinator()
        if client is None:
            return None
        try:
            return client.call("POST", path, body, timeout=timeout)
        except RpcError as e:
            self._forget_coordinator()
            log.debug("%s failed: %s", path, e)
            return None

    # -- one job ------------------------------------------------------------------------------

    def _run_job(self, ecid: str, job_json: dict[str, Any]) -> None:
        job = _Job(ecid, job_json)
        self._job = job
        heart = threading.Thread(target=self._heartbeat, args=(job,), name="status", daemon=True)
        heart.start()
        try:
            path, body = self._compact(job)
            self._report(job, path, body)
        finally:
            job.reported.set()
            heart.join(STATUS_INTERVAL_S * 5)
            self._job = None

    def _compact(self, job: _Job) -> tuple[str, dict[str, Any]]:
        """Run the compaction; returns the final report to make (path and body)."""
        ecid = job.ecid
        where = f"e.{self.queue}"
        try:
            request = request_from_job(job.job, ecid, self.threads)
            names = [f.path.rsplit("/", 1)[-1] for f in request.inputs]
            log.info(
                "Compacting %s on %s for %s from %s size %s ecid %s",
                extent_from_json(job.job["extent"]),
                where,
                job.job.get("kind", "SYSTEM"),
                names,
                format_size(sum(f.size for f in request.inputs)),
                ecid,
            )
            result: CompactionResult = run_compaction(
                self._storage, request, on_progress=job.progress, is_cancelled=job.cancel.is_set
            )
        except CompactionCancelledError:
            self.cancelled += 1
            log.info("Cancelled compaction %s on %s", ecid, where)
            return "/v1/compactor/failed", {
                "ecid": ecid,
                "compactor": self.id,
                "state": "CANCELLED",
                "error": "cancelled",
            }
        except Exception as e:
            self.failed += 1
            log.exception("compaction %s on %s failed", ecid, where)
            return "/v1/compactor/failed", {
                "ecid": ecid,
                "compactor": self.id,
                "state": "FAILED",
                "error": f"{type(e).__name__}: {e}",
            }
        self.completed += 1
        job.progress(result.entries_read, result.entries_written)
        log.info(
            "Compacted %s on %s created %s (%d entries, %s) ecid %s",
            extent_from_json(job.job["extent"]),
            where,
            result.tmp_path.rsplit("/", 1)[-1],
            result.entries_written,
            format_size(result.bytes_written),
            ecid,
        )
        return "/v1/compactor/finished", {
            "ecid": ecid,
            "compactor": self.id,
            "result": {
                "entries_read": result.entries_read,
                "entries_written": result.entries_written,
                "bytes_read": result.bytes_read,
                "bytes_written": result.bytes_written,
            },
        }

    def _heartbeat(self, job: _Job) -> None:
        """Status every second until the final report is acknowledged; applies the grace.

        The first one goes after one interval: the coordinator heard of this job when it
        reserved it, and a short job is done before it needs a heartbeat.
        """
        state = "STARTED"
        while not job.reported.wait(STATUS_INTERVAL_S):
            grace_over = time.monotonic() - self._stop_time >= self._timing.cancel_grace_s
            if self._stopping.is_set() and grace_over and not job.cancel.is_set():
                log.warning(
                    "grace of %gs is over: cancelling %s", self._timing.cancel_grace_s, job.ecid
                )
                job.cancel.set()
            reply = self._post_once(
                "/v1/compactor/status",
                {
                    "ecid": job.ecid,
                    "compactor": self.id,
                    "state": state,
                    "entries_read": job.read,
                    "entries_written": job.written,
                },
                timeout=STATUS_INTERVAL_S * 3,
            )
            if isinstance(reply, dict):
                state = "IN_PROGRESS"
                if reply.get("cancel") and not job.cancel.is_set():
                    log.info("the coordinator cancelled %s", job.ecid)
                    job.cancel.set()

    def _report(self, job: _Job, path: str, body: dict[str, Any]) -> bool:
        """Send the final report until a coordinator acknowledges it; True once it did.

        Bounded only by the process's life, except while stopping (see STOP_REPORT_LIMIT_S).
        """
        delay = 0.25
        attempt = 0
        while True:
            attempt += 1
            client = self._coordinator()
            if client is None:
                why = "no coordinator holds the lease"
            else:
                try:
                    reply = client.call("POST", path, body, timeout=60.0)
                except RpcError as e:
                    self._forget_coordinator()
                    why = str(e)
                else:
                    if not (isinstance(reply, dict) and reply.get("ack") is False):
                        if attempt > 1:
                            log.info(
                                "report %s of %s acknowledged after %d attempts",
                                path,
                                job.ecid,
                                attempt,
                            )
                        return True
                    self._forget_coordinator()
                    why = f"not acknowledged: {reply}"
            if self._stopping.is_set():
                limit = self._timing.cancel_grace_s + STOP_REPORT_LIMIT_S
                if time.monotonic() - self._stop_time > limit:
                    log.error(
                        "giving up reporting %s of %s while stopping (%s); the coordinator "
                        "will fail it when it notices this compactor is gone",
                        path,
                        job.ecid,
                        why,
                    )
                    return False
            pause = random.uniform(delay / 2, delay)
            log.warning(
                "report %s of %s failed (attempt %d: %s); retrying in %.1fs",
                path,
                job.ecid,
                attempt,
                why,
                pause,
            )
            time.sleep(pause)
            delay = min(REPORT_MAX_DELAY_S, delay * 2)
