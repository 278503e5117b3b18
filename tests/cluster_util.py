"""A local cluster of real processes for integration tests, and the `cluster` fixture.

`LocalCluster` starts the processes of one instance under a test's tmp_path exactly as
`lithify cluster start` does (`python -m lithify ...`, each in its own process group, logs in
`<dir>/logs`), and gives tests what fault tests need: URLs and leases, clients, kill -9 or
SIGTERM of one process, restart, bounded waits that print the logs when they time out. The
fixture kills every process it started in teardown, whatever the test did.

Use:

    def test_something(cluster):
        cluster.start(coordinators=1, compactors=2, system_properties={...})
        with cluster.client() as c:
            ...
        cluster.kill("compactor-1")             # SIGKILL the whole process group
        cluster.wait_for(lambda: ..., 20, "what we waited for")
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pytest

import lithify
from lithify.compaction.iterators import CompactionIterator
from lithify.metadata.store import MetadataStore
from lithify.server import launcher
from lithify.server.instance import (
    COORDINATOR_LEASE,
    TSERVER_LEASE,
    ensure_secret,
    lease_holder,
    open_metadata,
)
from lithify.table.properties import validate_system_property

T = TypeVar("T")

#: Where the repository lives: child processes get it on PYTHONPATH so that test plug-ins
#: (`tests.cluster_util:SlowIterator`) load in them wherever pytest was started.
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Bound on a process becoming ready (imports take seconds on a small, busy machine).
READY_TIMEOUT_S = 120.0
#: Properties every test cluster gets unless the test says otherwise: idle compactors poll
#: often, so tests do not wait out a five-minute backoff.
FAST_PROPERTIES = {
    "compactor.wait.time.job.min": "100ms",
    "compactor.wait.time.job.max": "1s",
}
ALL_EXTERNAL = '[{"name": "all", "type": "external", "queue": "%s"}]'


class ClusterError(AssertionError):
    """A bounded wait in a cluster test ran out (the message carries the processes' logs)."""


def wait_for(
    condition: Callable[[], T],
    timeout_s: float,
    what: str = "condition",
    *,
    interval_s: float = 0.1,
    on_timeout: Callable[[], str] | None = None,
) -> T:
    """Poll `condition` until it returns something truthy (returned), at most `timeout_s`.

    Exceptions from `condition` count as "not yet" (a server may be restarting); the last one
    is reported if time runs out.
    """
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - polled again; reported on timeout
            last_error = e
        if time.monotonic() >= deadline:
            extra = f"; last error: {last_error!r}" if last_error else ""
            logs = f"\n{on_timeout()}" if on_timeout else ""
            raise ClusterError(f"timed out after {timeout_s:g}s waiting for {what}{extra}{logs}")
        time.sleep(interval_s)


class SlowIterator(CompactionIterator):
    """A compaction iterator that sleeps `sleep_s` per batch (in short slices), so tests can
    catch a compaction while it runs. Keeps every entry."""

    def init(self, options: Mapping[str, str]) -> None:
        self.sleep_s = float(options.get("sleep_s", "1"))

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        end = time.monotonic() + self.sleep_s
        while time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        return batch


SLOW_ITERATOR = "tests.cluster_util:SlowIterator"


class LocalCluster:
    """The processes of one instance in `directory`; see the module docstring."""

    def __init__(
        self, directory: Path, *, metadata_url: str | None = None, queue: str = "DCQ1"
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.metadata_url = metadata_url
        self.queue = queue
        self.records: dict[str, launcher.ProcessRecord] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self._args: dict[str, tuple[str, list[str]]] = {}
        self._clients: list[lithify.Client] = []
        self._meta: MetadataStore | None = None
        self._counter: dict[str, int] = {}

    # -- starting -----------------------------------------------------------------------------

    @property
    def meta(self) -> MetadataStore:
        """The instance's metadata store, opened by the test process (closed in teardown)."""
        if self._meta is None:
            self._meta = open_metadata(self.directory, self.metadata_url)
        return self._meta

    @property
    def secret(self) -> str:
        return ensure_secret(self.meta)

    def init(self, system_properties: Mapping[str, str] | None = None) -> None:
        """Make the secret and set system properties (validated) before anything starts."""
        ensure_secret(self.meta)
        props = {**FAST_PROPERTIES, **(system_properties or {})}
        self.meta.set_system_properties(
            {k: None if v is None else validate_system_property(k, v) for k, v in props.items()}
        )

    def _common(self) -> list[str]:
        url = ["--metadata-url", self.metadata_url] if self.metadata_url else []
        return ["--dir", str(self.directory), *url]

    def _command(self, kind: str, extra: list[str]) -> list[str]:
        if kind == "tserver":
            return ["tserver", *self._common(), *extra]
        if kind == "coordinator":
            return ["compaction-coordinator", *self._common(), *extra]
        if kind == "compactor":
            return ["compactor", "-q", self.queue, *self._common(), "--poll-wait", "5", *extra]
        raise ValueError(f"unknown process kind {kind!r}")

    def _name(self, kind: str) -> str:
        if kind == "tserver":
            return "tserver"
        self._counter[kind] = self._counter.get(kind, 0) + 1
        return f"{kind}-{self._counter[kind]}"

    def start(
        self,
        *,
        tserver: bool = True,
        coordinators: int = 1,
        compactors: int = 1,
        system_properties: Mapping[str, str] | None = None,
        external_only: bool = False,
        compactor_threads: int | None = None,
    ) -> LocalCluster:
        """Initialise the instance and start its processes at once, waiting until each answers.

        `external_only` sends every compaction of the default service to the external queue;
        `compactor_threads` is each compactor's `--threads` (None: the compactor's default).
        """
        props = dict(system_properties or {})
        if external_only:
            props.setdefault(
                "tserver.compaction.major.service.default.planner.opts.executors",
                ALL_EXTERNAL % self.queue,
            )
        self.init(props)
        kinds = ["tserver"] * tserver + ["coordinator"] * coordinators + ["compactor"] * compactors
        threads = [] if compactor_threads is None else ["--threads", str(compactor_threads)]
        spawned = [self._spawn(kind, threads if kind == "compactor" else None) for kind in kinds]
        for sp in spawned:
            self._ready(sp)
        return self

    def _spawn(self, kind: str, extra: list[str] | None = None, name: str | None = None) -> Any:
        name = name or self._name(kind)
        args = self._command(kind, list(extra or []))
        self._args[name] = (kind, list(extra or []))
        path = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
        env = {"PYTHONPATH": os.pathsep.join(p for p in path if p)}
        sp = launcher.spawn(self.directory, name, kind, args, env=env)
        self.procs[name] = sp.proc
        return sp

    def _ready(self, sp: Any) -> launcher.ProcessRecord:
        rec = launcher.ready(self.directory, sp, READY_TIMEOUT_S)
        self.records[sp.name] = rec
        return rec

    def add(self, kind: str, *extra: str) -> str:
        """Start one more process of `kind` (tserver, coordinator, compactor); returns its name."""
        sp = self._spawn(kind, list(extra))
        self._ready(sp)
        return sp.name

    def restart(self, name: str) -> launcher.ProcessRecord:
        """Start a process again under the same name and arguments (after a kill or stop)."""
        if self.alive(name):
            raise ClusterError(f"{name} is still running")
        kind, extra = self._args[name]
        return self._ready(self._spawn(kind, extra, name))

    # -- looking --------------------------------------------------------------------------------

    def url(self, name: str) -> str:
        return self.records[name].url

    def pid(self, name: str) -> int:
        return self.records[name].pid

    def names(self, kind: str | None = None) -> list[str]:
        return [n for n, r in self.records.items() if kind is None or r.kind == kind]

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def lease(self, name: str) -> tuple[str | None, int]:
        """(holder URL, epoch) of a lease (`tserver`, `coordinator`)."""
        return lease_holder(self.meta, name)

    def coordinator_url(self) -> str | None:
        return self.lease(COORDINATOR_LEASE)[0]

    def tserver_url(self) -> str | None:
        return self.lease(TSERVER_LEASE)[0]

    def active_coordinator(self) -> str | None:
        """The name of the coordinator process that holds the lease, if one of ours does."""
        url = self.coordinator_url()
        for n in self.names("coordinator"):
            if self.records[n].url == url and self.alive(n):
                return n
        return None

    def client(self, **kw: Any) -> lithify.Client:
        """A client found through the instance directory (closed in teardown)."""
        c = lithify.connect(self.directory, metadata_url=self.metadata_url, wait_s=30, **kw)
        self._clients.append(c)
        return c

    def log(self, name: str) -> str:
        """The whole log of process `name`."""
        try:
            return (self.directory / "logs" / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def logs_tail(self, lines: int = 40) -> str:
        parts = []
        for name in self.procs:
            path = self.directory / "logs" / f"{name}.log"
            parts.append(f"----- {name} ({'alive' if self.alive(name) else 'dead'}) -----")
            parts.append(launcher.log_tail(path, lines))
        return "\n".join(parts)

    def wait_for(
        self, condition: Callable[[], T], timeout_s: float, what: str = "condition", **kw: Any
    ) -> T:
        """`wait_for` that appends the processes' logs when it times out."""
        return wait_for(condition, timeout_s, what, on_timeout=self.logs_tail, **kw)

    # -- faults ---------------------------------------------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL, *, wait_s: float = 30.0) -> int | None:
        """Send `sig` to the process group of `name`; for SIGKILL, reap it. Returns the exit
        status when the process ended within `wait_s` (None if it did not)."""
        proc = self.procs[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        try:
            return proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self, name: str, *, wait_s: float = 60.0) -> int | None:
        """SIGTERM (a graceful stop); returns the exit status, None if it outlived `wait_s`."""
        return self.kill(name, signal.SIGTERM, wait_s=wait_s)

    # -- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process started (whole process groups), reap them, close clients."""
        for c in self._clients:
            with contextlib.suppress(Exception):  # teardown goes on whatever a client says
                c.close()
        self._clients.clear()
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        if self._meta is not None:
            self._meta.close()
            self._meta = None


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A `LocalCluster` in tmp_path (nothing started yet); every process is killed afterwards."""
    c = LocalCluster(tmp_path / "instance")
    try:
        yield c
    finally:
        c.close()
