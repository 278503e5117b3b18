"""The compactor process: `lithify compactor -q QUEUE --dir D [--metadata-url] [--port 0]`.

Besides its work loop (`Compactor.run`, in the main thread) it serves one small app whose
`GET /v1/running` lets the coordinator confirm what a silent compactor is doing. SIGTERM or
SIGINT stop it gracefully (the current job finishes, or is cancelled past
`compactor.cancel.grace`); a second signal stops it at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lithify.compactor.compactor import Compactor
from lithify.files.storage import Storage
from lithify.rpc.auth import SecretMiddleware
from lithify.server.instance import announce, bind, open_metadata, read_secret, url_of
from lithify.server.serving import ServerThread

log = logging.getLogger(__name__)

#: How long a compactor waits at start for an initialising instance to make its secret.
SECRET_WAIT_S = 30.0


def create_app(compactor: Compactor, secret: str) -> FastAPI:
    """The compactor's app: what it runs, for the coordinator's failure detector."""
    app = FastAPI(title="lithify compactor", version="1")
    app.add_middleware(SecretMiddleware, secret=secret)

    @app.get("/v1/running")
    def running() -> dict[str, Any]:
        return {"compactor": compactor.id, "ecid": compactor.running_ecid}

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        return {**compactor.state(), "pid": os.getpid(), "address": compactor.address}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(_exposition(compactor), media_type="text/plain; version=0.0.4")

    return app


def _exposition(compactor: Compactor) -> bytes:
    """Prometheus text: busy or idle, jobs by outcome, progress of the current job."""
    st = compactor.state()
    labels = ["queue", "compactor"]
    values = [compactor.queue, compactor.id]
    busy = GaugeMetricFamily("lithify_compactor_busy", "1 while a job runs", labels=labels)
    busy.add_metric(values, 1 if st["ecid"] else 0)
    jobs = CounterMetricFamily(
        "lithify_compactor_jobs", "jobs run, by outcome", labels=[*labels, "outcome"]
    )
    for outcome in ("completed", "failed", "cancelled"):
        jobs.add_metric([*values, outcome], st[outcome])
    progress = GaugeMetricFamily(
        "lithify_compactor_entries", "entries of the current job", labels=[*labels, "what"]
    )
    progress.add_metric([*values, "read"], st["entries_read"])
    progress.add_metric([*values, "written"], st["entries_written"])
    families = [busy, jobs, progress]

    class _Collector(Collector):
        def collect(self) -> Iterator[Metric]:
            yield from families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry)


def run_compactor(
    directory: str | os.PathLike,
    queue: str,
    *,
    metadata_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    compactor_id: str | None = None,
    announce_file: str | os.PathLike | None = None,
    poll_wait_s: float = 30.0,
    threads: int | None = None,
) -> int:
    """Run a compactor for `queue` until stopped; returns the process exit status."""
    meta = open_metadata(directory, metadata_url)
    try:
        secret = read_secret(meta, wait_s=SECRET_WAIT_S)
        sock = bind(host, port)
        url = url_of(sock)
        cid = compactor_id or f"{socket.gethostname()}:{sock.getsockname()[1]}"
        compactor = Compactor(
            meta=meta,
            storage=Storage(str(Path(directory).resolve() / "data")),
            secret=secret,
            queue=queue,
            compactor_id=cid,
            address=url,
            poll_wait_s=poll_wait_s,
            threads=threads,
        )
        signals = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if signals.is_set():
                log.warning("second signal %d: exiting now", signum)
                os._exit(1)
            signals.set()
            log.info("signal %d: stopping gracefully", signum)
            compactor.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        server = ServerThread(create_app(compactor, secret), sock, name="compactor-http")
        server.start()
        log.info("compactor %s for queue %s serving at %s", cid, queue, url)
        if announce_file:
            announce(announce_file, url)
        try:
            compactor.run()
        finally:
            server.stop()
        return 0
    finally:
        meta.close()
