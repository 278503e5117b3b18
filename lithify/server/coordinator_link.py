"""The tablet server's link to the compaction coordinator.

Three duties (docs/EXTERNAL_COMPACTIONS.md):

* The external sink: every plan's jobs for external queues go to `POST /v1/queues/plan`. The
  store calls the sink while planning (from flush threads, the periodic planner, commits), so
  the sink only records the newest plan per tablet; one sender thread posts them. A newer plan
  of a tablet replaces an unsent older one, which is exactly what the coordinator would do with
  it anyway. When no coordinator answers the plan is dropped (logged, rate limited): periodic
  planning sends it again.
* Watching the `coordinator` lease: when another coordinator takes over (new epoch), or the
  coordinator answers again after plans were dropped, every tablet is planned again so that the
  fresh coordinator's queues fill at once instead of after the next planning period.
* Cancellation: table delete, split, merge and the cancel of a user compaction tell the
  coordinator (`POST /v1/cancel`, best effort) so running external compactions stop within
  seconds; the coordinator's own metadata check catches anything this misses.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from lithify.compaction.spi import CompactionJob
from lithify.data.ranges import Extent
from lithify.metadata.store import MetadataStore
from lithify.rpc.client import RpcClient, RpcError
from lithify.rpc.wire import extent_to_json
from lithify.server.instance import COORDINATOR_LEASE, lease_holder
from lithify.tablet.reservation import reserved_files

log = logging.getLogger(__name__)

#: How often the lease is read; a new coordinator is noticed within this.
WATCH_INTERVAL_S = 1.0
#: Least time between two "the coordinator is back" re-plans of every tablet (a coordinator that
#: holds its lease but does not answer would otherwise cause one every watch interval).
REPLAN_MIN_INTERVAL_S = 5.0
PLAN_TIMEOUT_S = 10.0
#: Least time between two reads of the lease by the plan sender while no coordinator is known.
LEASE_RELOOK_S = 0.1
CANCEL_TIMEOUT_S = 5.0
_LOG_INTERVAL_S = 30.0


class _Throttled:
    """Log a warning at most once per interval per key; counts what it held back."""

    def __init__(self, interval: float = _LOG_INTERVAL_S) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e18) < self._interval:
                self._held[key] = self._held.get(key, 0) + 1
                return
            held = self._held.pop(key, 0)
            self._last[key] = now
        suffix = f" ({held} similar message(s) suppressed)" if held else ""
        log.warning(msg + suffix, *args)


class CoordinatorLink:
    """Forwards plans to, and cancels on, whichever coordinator holds the lease.

    Create it before the store (its `sink` is the store's external sink), then `start` it with
    the callbacks that need the store.
    """

    def __init__(self, meta: MetadataStore, secret: str) -> None:
        self._meta = meta
        self._secret = secret
        self._cv = threading.Condition()
        self._pending: dict[Hashable, Sequence[CompactionJob]] = {}
        self._stop = threading.Event()
        self._clients: dict[str, RpcClient] = {}
        self._url: str | None = None
        self._epoch = 0
        #: A plan was dropped since the coordinator last answered: re-plan when it is back.
        self._dropped = False
        self._last_replan = 0.0
        self._lease_looked = 0.0
        self._replan_all: Callable[[], None] = lambda: None
        self._resync: Callable[[], None] = lambda: None
        self._resync_every: Callable[[], float] = lambda: 30.0
        self._threads: list[threading.Thread] = []
        self._cancels: queue.Queue[tuple[str, list[Extent] | None, str | None] | None] = (
            queue.Queue(maxsize=10_000)
        )
        self._warn = _Throttled()
        self.plans_sent = 0
        self.plans_dropped = 0

    # -- wiring -------------------------------------------------------------------------------

    def start(
        self,
        *,
        replan_all: Callable[[], None],
        resync: Callable[[], None],
        resync_every: Callable[[], float],
    ) -> None:
        """Start the sender and the lease watcher.

        `replan_all` plans every hosted tablet; `resync` re-reads every hosted tablet's metadata
        (a safety net for refresh calls that never arrived), run every `resync_every()` s.
        """
        self._replan_all = replan_all
        self._resync = resync
        self._resync_every = resync_every
        self._read_lease()
        for target, name in (
            (self._send_loop, "plan-sender"),
            (self._watch_loop, "lease-watch"),
            (self._cancel_loop, "cancel-sender"),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        with contextlib.suppress(queue.Full):
            self._cancels.put_nowait(None)
        for t in self._threads:
            t.join(timeout_s)
        for c in self._clients.values():
            c.close()

    @property
    def coordinator(self) -> tuple[str | None, int]:
        """(URL, epoch) of the coordinator as last read from its lease."""
        return self._url, self._epoch

    # -- the sink -----------------------------------------------------------------------------

    def sink(self, extent: Hashable, jobs: Sequence[CompactionJob]) -> None:
        """The store's external sink: remember the newest plan of `extent` for the sender."""
        with self._cv:
            self._pending[extent] = tuple(jobs)
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self._pending)

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                while not self._pending and not self._stop.is_set():
                    self._cv.wait(1.0)
                if self._stop.is_set():
                    return
                extent = next(iter(self._pending))
                jobs = self._pending.pop(extent)
            try:
                self._send_plan(extent, jobs)
            except Exception:
                log.exception("sending the plan of %s to the coordinator failed", extent)

    def _send_plan(self, extent: Hashable, jobs: Sequence[CompactionJob]) -> None:
        if not isinstance(extent, Extent):
            return
        client = self._client()
        if client is None and jobs and time.monotonic() - self._lease_looked >= LEASE_RELOOK_S:
            # The watcher may not have looked since a coordinator took the lease (the server
            # or the coordinator just started): look now rather than drop the plan until the
            # watcher's next round (measured: the first jobs of a fresh cluster started 0.3 to
            # 0.8 s late).
            self._lease_looked = time.monotonic()
            client = self._client(self._read_lease()[0])
        if client is None:
            if jobs:
                self._drop(f"no coordinator holds the {COORDINATOR_LEASE!r} lease")
            # An empty plan needs no coordinator: a coordinator that takes the lease later
            # starts with empty queues, and every tablet is planned again for it anyway.
            return
        body = {"extent": extent_to_json(extent), "jobs": self._jobs_json(extent, jobs)}
        try:
            client.call("POST", "/v1/queues/plan", body, timeout=PLAN_TIMEOUT_S)
        except RpcError as e:
            if e.unreachable:
                self._read_lease()
            self._drop(str(e))
            return
        self.plans_sent += 1

    def _jobs_json(self, extent: Extent, jobs: Sequence[CompactionJob]) -> list[dict[str, Any]]:
        """The jobs with their files as the tablet's FileRefs (fence included), looked up by
        URI in the tablet's current metadata. A job naming a file the tablet no longer has, or
        one a running compaction holds, is left out: the plan was made from this server's view
        of the tablet, which learns of a reservation only when the coordinator's refresh
        arrives, and the change that removed or reserved the file brings a newer plan. (Such a
        job would wait in the queue until a compactor's reservation failed on it.)"""
        if not jobs:
            return []
        meta = self._meta.get_tablet(extent)
        if meta is None:
            return []
        busy = {f.uri for f in reserved_files(meta)}
        by_uri = {f.uri: f for f in meta.files if f.uri not in busy}
        out = []
        for job in jobs:
            refs = [by_uri.get(f.uri) for f in job.files]
            if any(r is None for r in refs):
                continue
            out.append(
                {
                    "files": [r.to_json() for r in refs if r is not None],
                    "executor": job.executor,
                    "priority": job.priority,
                    "kind": str(job.kind),
                }
            )
        return out

    def _drop(self, why: str) -> None:
        self.plans_dropped += 1
        self._dropped = True
        self._warn.warning(
            "drop",
            "external compaction plans are not reaching a coordinator (%s); "
            "periodic planning will send them again",
            why,
        )

    # -- the coordinator's address ------------------------------------------------------------

    def _read_lease(self) -> tuple[str | None, int]:
        try:
            url, epoch = lease_holder(self._meta, COORDINATOR_LEASE)
        except Exception as e:
            self._warn.warning("lease", "cannot read the coordinator lease: %s", e)
            return self._url, self._epoch
        self._url, self._epoch = url, epoch
        return url, epoch

    def _client(self, url: str | None = None) -> RpcClient | None:
        url = url or self._url
        if url is None:
            return None
        client = self._clients.get(url)
        if client is None:
            try:
                client = RpcClient(url, self._secret, timeout=PLAN_TIMEOUT_S)
            except ValueError:
                self._warn.warning("url", "the coordinator lease names a bad URL %r", url)
                return None
            self._clients[url] = client
        return client

    def _watch_loop(self) -> None:
        seen = (self._url, self._epoch)
        next_resync = time.monotonic() + self._safe_resync_every()
        while not self._stop.wait(WATCH_INTERVAL_S):
            url, epoch = self._read_lease()
            if url is not None and (url, epoch) != seen:
                log.info("coordinator is now %s (epoch %d): planning every tablet", url, epoch)
                self._replan()
            elif url is not None and self._dropped:
                # Plans were dropped and a coordinator holds the lease (again): send them now
                # rather than after the next planning period. Rate limited, in case it still
                # does not answer.
                self._replan_soon()
            seen = (url, epoch)
            if time.monotonic() >= next_resync:
                next_resync = time.monotonic() + self._safe_resync_every()
                try:
                    self._resync()
                except Exception:
                    log.exception("re-reading tablet metadata failed")

    def _safe_resync_every(self) -> float:
        try:
            return max(1.0, float(self._resync_every()))
        except Exception:
            return 30.0

    def _replan_soon(self) -> None:
        if time.monotonic() - self._last_replan >= REPLAN_MIN_INTERVAL_S:
            self._replan()

    def _replan(self) -> None:
        self._last_replan = time.monotonic()
        self._dropped = False
        try:
            self._replan_all()
        except Exception:
            log.exception("planning every tablet for the coordinator failed")

    # -- cancellation -------------------------------------------------------------------------

    def cancel(
        self, table_id: str, extents: Sequence[Extent] | None = None, kind: str | None = None
    ) -> int | None:
        """Ask the coordinator to drop queued and stop running compactions; best effort.

        Returns how many it cancelled, or None when no coordinator answered.
        """
        url, _ = self._read_lease()
        client = self._client(url)
        if client is None:
            return None
        body = {
            "table_id": table_id,
            "extents": None if extents is None else [extent_to_json(e) for e in extents],
            "kind": kind,
        }
        try:
            reply = client.call("POST", "/v1/cancel", body, timeout=CANCEL_TIMEOUT_S)
        except RpcError as e:
            self._warn.warning("cancel", "could not tell the coordinator to cancel: %s", e)
            return None
        return int(reply.get("cancelled", 0)) if isinstance(reply, dict) else 0

    def cancel_later(
        self, table_id: str, extents: Sequence[Extent] | None, kind: object = None
    ) -> None:
        """`cancel` from a thread of its own: the store calls this (`Store.on_cancel`) while it
        holds its lock during a split, merge or delete, which must not wait for the network.
        Those extents are gone for good, so the cancel may arrive after newer plans."""
        wanted = None if extents is None else list(extents)
        try:
            self._cancels.put_nowait((table_id, wanted, None if kind is None else str(kind)))
        except queue.Full:
            self._warn.warning("cancel-full", "too many cancellations queued; dropping one")

    def _cancel_loop(self) -> None:
        while not self._stop.is_set():
            item = self._cancels.get()
            if item is None:
                return
            try:
                self.cancel(*item)
            except Exception:
                log.exception("passing a cancellation to the coordinator failed")
