"""The tablet server, compactors and `lithify.connect`, as real processes (tests/cluster_util.py).

Every test that starts a process goes through the `cluster` fixture (or kills what it started
itself), and every wait is bounded.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pytest

import lithify
from lithify import Mutation
from lithify.compaction.spi import CompactableFile, CompactionJob, CompactionKind
from lithify.compactor.compactor import request_from_job
from lithify.data.ranges import Extent, FileRef, RowRange
from lithify.errors import (
    CompactionCancelledError,
    ConfigError,
    LithifyError,
    TableExistsError,
    TableNotFoundError,
    TableOfflineError,
)
from lithify.rpc.auth import SECRET_HEADER
from lithify.rpc.wire import ARROW_STREAM, decode_table, encode_stream, encode_table
from lithify.server import launcher
from lithify.server.coordinator_link import CoordinatorLink
from lithify.tablet.reservation import reserve
from tests.cluster_util import SLOW_ITERATOR, LocalCluster

#: How long the tests wait for `lithify/coordinator/process.py` (written by another engineer at
#: the same time) before skipping the tests that need a coordinator.
COORDINATOR_WAIT_S = float(os.environ.get("LITHIFY_COORDINATOR_WAIT_S", "2400"))
COORDINATOR_MODULE = Path(__file__).resolve().parent.parent / "lithify/coordinator/process.py"


def require_coordinator() -> None:
    """Wait (bounded, once per session) for the coordinator's process module; skip the test
    if it never appeared."""
    if not _coordinator_module_present():
        pytest.skip(f"{COORDINATOR_MODULE} did not appear within {COORDINATOR_WAIT_S:g}s")


@functools.cache
def _coordinator_module_present() -> bool:
    return wait_for_file(COORDINATOR_MODULE, COORDINATOR_WAIT_S)


def wait_for_file(path: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(5.0)
    return True


def rows(client: lithify.Client | lithify.Store, table: str, *a, **kw) -> list[tuple]:
    return [(k.row, k.family, k.qualifier, v) for k, v in client.scan_entries(table, *a, **kw)]


def put(client: lithify.Client, table: str, keys: list[str], value: str = "v") -> None:
    client.write(table, [Mutation(k.encode()).put("f", "q", f"{value}{k}") for k in keys])


# ---------------------------------------------------------------------- pure pieces


def test_arrow_stream_round_trip_in_pieces():
    t = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    pieces = list(encode_stream(t.schema, [t.slice(0, 2), t.slice(2, 1), t.slice(3, 0)]))
    assert len(pieces) == 4  # schema, two batches (the empty one is skipped), end marker
    assert decode_table(b"".join(pieces)).equals(t)
    assert decode_table(encode_table(t)).equals(t)


def test_request_from_job_checks_the_job():
    job = {
        "ecid": "e1",
        "extent": {"table_id": "7", "prev_end_row": b"a".hex(), "end_row": None},
        "inputs": [FileRef("tables/7/F1.parquet", 10, 2).to_json()],
        "output_path": "tables/7/A2.parquet",
        "tmp_path": "tables/7/A2.parquet_tmp_e1",
        "propagate_deletes": False,
        "versions": 3,
        "iterators": [["m:C", {"k": "v"}]],
        "compression": "zstd",
        "kind": "USER",
        "queue": "Q",
        "priority": 1,
    }
    req = request_from_job(job, "e1")
    assert req.extent_range == RowRange(b"a", None)
    assert req.versions == 3 and req.tmp_id == "e1" and not req.propagate_deletes
    assert list(req.iterators) == [("m:C", {"k": "v"})]
    assert req.subcompactions == (os.cpu_count() or 1)  # a compactor without --threads
    assert request_from_job(job, "e1", threads=1).subcompactions == 1
    with pytest.raises(LithifyError, match="tmp_path"):
        request_from_job({**job, "tmp_path": "elsewhere"}, "e1")
    with pytest.raises(LithifyError, match="malformed"):
        request_from_job({**job, "inputs": [{"path": "x"}]}, "e1")


def test_sink_keeps_only_the_newest_plan_per_tablet(tmp_path):
    meta = lithify.metadata.store.MetadataStore.open(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        link = CoordinatorLink(meta, "secret")
        e1, e2 = Extent("1", None, b"m"), Extent("1", b"m", None)
        job = CompactionJob((CompactableFile("f1", 1),), "e.Q", 1, CompactionKind.SYSTEM)
        link.sink(e1, [job])
        link.sink(e2, [])
        link.sink(e1, [])
        assert link.pending() == 2
        # Not started: nothing is sent, and closing an unstarted link is harmless.
        link.close()
    finally:
        meta.close()


def test_a_plan_leaves_out_jobs_on_files_a_running_compaction_holds(tmp_path):
    """A tablet server plans from its own view of a tablet, which learns of an external
    reservation only when the coordinator's refresh arrives: the jobs it sends are checked
    against the tablet's current metadata, so none waits in a queue for reserved files."""
    store = lithify.open(tmp_path / "s")
    try:
        store.create_table("t")
        for rows in (["a", "b"], ["c"]):
            store.write("t", [Mutation(r).put("f", "q", "v") for r in rows])
            store.flush("t")
        (m,) = store.meta.tablets(store.table_info("t").id)
        held, free = m.files
        store.meta.mutate_tablet(m.extent, lambda t: reserve(t, "ecid-1", [held], {}))
        link = CoordinatorLink(store.meta, "secret")

        def job(*files: FileRef) -> CompactionJob:
            cfs = tuple(CompactableFile(f.uri, f.size) for f in files)
            return CompactionJob(cfs, "e.Q", 1, CompactionKind.SYSTEM)

        sent = link._jobs_json(m.extent, [job(held, free), job(free), job(held)])
        assert [[f["path"] for f in j["files"]] for j in sent] == [[free.path]]
    finally:
        store.close()


# ---------------------------------------------------------------------- one tablet server


def test_tables_writes_scans_and_properties(cluster: LocalCluster):
    cluster.start(coordinators=0, compactors=0)
    c = cluster.client()
    assert c.list_tables() == []
    info = c.create_table("t", splits=["m"], properties={"table.versions": "2"})
    assert (info.name, info.state) == ("t", "online")
    with pytest.raises(TableExistsError):
        c.create_table("t")
    assert [t.name for t in c.list_tables()] == ["t"]
    assert c.get_properties("t")["table.versions"] == "2"

    # Writes: mutations and an Arrow table; scans: whole, ranges, columns, timestamps.
    put(c, "t", ["a", "z", "n"])
    c.write(
        "t",
        pa.table(
            {
                "row": [b"b", b"b"],
                "family": [b"f", b"g"],
                "qualifier": [b"q", b"q"],
                "value": [b"vb", b"gb"],
                "timestamp": [5, 6],
            }
        ),
    )
    assert rows(c, "t") == [
        (b"a", b"f", b"q", b"va"),
        (b"b", b"f", b"q", b"vb"),
        (b"b", b"g", b"q", b"gb"),
        (b"n", b"f", b"q", b"vn"),
        (b"z", b"f", b"q", b"vz"),
    ]
    assert [r[0] for r in rows(c, "t", "b", "n")] == [b"b", b"b", b"n"]
    assert rows(c, "t", columns=[("g", None)]) == [(b"b", b"g", b"q", b"gb")]
    assert [r[0] for r in rows(c, "t", min_timestamp=5, max_timestamp=5)] == [b"b"]
    assert c.count("t") == 5
    batches = list(c.scan("t", batch_size=2))
    assert sum(b.num_rows for b in batches) == 5 and all(b.num_rows <= 2 for b in batches)

    # Versions: two kept, so an older put is still visible behind a newer one.
    c.write("t", [Mutation(b"a").put("f", "q", "old", timestamp=1)])
    assert [v for _, v in c.scan_entries("t", "a", "a")][-1] == b"old"

    # Flush and compact (internal executors: no coordinator here).
    c.flush("t")
    assert all(len(t.files) == 1 and t.memory_bytes == 0 for t in c.tablets("t"))
    put(c, "t", ["c"], "w")
    c.flush("t", wait=True)
    summary = c.compact("t", timeout=60)
    assert summary.tablets == 2 and summary.id
    assert [len(t.files) for t in c.tablets("t")] == [1, 1]
    assert all(f.path.rsplit("/", 1)[-1].startswith("A") for t in c.tablets("t") for f in t.files)
    assert c.count("t") == 6 + 1  # six columns, one with two versions

    # Properties.
    c.set_property("t", "table.file.max", "20")
    assert c.get_properties("t")["table.file.max"] == "20"
    c.unset_property("t", "table.file.max")
    assert c.get_properties("t")["table.file.max"] == "15"
    with pytest.raises(ConfigError, match="table.nope"):
        c.set_property("t", "table.nope", "1")
    c.set_system_property("tserver.compaction.major.delay", "10s")
    sys_props = c.system_properties()
    assert sys_props["tserver.compaction.major.delay"] == "10s"
    assert sys_props["instance.secret"] == "********"
    with pytest.raises(ConfigError):
        c.set_system_property("tserver.memory.maps.max", "lots")
    with pytest.raises(LithifyError, match="instance.secret"):
        c.set_system_property("instance.secret", "mine")
    assert cluster.meta.get_system_properties()["instance.secret"] == cluster.secret

    # Splits, merges, offline/online.
    c.add_splits("t", ["d", "x"])
    assert len(c.tablets("t")) == 4
    c.merge_tablets("t", "a", "e")
    assert len(c.tablets("t")) == 3
    assert c.count("t") == 7
    c.offline("t")
    assert c.table_info("t").state == "offline"
    with pytest.raises(TableOfflineError):
        c.count("t")
    c.online("t")
    assert c.count("t") == 7

    # Delete.
    c.delete_table("t")
    assert c.list_tables() == []
    with pytest.raises(TableNotFoundError):
        list(c.scan("t"))
    with pytest.raises(TableNotFoundError):
        c.write("t", [Mutation(b"r").put("f", "q", "v")])


def test_connect_by_url_and_metrics_and_status(cluster: LocalCluster):
    cluster.start(coordinators=0, compactors=0)
    url = cluster.url("tserver")
    assert cluster.tserver_url() == url
    with pytest.raises(LithifyError, match="secret"):
        lithify.connect(url)
    with lithify.connect(url, cluster.secret) as c:
        c.create_table("m")
        put(c, "m", ["a"])
        st = c.status()
        assert st["url"] == url and st["tables"] == 1 and st["tablets"] == 1
    text = httpx.get(f"{url}/metrics", headers={SECRET_HEADER: cluster.secret}, timeout=10).text
    assert "lithify_tablets 1.0" in text


def test_refused_calls_change_nothing(cluster: LocalCluster):
    cluster.start(coordinators=0, compactors=0)
    url = cluster.url("tserver")
    good = {SECRET_HEADER: cluster.secret}
    c = cluster.client()
    c.create_table("keep", splits=["m"])
    put(c, "keep", ["a", "q"])
    before_tables = c.list_tables()
    before_rows = rows(c, "keep")
    before_props = c.system_properties()
    entries = lithify.data.mutation.mutations_to_table([Mutation(b"x").put("f", "q", "v")])
    arrow = {"content-type": ARROW_STREAM}

    calls = [
        ("POST", "/v1/tables", {"json": {"name": "new"}}),
        ("DELETE", "/v1/tables/keep", {}),
        ("POST", "/v1/tables/keep/write", {"content": encode_table(entries), "headers": arrow}),
        ("PUT", "/v1/system/properties", {"json": {"name": "table.x", "value": "1"}}),
        ("POST", "/v1/tables/keep/splits", {"json": {"points": ["6b"]}}),
        ("POST", "/v1/tables/keep/compact", {"json": {}}),
        ("GET", "/v1/tables", {}),
        ("GET", "/metrics", {}),
    ]
    with httpx.Client(base_url=url, timeout=30) as http:
        for headers in ({}, {SECRET_HEADER: "wrong"}, {SECRET_HEADER: ""}):
            for method, path, kw in calls:
                kw = {**kw, "headers": {**kw.get("headers", {}), **headers}}
                r = http.request(method, path, **kw)
                assert r.status_code == 401, (method, path, headers, r.text)

        malformed = [
            ("POST", "/v1/tables", {"json": {"name": 5}}),
            ("POST", "/v1/tables", {"json": {"name": "x", "unknown": True}}),
            ("POST", "/v1/tables", {"json": {"name": "x", "splits": ["not hex"]}}),
            ("POST", "/v1/tables", {"json": {"name": ""}}),
            (
                "POST",
                "/v1/tables",
                {"content": b"{not json", "headers": {"content-type": "application/json"}},
            ),
            ("POST", "/v1/tables/keep/write", {"content": b"garbage", "headers": arrow}),
            ("POST", "/v1/tables/keep/write", {"content": b"", "headers": arrow}),
            ("POST", "/v1/tables/keep/write", {"content": encode_table(entries)}),
            (
                "POST",
                "/v1/tables/keep/write",
                {
                    "content": encode_table(pa.table({"row": [b"r"], "bogus": [1]})),
                    "headers": arrow,
                },
            ),
            (
                "POST",
                "/v1/tables/keep/write",
                {
                    "content": encode_table(pa.table({"row": [b""], "family": [b"f"]})),
                    "headers": arrow,
                },
            ),
            ("POST", "/v1/tables/keep/splits", {"json": {"points": []}}),
            ("POST", "/v1/tables/keep/splits", {"json": {"points": ["zz"]}}),
            ("POST", "/v1/tables/keep/scan", {"json": {"columns": [["zz", None]]}}),
            ("POST", "/v1/tables/keep/scan", {"json": {"batch_size": 0}}),
            ("POST", "/v1/tables/keep/merge", {"json": {"start": "xyz"}}),
            ("POST", "/v1/tables/keep/compact", {"json": {"iterators": [["only-a-name"]]}}),
            ("POST", "/v1/tables/keep/compact", {"json": {"timeout": -1}}),
            ("PUT", "/v1/system/properties", {"json": {"name": "instance.secret", "value": "x"}}),
            ("PUT", "/v1/system/properties", {"json": {"name": "no.such", "value": "x"}}),
            (
                "PUT",
                "/v1/tables/keep/properties",
                {"json": {"name": "table.versions", "value": "0"}},
            ),
            ("POST", "/v1/tablets/refresh", {"json": {"extents": [{"table_id": 1}]}}),
            (
                "POST",
                "/v1/tablets/refresh",
                {"json": {"extents": [{"table_id": "1", "end_row": "q"}]}},
            ),
            (
                "POST",
                "/v1/tables/missing/write",
                {"content": encode_table(entries), "headers": arrow},
            ),
        ]
        for method, path, kw in malformed:
            kw = {**kw, "headers": {**kw.get("headers", {}), **good}}
            r = http.request(method, path, **kw)
            assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)

    assert c.list_tables() == before_tables
    assert rows(c, "keep") == before_rows
    assert c.system_properties() == before_props
    assert len(c.tablets("keep")) == 2


def test_openapi_schema_is_served(cluster: LocalCluster):
    cluster.start(coordinators=0, compactors=1)
    schema = httpx.get(f"{cluster.url('tserver')}/openapi.json", timeout=30).json()
    for path in (
        "/v1/tables",
        "/v1/tables/{table}/write",
        "/v1/tables/{table}/scan",
        "/v1/tables/{table}/compact",
        "/v1/tablets/refresh",
        "/v1/system/properties",
        "/v1/status",
    ):
        assert path in schema["paths"], path
    compactor = httpx.get(f"{cluster.url('compactor-1')}/openapi.json", timeout=30).json()
    assert "/v1/running" in compactor["paths"]
    running = httpx.get(
        f"{cluster.url('compactor-1')}/v1/running",
        headers={SECRET_HEADER: cluster.secret},
        timeout=10,
    ).json()
    assert running["ecid"] is None and running["compactor"]
    assert httpx.get(f"{cluster.url('compactor-1')}/v1/running", timeout=10).status_code == 401


def test_tserver_restart_keeps_data_and_clients_follow_it(cluster: LocalCluster):
    cluster.start(coordinators=0, compactors=0)
    c = cluster.client()
    c.create_table("t", properties={"table.durability": "sync"})
    put(c, "t", ["a", "b"])
    assert cluster.terminate("tserver", wait_s=60) == 0
    assert "tablet server stopped" in cluster.log("tserver")
    cluster.restart("tserver")
    # The same client finds the new server through the lease (the old port is closed).
    cluster.wait_for(lambda: cluster.tserver_url() == cluster.url("tserver"), 30, "new lease")
    assert [r[0] for r in rows(c, "t")] == [b"a", b"b"]
    # Unflushed writes survive a kill -9 too (write-ahead log).
    put(c, "t", ["c"])
    cluster.kill("tserver")
    cluster.restart("tserver")
    cluster.wait_for(lambda: cluster.tserver_url() == cluster.url("tserver"), 30, "new lease")
    assert [r[0] for r in rows(c, "t")] == [b"a", b"b", b"c"]


def test_tserver_collects_garbage_periodically_and_on_request(cluster: LocalCluster):
    cluster.start(tserver=False, coordinators=0, compactors=0)
    cluster.add("tserver", "--gc-interval", "1")
    c = cluster.client()
    c.create_table("t")
    for keys in (["a", "b"], ["c"]):
        put(c, "t", keys)
        c.flush("t")
    flushed = {f.path for t in c.tablets("t") for f in t.files}
    assert len(flushed) == 2
    c.compact("t")
    (compacted,) = {f.path for t in c.tablets("t") for f in t.files}
    data = cluster.directory / "data"
    cluster.wait_for(
        lambda: not any((data / p).exists() for p in flushed), 30, "the periodic collector"
    )
    assert (data / compacted).exists()
    assert [r[0] for r in rows(c, "t")] == [b"a", b"b", b"c"]
    c.delete_table("t")
    assert c.gc() == [compacted] or not (data / compacted).exists()
    assert not (data / compacted).exists()


def test_idle_compactor_stops_promptly_on_sigterm(cluster: LocalCluster):
    cluster.start(coordinators=0, compactors=1)
    t0 = time.monotonic()
    code = cluster.terminate("compactor-1", wait_s=30)
    elapsed = time.monotonic() - t0
    assert code == 0 and elapsed < 25, (code, elapsed, cluster.logs_tail())
    assert "stopped" in cluster.log("compactor-1"), cluster.logs_tail()


# ---------------------------------------------------------------------- with a coordinator


def _file_names(c: lithify.Client, table: str) -> list[set[str]]:
    return [{f.path for f in t.files} for t in c.tablets(table)]


def test_external_compaction_end_to_end(cluster: LocalCluster):
    require_coordinator()
    cluster.start(coordinators=1, compactors=1, external_only=True)
    c = cluster.client()
    c.create_table("t", splits=["m"])
    expected = []
    for i in range(4):
        keys = [f"{r}{i:02d}" for r in "abcxyz"]
        put(c, "t", keys, f"v{i}")
        expected += [(k.encode(), b"f", b"q", f"v{i}{k}".encode()) for k in keys]
        c.flush("t")
    expected.sort()

    # The ratio planner compacts each tablet's four flushed files, on the external queue.
    def compacted() -> bool:
        names = _file_names(c, "t")
        return all(len(s) == 1 and next(iter(s)).rsplit("/", 1)[-1][0] == "A" for s in names)

    cluster.wait_for(compacted, 60, "the tablets to be compacted by the compactor")
    assert rows(c, "t") == expected
    log = cluster.log("compactor-1")
    assert log.count("Compacting ") >= 2 and "on e.DCQ1 for SYSTEM" in log
    assert all(f.path.rsplit("/", 1)[-1].startswith("A") for t in c.tablets("t") for f in t.files)
    meta_tablets = cluster.meta.tablets(c.table_info("t").id)
    assert all(not m.compactions for m in meta_tablets)

    # A user compaction (through the coordinator's requests) rewrites every tablet again.
    before = _file_names(c, "t")
    summary = c.compact("t", timeout=90)
    assert summary.id
    # The request ends with the metadata's commit; the tablet server learns of the new files
    # from the coordinator's refresh a moment later.
    cluster.wait_for(
        lambda: all(
            len(s) == 1 and not (s & b) for s, b in zip(_file_names(c, "t"), before, strict=True)
        ),
        30,
        "the tablet server to see the user compaction's files",
    )
    assert "for USER" in cluster.log("compactor-1")
    assert rows(c, "t") == expected
    status = c.status()
    assert status["coordinator"]["url"] == cluster.coordinator_url()
    assert status["plans"]["sent"] > 0


def test_deleting_a_table_cancels_its_running_external_compaction(cluster: LocalCluster):
    require_coordinator()
    cluster.start(coordinators=1, compactors=1, external_only=True)
    c = cluster.client()
    c.create_table("slow")
    put(c, "slow", ["a", "b"])
    c.flush("slow")
    c.compact("slow", wait=False, iterators=[(SLOW_ITERATOR, {"sleep_s": "10"})])
    table_id = c.table_info("slow").id

    def running_record() -> bool:
        return any(m.compactions for m in cluster.meta.tablets(table_id))

    cluster.wait_for(running_record, 60, "the compactor to start the slow compaction")
    t0 = time.monotonic()
    c.delete_table("slow")

    def compactor_cancelled() -> bool:
        st = compactor_status(cluster)
        return st["cancelled"] == 1 and st["ecid"] is None

    cluster.wait_for(compactor_cancelled, 45, "the compactor to report the job CANCELLED")
    assert compactor_status(cluster)["completed"] == 0
    assert time.monotonic() - t0 < 45
    assert not list((cluster.directory / "data").rglob("*_tmp_*"))


def compactor_status(cluster: LocalCluster, name: str = "compactor-1") -> dict:
    return httpx.get(
        f"{cluster.url(name)}/v1/status", headers={SECRET_HEADER: cluster.secret}, timeout=10
    ).json()


def test_cancelling_a_user_compaction_stops_its_external_job(cluster: LocalCluster):
    require_coordinator()
    cluster.start(coordinators=1, compactors=1, external_only=True)
    c = cluster.client()
    c.create_table("u")
    put(c, "u", ["a"])
    c.flush("u")
    started = c.compact("u", wait=False, iterators=[(SLOW_ITERATOR, {"sleep_s": "10"})])
    table_id = c.table_info("u").id
    cluster.wait_for(
        lambda: any(m.compactions for m in cluster.meta.tablets(table_id)),
        60,
        "the compactor to start the slow user compaction",
    )
    assert c.cancel_compaction("u") == 1
    cluster.wait_for(
        lambda: compactor_status(cluster)["cancelled"] == 1, 45, "the job to end CANCELLED"
    )
    st = httpx.get(
        f"{cluster.url('tserver')}/v1/compactions/{started.id}",
        headers={SECRET_HEADER: cluster.secret},
        timeout=10,
    ).json()
    assert st["state"] == "CANCELLED"
    cluster.wait_for(
        lambda: not any(m.compactions for m in cluster.meta.tablets(table_id)),
        30,
        "the running record to be removed",
    )
    assert [r[0] for r in rows(c, "u")] == [b"a"]
    assert not list((cluster.directory / "data").rglob("*_tmp_*"))


def test_a_waiting_client_hears_of_the_cancellation(cluster: LocalCluster):
    cluster.start(coordinators=0, compactors=0)
    c = cluster.client()
    c.create_table("w")
    put(c, "w", ["a"])
    outcome: dict[str, BaseException | None] = {}

    def compact() -> None:
        try:
            c.compact("w", timeout=60, iterators=[(SLOW_ITERATOR, {"sleep_s": "3"})])
            outcome["error"] = None
        except BaseException as e:  # noqa: BLE001 - inspected below
            outcome["error"] = e

    t = threading.Thread(target=compact, daemon=True)
    t.start()
    table_id = c.table_info("w").id
    cluster.wait_for(
        lambda: any(m.selection for m in cluster.meta.tablets(table_id)), 30, "the selection"
    )
    assert cluster.client().cancel_compaction("w") == 1
    t.join(60)
    assert not t.is_alive()
    assert isinstance(outcome["error"], CompactionCancelledError), outcome
    assert [r[0] for r in rows(c, "w")] == [b"a"]


def test_a_new_coordinator_gets_every_tablet_planned_again(cluster: LocalCluster):
    require_coordinator()
    cluster.start(
        coordinators=2,
        compactors=0,
        external_only=True,
        # Periodic planning would send the plans again only after this: too late for the wait
        # below, so only the re-plan on a new coordinator epoch can make the compaction happen.
        system_properties={"tserver.compaction.major.delay": "10m"},
    )
    c = cluster.client()
    c.create_table("t", splits=["m"])
    for i in range(4):
        put(c, "t", [f"a{i}", f"z{i}"])
        c.flush("t")
    first = cluster.active_coordinator()
    assert first is not None
    _, epoch = cluster.lease("coordinator")
    cluster.kill(first)
    cluster.wait_for(
        lambda: cluster.lease("coordinator")[1] > epoch and cluster.active_coordinator(),
        30,
        "the standby coordinator to take over",
    )
    cluster.add("compactor")
    cluster.wait_for(
        lambda: [len(t.files) for t in c.tablets("t")] == [1, 1],
        40,
        "the queued compactions to reach the new coordinator and run",
    )
    assert [r[0] for r in rows(c, "t")] == [b"a0", b"a1", b"a2", b"a3", b"z0", b"z1", b"z2", b"z3"]


def _slow_user_compaction(cluster: LocalCluster, table: str, sleep_s: float) -> str:
    """Start a user compaction that runs about `sleep_s` on the compactor; wait until it runs.
    Returns the table id."""
    c = cluster.client()
    c.create_table(table)
    put(c, table, ["a", "b"])
    c.flush(table)
    c.compact(table, wait=False, iterators=[(SLOW_ITERATOR, {"sleep_s": str(sleep_s)})])
    table_id = c.table_info(table).id
    cluster.wait_for(
        lambda: compactor_status(cluster)["ecid"] is not None, 60, "the compactor to start"
    )
    return table_id


def test_splitting_a_tablet_cancels_its_running_external_compaction(cluster: LocalCluster):
    require_coordinator()
    cluster.start(coordinators=1, compactors=1, external_only=True)
    table_id = _slow_user_compaction(cluster, "s", 6)
    c = cluster.client()
    c.add_splits("s", ["b"])
    cluster.wait_for(
        lambda: compactor_status(cluster)["cancelled"] == 1, 30, "the job to end CANCELLED"
    )
    assert len(c.tablets("s")) == 2
    assert all(not m.compactions for m in cluster.meta.tablets(table_id))
    assert [r[0] for r in rows(c, "s")] == [b"a", b"b"]
    assert "cancelled" in cluster.log("compactor-1").lower()


def test_sigterm_lets_the_running_job_finish(cluster: LocalCluster):
    require_coordinator()
    cluster.start(coordinators=1, compactors=1, external_only=True)
    table_id = _slow_user_compaction(cluster, "g", 3)
    t0 = time.monotonic()
    assert cluster.terminate("compactor-1", wait_s=60) == 0
    assert time.monotonic() - t0 < 30
    log = cluster.log("compactor-1")
    assert "Compacted " in log and "Cancelled" not in log

    # The result was acknowledged once its final state was durable; the coordinator commits it
    # in the background: one new file, no record.
    def committed() -> bool:
        metas = cluster.meta.tablets(table_id)
        return all(not m.compactions and m.selection is None for m in metas)

    cluster.wait_for(committed, 30, "the acknowledged result to be committed")
    metas = cluster.meta.tablets(table_id)
    assert [f.path.rsplit("/", 1)[-1][0] for m in metas for f in m.files] == ["A"]


def test_sigterm_past_the_grace_cancels_the_job(cluster: LocalCluster):
    require_coordinator()
    cluster.start(
        coordinators=1,
        compactors=1,
        external_only=True,
        system_properties={"compactor.cancel.grace": "500ms"},
    )
    table_id = _slow_user_compaction(cluster, "h", 5)
    assert cluster.terminate("compactor-1", wait_s=60) == 0
    log = cluster.log("compactor-1")
    assert "grace of 0.5s is over" in log and "Cancelled compaction" in log
    # The coordinator heard CANCELLED: the files are free again, the temporary file gone.
    cluster.wait_for(
        lambda: all(not m.compactions for m in cluster.meta.tablets(table_id)),
        30,
        "the running record to be released",
    )
    assert not list((cluster.directory / "data").rglob("*_tmp_*"))
    # Another compactor picks the user compaction up again and finishes it.
    cluster.meta.set_system_properties({"compactor.cancel.grace": "30s"})
    cluster.add("compactor")
    cluster.wait_for(
        lambda: all(m.selection is None for m in cluster.meta.tablets(table_id)),
        90,
        "the user compaction to finish on the new compactor",
    )


def test_a_finished_result_waits_for_a_coordinator(cluster: LocalCluster):
    require_coordinator()
    cluster.start(coordinators=1, compactors=1, external_only=True)
    table_id = _slow_user_compaction(cluster, "r", 4)
    cluster.kill("coordinator-1")  # kill -9 while the job runs: nobody to report to
    cluster.wait_for(
        lambda: "report /v1/compactor/finished" in cluster.log("compactor-1"),
        60,
        "the compactor to retry its report",
    )
    cluster.restart("coordinator-1")
    cluster.wait_for(
        lambda: all(
            not m.compactions and m.selection is None for m in cluster.meta.tablets(table_id)
        ),
        60,
        "the result to be acknowledged and committed",
    )
    # The commit (in the coordinator's background) and the compactor's log of the answer
    # race: either may come first.
    cluster.wait_for(
        lambda: "acknowledged after" in cluster.log("compactor-1"), 30, "the acknowledgement"
    )
    metas = cluster.meta.tablets(table_id)
    assert [f.path.rsplit("/", 1)[-1][0] for m in metas for f in m.files] == ["A"]
    cluster.wait_for(lambda: compactor_status(cluster)["ecid"] is None, 10, "the compactor idle")


def test_external_compaction_on_each_metadata_backend(tmp_path: Path, metadata_url: str):
    require_coordinator()
    lc = LocalCluster(tmp_path / "inst", metadata_url=metadata_url)
    try:
        lc.start(coordinators=1, compactors=1, external_only=True)
        c = lc.client()
        c.create_table("t")
        for i in range(4):
            put(c, "t", [f"k{i}"])
            c.flush("t")
        lc.wait_for(
            lambda: (
                [f.path.rsplit("/", 1)[-1][0] for t in c.tablets("t") for f in t.files] == ["A"]
            ),
            60,
            "the external compaction",
        )
        assert [r[0] for r in rows(c, "t")] == [b"k0", b"k1", b"k2", b"k3"]
    finally:
        lc.close()


# ---------------------------------------------------------------------- the CLI


def test_cluster_cli_start_status_stop(tmp_path: Path):
    require_coordinator()
    d = tmp_path / "inst"
    cmd = [sys.executable, "-m", "lithify", "cluster"]
    env = {**os.environ, "COLUMNS": "200"}
    try:
        out = subprocess.run(
            [*cmd, "start", "--dir", str(d), "--compactors", "1", "--timeout", "120"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert out.returncode == 0, out.stderr + out.stdout
        records = launcher.read_records(d)
        assert sorted(r.name for r in records) == ["compactor-1", "coordinator-1", "tserver"]
        assert all(launcher.is_alive(r) for r in records)
        for r in records:
            assert json.loads((d / "cluster" / f"{r.name}.json").read_text())["url"] == r.url
            assert (d / "logs" / f"{r.name}.log").exists()
        props = lithify.metadata.store.MetadataStore.open(f"sqlite:///{d / 'metadata.db'}")
        try:
            executors = props.get_system_properties()[
                "tserver.compaction.major.service.default.planner.opts.executors"
            ]
        finally:
            props.close()
        assert '"queue": "DCQ1"' in executors and '"type": "internal"' in executors

        again = subprocess.run(
            [*cmd, "start", "--dir", str(d)], capture_output=True, text=True, timeout=120, env=env
        )
        assert again.returncode != 0 and "already running" in again.stderr

        st = subprocess.run(
            [*cmd, "status", "--dir", str(d)], capture_output=True, text=True, timeout=60, env=env
        )
        assert st.returncode == 0, st.stderr
        assert "lease coordinator: http://127.0.0.1:" in st.stdout
        assert st.stdout.count(" yes ") >= 6  # alive and answering, three processes

        stop = subprocess.run(
            [*cmd, "stop", "--dir", str(d), "--timeout", "60"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert stop.returncode == 0, stop.stderr
        assert stop.stdout.count("stopped") >= 3
        assert not any(launcher.is_alive(r) for r in records)
        assert launcher.read_records(d) == []
    finally:
        for r in launcher.read_records(d):
            launcher.signal_process(r, signal.SIGKILL)
