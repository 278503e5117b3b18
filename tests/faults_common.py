"""Shared pieces of the external-compaction fault tests of issue 4 (tests/test_faults_*.py).

The fault tests run a real cluster (`tests/cluster_util.py`), feed it data through a client,
break one process (or cancel, reconfigure, call with a wrong secret) at a chosen moment and then
check that nothing was lost or left behind. What they share lives here, and the test modules
use it as `from tests import faults_common as faults`:

* Set-up: `start_slow_ingest` (continuous ingest into `TABLE`, whose compactions run slowly on
  the compactors), `start_slow_rows` (four flushes of plain rows into a slow table),
  `write_flushed` and `entries` (rows of the form `key -> value+key`); reading them back
  (`scanned_rows`) and looking for temporary files (`no_tmp_files`).
* `AckedIngest`: continuous ingest through `Client.write` that remembers every entry the tablet
  server acknowledged, so a test can check after a crash that each of them is still there.
* Reading the running compaction records (`running_records`), waiting for them
  (`wait_records`, `wait_running`) and for one to commit (`committed`), and which compactor
  process runs what (`compactor_status`, `compactor_names`, `runner_and_spare`,
  `compactors_idle`).
* The active coordinator's view and metrics (`coordinator_view`, `coordinator_metrics`,
  `metric`, `scrape`).
* `settle_and_check`: the end of the tests that break a process. Verify the ingested lists, let
  the compactions settle (compactors stopped gracefully: each finishes its job, takes no more),
  check that the protocol left no temporary file behind by itself, then stop the tablet server
  (so no flush can race it), collect garbage and run the file-level consistency check with
  `settled=True`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pyarrow as pa
from prometheus_client.parser import text_string_to_metric_families

import lithify
from lithify.continuous.ingest import DEPTH, ContinuousIngest
from lithify.continuous.verify import VerifyResult
from lithify.data.ranges import Extent, FileRef
from lithify.errors import TableNotFoundError
from lithify.files.in_use import FilesInUse
from lithify.files.naming import is_tmp
from lithify.files.storage import Storage
from lithify.gc import collect_garbage
from lithify.metadata.store import MetadataStore
from lithify.rpc.auth import SECRET_HEADER
from tests.cluster_util import SLOW_ITERATOR, LocalCluster
from tests.consistency import check_files, check_verify

TABLE = "ci"
#: Entries per continuous-ingest batch: one cycle is DEPTH batches plus the stitch, about
#: 2,600 entries in 26 writes, which a loaded two-core machine writes in about a second.
BATCH = 100
CYCLE_ENTRIES = BATCH * (DEPTH + 1)
#: Bound on a compaction that is not slowed down on purpose to commit.
COMMIT_WAIT_S = 60.0

Key = tuple[bytes, bytes, bytes]


def slow_majc(sleep_s: float, priority: int = 50) -> dict[str, str]:
    """Table properties that make every major compaction of the table sleep `sleep_s` per
    batch it writes (about 4,000 entries: four ingest cycles take four batches), so a test can
    break a process while a compaction is surely in the middle of its work. `priority` places
    the slow iterator among the table's major-compaction iterators."""
    return {
        "table.iterator.majc.slow": f"{priority},{SLOW_ITERATOR}",
        "table.iterator.majc.slow.opt.sleep_s": f"{sleep_s:g}",
    }


def storage_of(cluster: LocalCluster) -> Storage:
    """The instance's data files, as every process of the cluster sees them."""
    return Storage(str(cluster.directory / "data"))


# ---------------------------------------------------------------------- ingest


@dataclass
class AckedIngest:
    """Continuous ingest into `table` through `client`, recording what was acknowledged.

    `acked` maps each (row, family, qualifier) to the newest value whose write returned (the
    stitch rewrites first-batch keys with new values); `in_flight` holds the keys of a write
    that was sent but not acknowledged (the one a crash interrupted): those may or may not be
    there afterwards, and hold either value.
    """

    client: lithify.Client
    table: str = TABLE
    seed: int = 1
    acked: dict[Key, bytes] = field(default_factory=dict)
    in_flight: set[Key] = field(default_factory=set)
    writes: int = 0
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._ci = ContinuousIngest(self._write, batch_size=BATCH, seed=self.seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, data: pa.Table) -> None:
        keys = list(
            zip(
                data.column("row").to_pylist(),
                data.column("family").to_pylist(),
                data.column("qualifier").to_pylist(),
                strict=True,
            )
        )
        with self._lock:
            self.in_flight = set(keys)
        self.client.write(self.table, data)
        values = data.column("value").to_pylist()
        with self._lock:
            for k, v in zip(keys, values, strict=True):
                self.acked[k] = v
            self.in_flight = set()
            self.writes += 1

    def cycles(self, n: int, *, flush: bool = True) -> None:
        """Write `n` whole cycles of linked lists, flushing after each (one file per tablet)."""
        for _ in range(n):
            self._ci.run_cycle(CYCLE_ENTRIES)
            if flush:
                self.client.flush(self.table)

    # -- in the background, until stopped or until the server goes away -------------------------

    def start(self, max_cycles: int = 1000) -> None:
        """Write cycles (unflushed) in a thread until `stop` or the first failed write."""

        def run() -> None:
            try:
                for _ in range(max_cycles):
                    if self._stop.is_set():
                        return
                    self._ci.run_cycle(CYCLE_ENTRIES)
            except BaseException as e:  # noqa: BLE001 - a killed server ends the ingest
                self.error = e

        self._thread = threading.Thread(target=run, name="ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            assert not self._thread.is_alive(), "the ingest thread did not stop"

    def writes_done(self) -> int:
        with self._lock:
            return self.writes

    # -- checks ---------------------------------------------------------------------------------

    def check_present(self, client: lithify.Client) -> int:
        """Assert that every acknowledged entry is in the table (with its newest acknowledged
        value, unless an unacknowledged write may have replaced it); returns how many."""
        found: dict[Key, bytes] = {}
        for batch in client.scan(self.table):
            cols = [batch.column(n).to_pylist() for n in ("row", "family", "qualifier", "value")]
            for r, f, q, v in zip(*cols, strict=True):
                found[(r, f, q)] = v
        with self._lock:
            acked, maybe = dict(self.acked), set(self.in_flight)
        missing = [k for k in acked if k not in found]
        assert not missing, f"{len(missing)} acknowledged entries lost, e.g. {missing[:3]}"
        changed = [k for k, v in acked.items() if found[k] != v and k not in maybe]
        assert not changed, f"{len(changed)} acknowledged values changed, e.g. {changed[:3]}"
        return len(acked)


# ---------------------------------------------------------------------- set-up, rows and files


def start_slow_ingest(
    cluster: LocalCluster,
    *,
    sleep_s: float | None,
    coordinators: int = 1,
    compactors: int = 1,
    splits: Sequence[str] = (),
    properties: Mapping[str, str] | None = None,
    cycles: int = 4,
) -> tuple[lithify.Client, str, AckedIngest]:
    """Start a cluster whose compactions all run on compactors, with continuous ingest in it.

    Afterwards the tablet server, `coordinators` coordinators and `compactors` compactors run
    (every compaction of the default service goes to the external queue DCQ1); table `TABLE`
    exists, split at `splits`, with `properties` and `slow_majc(sleep_s)` (no slow iterator
    when `sleep_s` is None); and `cycles` continuous-ingest cycles were written, each flushed,
    so every tablet holds `cycles` files: with four, the ratio planner has queued a compaction
    of each tablet, and the compactors take them up slowly; with two, nothing is compacted.
    Returns the client, the table's id and the `AckedIngest` that wrote the cycles.
    """
    cluster.start(coordinators=coordinators, compactors=compactors, external_only=True)
    c = cluster.client()
    slow = slow_majc(sleep_s) if sleep_s is not None else {}
    c.create_table(TABLE, splits=splits, properties={**(properties or {}), **slow})
    table_id = c.table_info(TABLE).id
    ingest = AckedIngest(c)
    ingest.cycles(cycles)
    return c, table_id, ingest


def start_slow_rows(
    cluster: LocalCluster,
    table: str,
    *,
    compactors: int,
    splits: Sequence[str],
    rows: str,
    per_row: int,
) -> tuple[lithify.Client, str, list[bytes]]:
    """Start a cluster of one coordinator and `compactors` compactors with every compaction
    external (queue DCQ1), and a table whose system compactions sleep 1 s per input batch.

    Afterwards table `table` exists, split at `splits`, and holds four equal flushes: in each,
    `per_row` rows for every letter of `rows` (`{letter}{j:02d}{flush}`). Every tablet that got
    rows has four flushed files, so the ratio planner has queued a compaction of each, and the
    compactors take them up slowly (a few seconds each). Returns the client, the table's id and
    the rows written, sorted.
    """
    cluster.start(coordinators=1, compactors=compactors, external_only=True)
    c = cluster.client()
    c.create_table(table, splits=splits, properties=slow_majc(1, priority=10))
    table_id = c.table_info(table).id
    expected = write_flushed(
        c, table, 4, lambda i: [f"{r}{j:02d}{i}" for r in rows for j in range(per_row)]
    )
    return c, table_id, expected


def write_flushed(
    client: lithify.Client, table: str, rounds: int, keys_of: Callable[[int], list[str]]
) -> list[bytes]:
    """Write `entries(keys_of(i), f"v{i}")` into `table` for each round `i`, flushing after
    each (one new file in every tablet the round wrote to); returns the rows written, sorted."""
    expected: list[bytes] = []
    for i in range(rounds):
        keys = keys_of(i)
        client.write(table, entries(keys, f"v{i}"))
        expected += [k.encode() for k in keys]
        client.flush(table)
    expected.sort()
    return expected


def entries(keys: Sequence[str], value: str, pad: int = 0) -> pa.Table:
    """Entries `key -> value+key` (column f:q); `pad` random bytes make files big on purpose
    (random, so compression cannot shrink them below an executor's size limit)."""
    values = [
        f"{value}{k}".encode() + (os.urandom(pad // 2).hex().encode() if pad else b"") for k in keys
    ]
    n = len(keys)
    return pa.table(
        {
            "row": pa.array([k.encode() for k in keys], pa.binary()),
            "family": pa.array([b"f"] * n, pa.binary()),
            "qualifier": pa.array([b"q"] * n, pa.binary()),
            "value": pa.array(values, pa.binary()),
        }
    )


def scanned_rows(client: lithify.Client, table: str) -> list[bytes]:
    return [k.row for k, _ in client.scan_entries(table)]


def no_tmp_files(cluster: LocalCluster) -> bool:
    return not list((cluster.directory / "data").rglob("*_tmp_*"))


# ---------------------------------------------------------------------- records and compactors


def running_records(meta: MetadataStore, table_id: str) -> dict[str, tuple[Extent, dict]]:
    """The table's external compaction records by ECID (internal ones have no `ecid`); none
    for a table that no longer exists."""
    try:
        metas = meta.tablets(table_id)
    except TableNotFoundError:
        return {}
    out: dict[str, tuple[Extent, dict]] = {}
    for m in metas:
        for key, rec in m.compactions.items():
            if isinstance(rec, Mapping) and rec.get("ecid") == key:
                out[key] = (m.extent, dict(rec))
    return out


def tablet_files(meta: MetadataStore, table_id: str) -> dict[Extent, set[str]]:
    return {m.extent: {f.path for f in m.files} for m in meta.tablets(table_id)}


def inputs_of(rec: Mapping[str, Any]) -> set[str]:
    return {FileRef.from_json(x).path for x in rec["inputs"]}


def committed(meta: MetadataStore, table_id: str, ecid: str, rec: Mapping[str, Any]) -> bool:
    """Whether compaction `ecid` (record `rec`) committed: its record is gone, its output is in
    a tablet's files and none of its inputs is."""
    if ecid in running_records(meta, table_id):
        return False
    files = set().union(*tablet_files(meta, table_id).values())
    return rec["output_path"] in files and not (inputs_of(rec) & files)


def compactor_status(cluster: LocalCluster, name: str) -> dict[str, Any]:
    """The compactor's own `/v1/status` (its id, the ECID it runs, progress, job counts)."""
    return httpx.get(
        f"{cluster.url(name)}/v1/status", headers={SECRET_HEADER: cluster.secret}, timeout=10
    ).json()


def compactor_names(cluster: LocalCluster) -> dict[str, str]:
    """Compactor id (as in the records) -> process name, for the compactors alive now."""
    return {
        compactor_status(cluster, n)["compactor"]: n
        for n in cluster.names("compactor")
        if cluster.alive(n)
    }


def runner_and_spare(cluster: LocalCluster, compactor_id: str) -> tuple[str, str, str]:
    """For a cluster of two live compactors, one of which (id `compactor_id`, as in a record)
    runs a job: (that one's process name, the other one's id, the other one's name)."""
    names = compactor_names(cluster)
    runner = names.pop(compactor_id)
    [(spare_id, spare)] = names.items()
    return runner, spare_id, spare


def compactors_idle(cluster: LocalCluster, names: Iterable[str]) -> bool:
    return all(compactor_status(cluster, n)["ecid"] is None for n in names)


def wait_records(
    cluster: LocalCluster, table_id: str, n: int, timeout_s: float = 90.0
) -> dict[str, tuple[Extent, dict]]:
    """Wait until at least `n` external compactions of the table are recorded as running and
    each one's compactor has started it; returns the records."""
    names = compactor_names(cluster)

    def started() -> dict[str, tuple[Extent, dict]] | None:
        recs = running_records(cluster.meta, table_id)
        if len(recs) < n:
            return None
        for ecid, (_, rec) in recs.items():
            if compactor_status(cluster, names[rec["compactor"]])["ecid"] != ecid:
                return None
        return recs

    return cluster.wait_for(started, timeout_s, f"{n} external compaction(s) to run")


def wait_running(
    cluster: LocalCluster, table_id: str, running: int, *, queued: int | None = None
) -> None:
    """Wait (up to 60 s, looking every 50 ms) until exactly `running` external compactions of
    the table are recorded and, unless `queued` is None, exactly `queued` jobs wait in DCQ1."""

    def busy() -> bool:
        return len(running_records(cluster.meta, table_id)) == running and (
            queued is None or coordinator_view(cluster)["queues"].get("DCQ1", 0) == queued
        )

    what = f"{running} external compaction(s) running"
    if queued is not None:
        what += f" and {queued} queued on DCQ1"
    cluster.wait_for(busy, 60, what, interval_s=0.05)


def report_failed(cluster: LocalCluster, name: str, ecid: str, attempts: int = 1) -> bool:
    """Whether compactor `name` logged at least `attempts` failed final reports of `ecid`:
    its temporary file is complete and no coordinator has heard the result."""
    return cluster.log(name).count(f"report /v1/compactor/finished of {ecid} failed") >= attempts


# ---------------------------------------------------------------------- the coordinator's view

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(text: str) -> Samples:
    """Prometheus text -> {sample name: {sorted label pairs: value}}."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def coordinator_view(cluster: LocalCluster) -> dict[str, Any]:
    """The active coordinator's queues and running set (`GET /v1/coordinator`)."""
    url = cluster.coordinator_url()
    assert url, "no coordinator holds the lease"
    return httpx.get(
        f"{url}/v1/coordinator", headers={SECRET_HEADER: cluster.secret}, timeout=10
    ).json()


def _metrics(cluster: LocalCluster, url: str) -> Samples:
    text = httpx.get(f"{url}/metrics", headers={SECRET_HEADER: cluster.secret}, timeout=10).text
    return scrape(text)


def coordinator_metrics(cluster: LocalCluster) -> Samples:
    url = cluster.coordinator_url()
    assert url, "no coordinator holds the lease"
    return _metrics(cluster, url)


def tserver_compactions_idle(cluster: LocalCluster) -> bool:
    """No compaction queued or running in any of the tablet server's internal executors."""
    m = _metrics(cluster, cluster.url("tserver"))
    busy = ("lithify_compactions_queued", "lithify_compactions_running")
    return not any(v for name in busy for v in m.get(name, {}).values())


def held_for(condition: Callable[[], bool], hold_s: float) -> Callable[[], bool]:
    """A condition that is true once `condition` has held on every poll for `hold_s`: a
    settled cluster stays settled, where one poll may fall between a commit and the plan that
    the commit's refresh brings."""
    since: list[float] = []

    def check() -> bool:
        if not condition():
            since.clear()
            return False
        if not since:
            since.append(time.monotonic())
        return time.monotonic() - since[0] >= hold_s

    return check


def metric(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent: counters of a queue nobody used yet)."""
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


# ---------------------------------------------------------------------- the end of every test


def settle_and_check(
    cluster: LocalCluster, client: lithify.Client, ingest: AckedIngest | None = None
) -> VerifyResult | None:
    """Verify, let compactions settle, assert no temporary file is left, gc, check files.

    The order matters: data is checked while the tablet server runs; compactors stop
    gracefully (each finishes its job and takes no more), so the compactions settle for good;
    only then may no temporary file exist, before any garbage collection (the protocol itself
    must clean them up); the tablet server stops before the collection so that no flush can
    write a file that nothing refers to yet.
    """
    meta, storage = cluster.meta, storage_of(cluster)
    result = None
    if ingest is not None:
        ingest.check_present(client)
        result = check_verify(client.scan(ingest.table))
    check_files(meta, storage)
    for name in cluster.names("compactor"):
        if cluster.alive(name):
            assert cluster.terminate(name, wait_s=90) == 0, cluster.logs_tail()

    def settled() -> bool:
        return not meta.final_states() and not any(
            running_records(meta, t.id) for t in meta.list_tables()
        )

    cluster.wait_for(settled, COMMIT_WAIT_S, "the compactions to settle")
    leftovers = [p for p in storage.list_files("tables") if is_tmp(p)]
    assert not leftovers, f"temporary files left by the protocol: {leftovers}"
    check_files(meta, storage)
    if ingest is not None:
        after = check_verify(client.scan(ingest.table))
        assert after.entries == result.entries  # type: ignore[union-attr]
    assert cluster.terminate("tserver", wait_s=90) == 0, cluster.logs_tail()
    collect_garbage(storage, meta, FilesInUse())
    check_files(meta, storage, settled=True)
    return result


def wait_tserver_back(cluster: LocalCluster, timeout_s: float = 60.0) -> None:
    """Wait until the restarted tablet server holds its lease (clients find it there)."""
    cluster.wait_for(
        lambda: cluster.tserver_url() == cluster.url("tserver"), timeout_s, "the tserver lease"
    )


def elapsed_since(t0: float) -> float:
    return time.monotonic() - t0
