"""The `lithify compaction-coordinator` process: lease, standby, takeover, checks, shutdown.

Several coordinator processes may run; the one holding the `coordinator` lease is active and the
others stand by, trying to take the lease every TTL/3 (docs/EXTERNAL_COMPACTIONS.md):

* standby -> active: `acquire_lease` succeeds with an epoch; a fresh `CompactionCoordinator` for
  that epoch commits left-over final states and adopts running records (`rebuild`), and only
  then serves. Compactor calls answer 503 until then, so compactors retry.
* active: renew every TTL/3. A renewal that returns another epoch or nobody (someone else took
  over), a fenced write that raised LeaseLostError, or no successful renewal for most of a TTL
  (the lease may have expired) makes it stop serving at once and go back to standby. The fence
  on every write is what makes this safe; stopping early only spares compactors useless calls.
* SIGTERM/SIGINT: stop serving, release the lease (a standby takes over without waiting for the
  TTL), stop the HTTP server, exit 0.

The HTTP server runs in a thread (`lithify.server.serving.ServerThread`); the main thread keeps
the signals and runs the lease loop. The tablet server and compactors are reached with
`RpcClient`: the tablet server's URL is read from its lease for every call (it may move).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

from lithify.coordinator.app import CoordinatorHolder, create_app
from lithify.coordinator.config import CoordinatorConfig
from lithify.coordinator.core import CompactionCoordinator
from lithify.data.ranges import Extent
from lithify.errors import LithifyError
from lithify.files.storage import Storage
from lithify.metadata.store import LeaseLostError, MetadataStore
from lithify.rpc.client import RpcClient
from lithify.rpc.wire import extent_to_json, hex_or_none
from lithify.server.instance import (
    COORDINATOR_LEASE,
    TSERVER_LEASE,
    announce,
    bind,
    open_metadata,
    read_secret,
    url_of,
)
from lithify.server.serving import ServerThread

log = logging.getLogger(__name__)

#: Timeout of a `GET /v1/running` asked of a suspect compactor.
ASK_TIMEOUT_S = 2.0
#: Timeout of a refresh call to the tablet server (best effort).
REFRESH_TIMEOUT_S = 5.0
#: Timeout of a user compaction or flush call to the tablet server.
TSERVER_CALL_TIMEOUT_S = 120.0
#: How long the tablet server's URL read from its lease is trusted.
_TSERVER_URL_TTL_S = 1.0
_REFRESH_BATCH = 500
_CLIENT_CACHE = 256


# ---------------------------------------------------------------------- other processes


class _Clients:
    """RpcClients by base URL, the least recently used dropped past a bound."""

    def __init__(self, secret: str, timeout: float) -> None:
        self._secret = secret
        self._timeout = timeout
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, RpcClient] = OrderedDict()

    def get(self, url: str) -> RpcClient:
        with self._lock:
            c = self._clients.get(url)
            if c is None:
                c = RpcClient(url, self._secret, timeout=self._timeout)
                self._clients[url] = c
                while len(self._clients) > _CLIENT_CACHE:
                    self._clients.popitem(last=False)[1].close()
            self._clients.move_to_end(url)
            return c

    def close(self) -> None:
        with self._lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()


class CompactorProbe:
    """`ask_compactor`: which ECID the compactor at `address` runs (`GET /v1/running`)."""

    def __init__(self, secret: str, timeout: float = ASK_TIMEOUT_S) -> None:
        self._clients = _Clients(secret, timeout)

    def __call__(self, address: str) -> str | None:
        answer = self._clients.get(address).call("GET", "/v1/running")
        ecid = answer.get("ecid") if isinstance(answer, Mapping) else None
        return ecid if isinstance(ecid, str) else None

    def close(self) -> None:
        self._clients.close()


class TserverLink:
    """The coordinator's calls to the tablet server, found through its lease.

    `refresh` never blocks a commit: extents are queued and a thread sends them in batches
    (`POST /v1/tablets/refresh`); with no tablet server they are dropped, since a tablet server
    reads the metadata when it loads a tablet anyway. The async-request calls are synchronous
    (the core runs them in its own threads). The tablet server's routes used besides the
    contract's refresh: `POST /v1/tables/{t}/compact` (answers the selection id as `id`),
    `POST /v1/tables/{t}/flush`, `POST /v1/tables/{t}/compact/cancel`.
    """

    def __init__(self, meta: MetadataStore, secret: str) -> None:
        self._meta = meta
        self._clients = _Clients(secret, TSERVER_CALL_TIMEOUT_S)
        self._url: tuple[float, str | None] = (0.0, None)
        self._queue: queue.Queue[Extent | None] = queue.Queue(maxsize=100_000)
        self._thread = threading.Thread(target=self._send_loop, name="tserver-refresh", daemon=True)
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(5.0)
        self._clients.close()

    def url(self) -> str | None:
        at, url = self._url
        now = time.monotonic()
        if now - at > _TSERVER_URL_TTL_S:
            info = self._meta.lease_info(TSERVER_LEASE)
            url = None if info is None else info.holder
            self._url = (now, url)
        return url

    def _client(self) -> RpcClient:
        url = self.url()
        if url is None:
            raise LithifyError("no tablet server holds the tserver lease")
        return self._clients.get(url)

    # -- refresh ------------------------------------------------------------------------------

    def refresh(self, extents: Sequence[Extent]) -> None:
        for e in extents:
            try:
                self._queue.put_nowait(e)
            except queue.Full:
                log.debug("refresh queue full; dropping %s", e)

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            first = self._queue.get()
            if first is None:
                return
            batch = {first}
            while len(batch) < _REFRESH_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    return
                batch.add(more)
            try:
                url = self.url()
                if url is None:
                    continue
                body = {"extents": [extent_to_json(e) for e in batch]}
                self._clients.get(url).call(
                    "POST", "/v1/tablets/refresh", body, timeout=REFRESH_TIMEOUT_S
                )
            except Exception as e:  # noqa: BLE001 - best effort by contract
                log.debug("refreshing %d tablets on the tablet server failed: %s", len(batch), e)

    # -- async requests (TserverClient) -------------------------------------------------------

    def compact(
        self,
        table: str,
        start: bytes | None,
        end: bytes | None,
        iterators: Sequence[Sequence[Any]],
        hints: Mapping[str, str],
        request_id: str,
    ) -> str | None:
        body = {
            # The request id becomes the selection id: a request resubmitted after a failover
            # then follows the selection it made instead of failing on it (SYSTEM.md 5.6).
            "id": request_id,
            "start": hex_or_none(start),
            "end": hex_or_none(end),
            "flush": True,
            "wait": False,
            "iterators": [list(i) for i in iterators],
            "hints": dict(hints),
        }
        answer = self._client().call("POST", f"/v1/tables/{_path(table)}/compact", body)
        sid = answer.get("id") if isinstance(answer, Mapping) else None
        return sid if isinstance(sid, str) else None

    def flush(self, table: str) -> None:
        self._client().call("POST", f"/v1/tables/{_path(table)}/flush", {"wait": True})

    def cancel_compaction(self, table: str) -> None:
        self._client().call("POST", f"/v1/tables/{_path(table)}/compact/cancel")


def _path(segment: str) -> str:
    return quote(segment, safe="")


# ---------------------------------------------------------------------- the lease loop


class CoordinatorRunner:
    """Standby until the lease is ours, then active until it is not; see the module docstring."""

    def __init__(
        self,
        meta: MetadataStore,
        storage: Storage,
        holder: CoordinatorHolder,
        url: str,
        *,
        probe: CompactorProbe | None = None,
        tserver: TserverLink | None = None,
    ) -> None:
        self.meta = meta
        self.storage = storage
        self.holder = holder
        self.url = url
        self._probe = probe
        self._tserver = tserver
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._lost = threading.Event()
        self._core: CompactionCoordinator | None = None
        self._last_renewal = 0.0
        self._config = CoordinatorConfig()
        self._checker: threading.Thread | None = None
        holder.on_lease_lost(lambda _core: self._on_lost())

    def _on_lost(self) -> None:
        self._lost.set()
        self._kick.set()

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler)."""
        self._stop.set()
        self._kick.set()

    def _read_config(self) -> CoordinatorConfig:
        try:
            return CoordinatorConfig.from_properties(self.meta.get_system_properties())
        except Exception as e:  # noqa: BLE001 - keep the last good configuration
            log.warning("reading the coordinator's properties failed: %s", e)
            return self._config

    def run(self) -> None:
        """The lease loop, until `stop`; always leaves the lease released."""
        self._checker = threading.Thread(target=self._check_loop, name="coord-check", daemon=True)
        self._checker.start()
        try:
            while not self._stop.is_set():
                if self._core is None:
                    self._config = self._read_config()
                    self._try_take_over()
                else:
                    self._renew()
                self._kick.wait(max(0.05, self._config.lease_ttl_s / 3.0))
                self._kick.clear()
        finally:
            self._step_down("stopping")
            try:
                self.meta.release_lease(COORDINATOR_LEASE, self.url)
            except Exception as e:  # noqa: BLE001 - it expires by itself
                log.warning("releasing the coordinator lease failed: %s", e)
            if self._checker is not None:
                self._checker.join(5.0)

    def _try_take_over(self) -> None:
        ttl = self._config.lease_ttl_s
        try:
            epoch = self.meta.acquire_lease(COORDINATOR_LEASE, self.url, ttl)
        except Exception as e:  # noqa: BLE001 - the database may be back next round
            log.warning("trying the coordinator lease failed: %s", e)
            return
        if epoch is None:
            return
        self._last_renewal = time.monotonic()
        self._lost.clear()
        core = CompactionCoordinator(
            self.meta,
            self.storage,
            epoch,
            config=self._config,
            ask_compactor=self._probe,
            refresh=None if self._tserver is None else self._tserver.refresh,
            tserver=self._tserver,
        )
        log.info("coordinator lease taken (epoch %d) at %s; rebuilding", epoch, self.url)
        try:
            core.rebuild()
        except LeaseLostError:
            log.warning("lost the coordinator lease while rebuilding (epoch %d)", epoch)
            core.close()
            return
        except Exception:
            log.exception("rebuilding the coordinator state failed; standing by")
            core.close()
            return
        self._core = core
        self.holder.activate(core)
        log.info("active coordinator (epoch %d) at %s", epoch, self.url)

    def _renew(self) -> None:
        core = self._core
        assert core is not None
        if self._lost.is_set() or not core.active:
            self._step_down("a fenced write found a newer epoch")
            return
        ttl = self._config.lease_ttl_s
        try:
            epoch = self.meta.acquire_lease(COORDINATOR_LEASE, self.url, ttl)
        except Exception as e:  # noqa: BLE001 - decided by how long renewals keep failing
            if time.monotonic() - self._last_renewal > 0.8 * ttl:
                self._step_down(f"the lease could not be renewed for {ttl * 0.8:.1f}s ({e})")
            else:
                log.warning("renewing the coordinator lease failed: %s", e)
            return
        if epoch != core.epoch:
            self._step_down(f"the lease now has epoch {epoch}, ours is {core.epoch}")
            return
        self._last_renewal = time.monotonic()

    def _step_down(self, why: str) -> None:
        core, self._core = self._core, None
        if core is None:
            return
        log.warning("coordinator epoch %d stops serving: %s", core.epoch, why)
        self.holder.deactivate()
        core.close()
        try:  # taken again (even by this process) only with a new epoch, fencing this core out
            self.meta.release_lease(COORDINATOR_LEASE, self.url)
        except Exception as e:  # noqa: BLE001 - it expires by itself
            log.warning("releasing the coordinator lease failed: %s", e)

    def _check_loop(self) -> None:
        while not self._stop.wait(max(0.05, self._config.check_interval_s)):
            core = self.holder.core
            if core is None:
                continue
            try:
                core.check()
            except LeaseLostError:
                self.holder.lease_lost(core)
            except Exception:
                log.exception("the coordinator's periodic check failed")


# ---------------------------------------------------------------------- the process


def run_coordinator(
    directory: str | os.PathLike,
    *,
    metadata_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    announce_file: str | os.PathLike | None = None,
) -> int:
    """Run a coordinator (active or standby) until SIGTERM/SIGINT; returns the exit status.

    Raises LithifyError when the instance has no secret (it is made by the tablet server or
    `lithify cluster start`, never here: a coordinator alone cannot initialise an instance).
    """
    meta = open_metadata(directory, metadata_url)
    runner: CoordinatorRunner | None = None

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        if runner is not None:
            runner.stop()

    try:
        secret = read_secret(meta)
        storage = Storage(str(Path(directory).resolve() / "data"))
        sock = bind(host, port)
        url = url_of(sock)
        holder = CoordinatorHolder()
        probe = CompactorProbe(secret)
        tserver = TserverLink(meta, secret)
        runner = CoordinatorRunner(meta, storage, holder, url, probe=probe, tserver=tserver)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        server = ServerThread(create_app(holder, secret), sock, name="coordinator-http")
        tserver.start()
        try:
            server.start()
            log.info("compaction coordinator of %s listening at %s", directory, url)
            if announce_file:
                announce(announce_file, url)
            runner.run()
        finally:
            server.stop()
            tserver.close()
            probe.close()
        log.info("compaction coordinator stopped")
        return 0
    finally:
        meta.close()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lithify compaction-coordinator",
        description="Run the compaction coordinator of an instance (active or standby).",
    )
    p.add_argument("--dir", dest="directory", required=True, help="instance directory")
    p.add_argument(
        "--metadata-url",
        default=os.environ.get("LITHIFY_METADATA_URL"),
        help="SQLAlchemy URL of the metadata store (default: SQLite file in the directory)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    p.add_argument("--announce", default=None, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lithify.coordinator.process --dir D [--port P]`."""
    args = _parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_coordinator(
            args.directory,
            metadata_url=args.metadata_url,
            host=args.host,
            port=args.port,
            announce_file=args.announce,
        )
    except LithifyError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
