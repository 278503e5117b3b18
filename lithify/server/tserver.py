"""The tablet server process: `lithify tserver --dir D [--metadata-url URL] [--port 0]`.

It hosts every tablet of the instance (the embedded `Store`), serves them over HTTP, forwards
external compaction plans to the coordinator, and publishes its URL in the `tserver` lease so
that clients and the coordinator find it. SIGTERM or SIGINT stop it in order: stop serving,
stop talking to the coordinator, give up the lease, close the store (background work stopped,
acknowledged writes safe in the write-ahead log).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

import lithify
from lithify.metadata.store import MetadataStore
from lithify.server.coordinator_link import CoordinatorLink
from lithify.server.instance import (
    TSERVER_LEASE,
    TSERVER_LEASE_TTL_S,
    announce,
    bind,
    ensure_secret,
    open_metadata,
    url_of,
)
from lithify.server.serving import ServerThread
from lithify.server.tserver_app import create_app
from lithify.store import Store

log = logging.getLogger(__name__)

#: Seconds between garbage collection passes of a tablet server.
DEFAULT_GC_INTERVAL_S = 300.0


class LeaseKeeper:
    """Holds a lease for `holder` in a thread: acquires it (waiting out a dead holder's TTL)
    and renews it every third of the TTL; releases it on `stop`."""

    def __init__(self, meta: MetadataStore, name: str, holder: str, ttl_s: float) -> None:
        self._meta = meta
        self._name = name
        self._holder = holder
        self._ttl = ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{name}", daemon=True)
        self.epoch: int | None = None

    def start(self) -> None:
        self._try()
        self._thread.start()

    def _try(self) -> None:
        try:
            epoch = self._meta.acquire_lease(self._name, self._holder, self._ttl)
        except Exception as e:
            log.warning("renewing lease %s failed: %s", self._name, e)
            return
        if epoch is None and self.epoch is not None:
            log.error("lost lease %s to another holder", self._name)
        elif epoch is not None and epoch != self.epoch:
            log.info("holding lease %s as %s (epoch %d)", self._name, self._holder, epoch)
        elif epoch is None:
            log.warning("lease %s is held by another process; retrying", self._name)
        self.epoch = epoch

    def _run(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            self._try()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._ttl)
        try:
            self._meta.release_lease(self._name, self._holder)
        except Exception as e:
            log.warning("releasing lease %s failed: %s", self._name, e)


def _hosted_extents(store: Store) -> list[lithify.Extent]:
    out = []
    for t in store.list_tables():
        if t.state == "online":
            try:
                out += [x.extent for x in store.tablets(t.name)]
            except lithify.LithifyError:
                continue  # deleted or taken offline meanwhile
    return out


class PeriodicGc:
    """Runs the garbage collector every `interval_s` seconds (never when it is 0).

    The tablet server is the process that knows which files its scans and flushes are using, so
    it is the one place the collector can run safely while the instance is live; compactors'
    outputs are protected by their running records and final states in the metadata. A file is
    deleted only when two passes one interval apart both found it unreferenced, which spares a
    scan that began on a view of the tablet older than an external commit.
    """

    def __init__(self, store: Store, interval_s: float) -> None:
        self._store = store
        self._interval = interval_s
        self._last = time.monotonic()
        self._pending: set[str] = set()

    def tick(self) -> None:
        """Collect if the interval has passed since the last pass; never raises."""
        if self._interval <= 0 or time.monotonic() - self._last < self._interval:
            return
        self._last = time.monotonic()
        try:
            if self._pending:
                self._store.gc(only=self._pending)
            self._pending = self._store.find_garbage()
        except Exception:
            log.exception("garbage collection failed; retrying in %.0f s", self._interval)


def _resync(store: Store) -> None:
    """Re-read every hosted tablet's metadata and plan the ones that changed: a safety net for
    refresh calls from the coordinator that never arrived."""
    for extent in _hosted_extents(store):
        if store.refresh_tablet(extent):
            store.manager.plan(extent)


def run_tserver(
    directory: str | os.PathLike,
    *,
    metadata_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    announce_file: str | os.PathLike | None = None,
    gc_interval_s: float = DEFAULT_GC_INTERVAL_S,
) -> int:
    """Run a tablet server until SIGTERM/SIGINT; returns the process exit status.

    Unreferenced data files are deleted after two passes `gc_interval_s` seconds apart found
    them (0: only on request).
    """
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    meta = open_metadata(directory, metadata_url)
    try:
        secret = ensure_secret(meta)
        sock = bind(host, port)
        url = url_of(sock)
        link = CoordinatorLink(meta, secret)
        store = lithify.open(directory, metadata_url=metadata_url, external_sink=link.sink)
        store.on_cancel = link.cancel_later
        server: ServerThread | None = None
        lease: LeaseKeeper | None = None
        status = 0
        try:
            link.start(
                replan_all=store.manager.plan_all,
                resync=lambda: _resync(store),
                resync_every=lambda: store.system_properties().get_duration(
                    "tserver.compaction.major.delay"
                ),
            )
            app = create_app(store, secret, link, url=url)
            server = ServerThread(app, sock, name="tserver-http")
            server.start()
            lease = LeaseKeeper(meta, TSERVER_LEASE, url, TSERVER_LEASE_TTL_S)
            lease.start()
            log.info("tablet server of %s serving at %s", Path(directory).resolve(), url)
            if announce_file:
                announce(announce_file, url)
            gc = PeriodicGc(store, gc_interval_s)
            while not stop.wait(0.5):
                gc.tick()
                if not server.alive:
                    log.error("the HTTP server stopped unexpectedly")
                    status = 1
                    break
        finally:
            if server is not None:
                server.stop()
            link.close()
            if lease is not None:
                lease.stop()
            store.close()
        log.info("tablet server stopped")
        return status
    finally:
        meta.close()
