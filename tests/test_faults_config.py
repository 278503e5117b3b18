"""Fault tests 11 and 13 of issue 4, on a local cluster of real processes.

11. A configuration change moves a service's external work from queue DCQ1 to DCQ2 while jobs
    wait: the queued jobs move, the running one finishes where it is, and every flushed file is
    compacted exactly once (counted from the coordinator's log, its metrics and the tablets).
13. The coordinator's and the compactor's endpoints refuse calls without the instance secret,
    with a wrong one, and with malformed bodies (4xx), and such calls change nothing: the
    coordinator's queues and running set, the compactor's job and the tablets are as before.
    (tests/test_server.py covers the tablet server's endpoints.)

Both end with the consistency check of tests/consistency.py.
"""

from __future__ import annotations

import ast
import re
import time
from typing import Any

import httpx

from lithify.rpc.auth import SECRET_HEADER
from lithify.rpc.wire import extent_to_json
from tests import faults_common as faults
from tests.cluster_util import ALL_EXTERNAL, SLOW_ITERATOR, LocalCluster
from tests.consistency import check_files

EXECUTORS = "tserver.compaction.major.service.default.planner.opts.executors"

#: The coordinator's log lines that say what ran where (lithify/coordinator/reserve.py, commit.py).
_RESERVED = re.compile(
    r"Reserved (?P<extent>\S+) on (?P<queue>\S+) for (?P<kind>\w+) from (?P<files>\[.*?\]) "
    r"\(ecid (?P<ecid>\w+), compactor"
)
_COMMITTED = re.compile(r"Compacted (?P<extent>\S+) created (?P<output>\S+) \(ecid (?P<ecid>\w+)\)")


def reservations(log: str) -> dict[str, dict[str, Any]]:
    """ECID -> {extent, queue, kind, inputs} of every reservation the coordinator logged."""
    out = {}
    for m in _RESERVED.finditer(log):
        out[m["ecid"]] = {
            "extent": m["extent"],
            "queue": m["queue"],
            "kind": m["kind"],
            "inputs": list(ast.literal_eval(m["files"])),
        }
    return out


def commits(log: str) -> dict[str, dict[str, str]]:
    """ECID -> {extent, output} of every compaction the coordinator committed."""
    return {
        m["ecid"]: {"extent": m["extent"], "output": m["output"]} for m in _COMMITTED.finditer(log)
    }


# ---------------------------------------------------------------------- 11. queue change


def test_moving_a_service_to_another_queue_loses_nothing_and_does_nothing_twice(
    cluster: LocalCluster,
) -> None:
    """Eight tablets need a compaction; one compactor serves DCQ1 and runs one of them (slowly)
    when the service's executors option is changed to DCQ2. The seven waiting jobs move to
    DCQ2 (planned again by the tablet server; a new plan replaces a tablet's queued jobs in
    every queue), the running one finishes on DCQ1, two compactors started on DCQ2 afterwards
    do the rest, and each of the 32 flushed files is the input of exactly one committed
    compaction."""
    # 1 s per input batch, about 4 s per compaction: the first one is still running when the
    # configuration changes. Four equal flushes per tablet: the ratio planner compacts all four.
    c, table_id, expected = faults.start_slow_rows(
        cluster, "cfg", compactors=1, splits=list("bcdefgh"), rows="abcdefgh", per_row=10
    )

    faults.wait_running(cluster, table_id, 1, queued=7)
    flushed = {
        str(t.extent): sorted(f.path.rsplit("/", 1)[-1] for f in t.files) for t in c.tablets("cfg")
    }
    assert all(len(v) == 4 and all(n[0] == "F" for n in v) for v in flushed.values()), flushed
    (first,) = faults.running_records(cluster.meta, table_id)

    c.set_system_property(EXECUTORS, ALL_EXTERNAL % "DCQ2")
    cluster.wait_for(
        lambda: (
            faults.coordinator_view(cluster)["queues"].get("DCQ1", 0) == 0
            and faults.coordinator_view(cluster)["queues"].get("DCQ2", 0) >= 6
        ),
        30,
        "the queued jobs to move from DCQ1 to DCQ2",
    )
    cluster.add("compactor", "-q", "DCQ2")
    cluster.add("compactor", "-q", "DCQ2")
    names = cluster.names("compactor")

    def done() -> bool:
        # The coordinator counts a commit just after it sends the tablet server its refresh.
        m = faults.coordinator_metrics(cluster)
        return (
            all(len(t.files) == 1 for t in c.tablets("cfg"))
            and not faults.running_records(cluster.meta, table_id)
            and faults.compactors_idle(cluster, names)
            and faults.metric(m, "lithify_coordinator_compactions_completed_total") >= 8
        )

    cluster.wait_for(done, 120, "every tablet to be compacted")

    log = cluster.log("coordinator-1")
    reserved, committed = reservations(log), commits(log)
    assert len(committed) == 8, committed
    assert first in committed and reserved[first]["queue"] == "DCQ1"
    # Every flushed file went into exactly one committed compaction, of its own tablet, and
    # each tablet's one file is that compaction's output.
    used: dict[str, int] = {}
    for ecid in committed:
        for name in reserved[ecid]["inputs"]:
            used[name] = used.get(name, 0) + 1
    all_flushed = [n for names_ in flushed.values() for n in names_]
    assert sorted(used) == sorted(all_flushed) and set(used.values()) == {1}, used
    for t in c.tablets("cfg"):
        mine = [e for e, info in committed.items() if info["extent"] == str(t.extent)]
        assert len(mine) == 1, (t.extent, mine)
        assert sorted(reserved[mine[0]]["inputs"]) == flushed[str(t.extent)]
        assert t.files[0].path.rsplit("/", 1)[-1] == committed[mine[0]]["output"]
    queues = [reserved[e]["queue"] for e in committed]
    print(
        f"committed compactions per queue: DCQ1 {queues.count('DCQ1')}, DCQ2 {queues.count('DCQ2')}"
    )
    assert queues.count("DCQ2") >= 6, queues

    # Nothing was done twice or thrown away: the compactors ran 8 jobs between them, none
    # failed or was cancelled, and the coordinator's counters agree.
    st = [faults.compactor_status(cluster, n) for n in names]
    assert sum(s["completed"] for s in st) == 8, st
    assert sum(s["cancelled"] + s["failed"] for s in st) == 0, st
    assert st[0]["completed"] >= 1  # the job running on DCQ1 during the change finished there
    m = faults.coordinator_metrics(cluster)
    assert faults.metric(m, "lithify_coordinator_compactions_completed_total") == 8
    assert faults.metric(m, "lithify_coordinator_compactions_failed_total") == 0
    assert faults.metric(m, "lithify_coordinator_compactions_cancelled_total") == 0
    assert faults.metric(m, "lithify_coordinator_queued", queue="DCQ1") == 0
    assert faults.metric(m, "lithify_coordinator_queued", queue="DCQ2") == 0

    assert faults.scanned_rows(c, "cfg") == expected
    assert check_files(cluster.meta, faults.storage_of(cluster), settled=True) == 8


# ---------------------------------------------------------------------- 13. refused calls


def _coordinator_state(cluster: LocalCluster, table_id: str) -> dict[str, Any]:
    """What a refused call must not change: queues, running set, counters, the records and
    the tablets' files."""
    view = faults.coordinator_view(cluster)
    m = faults.coordinator_metrics(cluster)
    return {
        "queues": view["queues"],
        "running": sorted((r["ecid"], r["compactor"], r["state"]) for r in view["running"]),
        "counters": [
            faults.metric(m, f"lithify_coordinator_compactions_{k}_total")
            for k in ("completed", "failed", "cancelled", "stale_dropped")
        ],
        "requests": sorted(m.get("lithify_coordinator_requests", {}).items()),
        "records": sorted(faults.running_records(cluster.meta, table_id)),
        "files": [sorted(f.path for f in t.files) for t in cluster.meta.tablets(table_id)],
        "selections": [t.selection for t in cluster.meta.tablets(table_id)],
    }


def test_coordinator_and_compactor_refuse_calls_without_secret_or_malformed(
    cluster: LocalCluster,
) -> None:
    """Every coordinator and compactor endpoint answers 401 without the secret or with a wrong
    one, and 4xx to a malformed body, while a compaction runs and another waits; the calls
    chosen would each change something if they were accepted (reserve the waiting job, commit
    or fail the running one, clear the queue, cancel the table)."""
    cluster.start(coordinators=1, compactors=1, external_only=True)
    c = cluster.client()
    c.create_table("t", splits=["m"])
    faults.write_flushed(c, "t", 2, lambda i: [f"{r}{i}" for r in "ax"])
    table_id = c.table_info("t").id
    # 6 s per input batch (12 s per tablet): the one compactor is busy while the calls are
    # made, and the second tablet's job waits in DCQ1.
    c.compact("t", wait=False, iterators=[(SLOW_ITERATOR, {"sleep_s": "6"})])
    faults.wait_running(cluster, table_id, 1, queued=1)
    (ecid,) = faults.running_records(cluster.meta, table_id)
    waiting = next(
        m.extent for m in cluster.meta.tablets(table_id) if not m.compactions and m.selection
    )
    coord = cluster.coordinator_url()
    assert coord
    comp = cluster.url("compactor-1")
    before = _coordinator_state(cluster, table_id)
    before_compactor = faults.compactor_status(cluster, "compactor-1")
    assert before_compactor["ecid"] == ecid

    ext = extent_to_json(waiting)
    result = {"entries_read": 1, "entries_written": 1, "bytes_read": 1, "bytes_written": 1}
    # A plan that would queue the waiting tablet's job a second time, if it were accepted.
    files = [f.to_json() for f in cluster.meta.get_tablet(waiting).files]  # type: ignore[union-attr]
    jobs = [{"files": files, "executor": "e.DCQ1", "priority": 1}]
    coordinator_calls: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/queues/plan", {"json": {"extent": ext, "jobs": []}}),
        ("POST", "/v1/queues/plan", {"json": {"extent": ext, "jobs": jobs}}),
        ("POST", "/v1/cancel", {"json": {"table_id": table_id, "extents": None, "kind": None}}),
        (
            "POST",
            "/v1/compactor/next",
            {"json": {"queue": "DCQ1", "compactor": "intruder", "ecid": "i1", "wait_s": 0}},
        ),
        ("POST", "/v1/compactor/status", {"json": {"ecid": ecid, "compactor": "intruder"}}),
        (
            "POST",
            "/v1/compactor/finished",
            {"json": {"ecid": ecid, "compactor": "intruder", "result": result}},
        ),
        (
            "POST",
            "/v1/compactor/failed",
            {"json": {"ecid": ecid, "compactor": "intruder", "state": "CANCELLED"}},
        ),
        ("POST", "/v1/requests", {"json": {"op": "compact", "table": "t"}}),
        ("GET", "/v1/requests/abc", {}),
        ("DELETE", "/v1/requests/abc", {}),
        ("GET", "/v1/coordinator", {}),
        ("GET", "/metrics", {}),
    ]
    compactor_calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/v1/running", {}),
        ("GET", "/v1/status", {}),
        ("GET", "/metrics", {}),
    ]
    bad_secrets: list[dict[str, str]] = [
        {},
        {SECRET_HEADER: "wrong"},
        {SECRET_HEADER: ""},
        {SECRET_HEADER: cluster.secret + "x"},
    ]
    refused = 0
    for base, calls in ((coord, coordinator_calls), (comp, compactor_calls)):
        with httpx.Client(base_url=base, timeout=30) as http:
            for headers in bad_secrets:
                for method, path, kw in calls:
                    r = http.request(method, path, headers=headers, **kw)
                    assert r.status_code == 401, (base, method, path, headers, r.text)
                    refused += 1

    good = {SECRET_HEADER: cluster.secret}
    raw = {"content-type": "application/json"}
    bad_extent = {"table_id": table_id, "prev_end_row": None, "end_row": "not hex"}
    malformed: list[tuple[str, str, dict[str, Any]]] = [
        # Not JSON at all, an empty body, a JSON array.
        *(
            ("POST", p, {"content": body, "headers": raw})
            for p in (
                "/v1/queues/plan",
                "/v1/cancel",
                "/v1/compactor/next",
                "/v1/compactor/status",
                "/v1/compactor/finished",
                "/v1/compactor/failed",
                "/v1/requests",
            )
            for body in (b"{not json", b"", b"[1, 2]")
        ),
        # Wrong types, missing fields, values out of their domain.
        ("POST", "/v1/queues/plan", {"json": {"jobs": []}}),
        ("POST", "/v1/queues/plan", {"json": {"extent": {"table_id": 5}, "jobs": []}}),
        ("POST", "/v1/queues/plan", {"json": {"extent": bad_extent, "jobs": []}}),
        ("POST", "/v1/queues/plan", {"json": {"extent": ext, "jobs": [{**jobs[0], "files": []}]}}),
        (
            "POST",
            "/v1/queues/plan",
            {"json": {"extent": ext, "jobs": [{**jobs[0], "executor": "i.default.small"}]}},
        ),
        (
            "POST",
            "/v1/queues/plan",
            {"json": {"extent": ext, "jobs": [{**jobs[0], "kind": "ALL"}]}},
        ),
        (
            "POST",
            "/v1/queues/plan",
            {"json": {"extent": ext, "jobs": [{**jobs[0], "files": [{"nope": 1}]}]}},
        ),
        ("POST", "/v1/cancel", {"json": {"table_id": 5}}),
        ("POST", "/v1/cancel", {"json": {"extents": None}}),
        ("POST", "/v1/cancel", {"json": {"table_id": table_id, "kind": "EVERYTHING"}}),
        ("POST", "/v1/cancel", {"json": {"table_id": table_id, "extents": [bad_extent]}}),
        (
            "POST",
            "/v1/compactor/next",
            {"json": {"queue": "", "compactor": "intruder", "ecid": "i2"}},
        ),
        (
            "POST",
            "/v1/compactor/next",
            {"json": {"queue": "DCQ1", "compactor": "intruder", "ecid": "a/b"}},
        ),
        (
            "POST",
            "/v1/compactor/next",
            {"json": {"queue": "DCQ1", "compactor": "intruder", "ecid": "i3", "wait_s": "long"}},
        ),
        ("POST", "/v1/compactor/status", {"json": {"compactor": "intruder"}}),
        (
            "POST",
            "/v1/compactor/status",
            {"json": {"ecid": ecid, "compactor": "intruder", "entries_read": "many"}},
        ),
        ("POST", "/v1/compactor/finished", {"json": {"ecid": ecid, "compactor": "intruder"}}),
        (
            "POST",
            "/v1/compactor/finished",
            {"json": {"ecid": ecid, "compactor": "intruder", "result": {"entries_read": "x"}}},
        ),
        (
            "POST",
            "/v1/compactor/failed",
            {"json": {"ecid": ecid, "compactor": "intruder", "state": "DONE"}},
        ),
        ("POST", "/v1/compactor/failed", {"json": {"ecid": ecid}}),
        # Unknown (misspelt) fields: each would change something if it were ignored (a plan
        # without jobs clears the queue, a cancel without extents cancels the whole table).
        ("POST", "/v1/queues/plan", {"json": {"extent": ext, "job": jobs}}),
        ("POST", "/v1/cancel", {"json": {"table_id": table_id, "extent": ext}}),
        (
            "POST",
            "/v1/compactor/next",
            {"json": {"queue": "DCQ1", "compactor": "intruder", "ecid": "i4", "wait": 0}},
        ),
        (
            "POST",
            "/v1/compactor/finished",
            {"json": {"ecid": ecid, "compactor": "intruder", "result": {**result, "rows": 1}}},
        ),
        (
            "POST",
            "/v1/compactor/failed",
            {"json": {"ecid": ecid, "compactor": "intruder", "state": "CANCELLED", "why": ""}},
        ),
        ("POST", "/v1/requests", {"json": {"op": "flush", "table": "t", "wait": True}}),
        ("POST", "/v1/requests", {"json": {"op": "delete", "table": "t"}}),
        ("POST", "/v1/requests", {"json": {"op": "compact"}}),
        ("POST", "/v1/requests", {"json": {"op": "compact", "table": "no-such-table"}}),
        ("POST", "/v1/requests", {"json": {"op": "compact", "table": "t", "hints": ["x"]}}),
    ]
    answers = []
    with httpx.Client(base_url=coord, timeout=30) as http:
        for method, path, kw in malformed:
            kw = {**kw, "headers": {**kw.get("headers", {}), **good}}
            r = http.request(method, path, **kw)
            answers.append((method, path, r.status_code))
            assert 400 <= r.status_code < 500, (method, path, kw.get("json"), r.status_code, r.text)
    with httpx.Client(base_url=comp, timeout=30) as http:
        for method, path, kw in (
            ("POST", "/v1/running", {"content": b"{not json", "headers": raw}),
            ("PUT", "/v1/status", {"json": {"ecid": None}}),
            ("DELETE", "/v1/running", {}),
            ("POST", "/v1/cancel", {"json": {"ecid": ecid}}),
        ):
            r = http.request(method, path, headers={**kw.pop("headers", {}), **good}, **kw)
            assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)

    # Nothing changed: the same job runs on the same compactor, the other still waits.
    after = _coordinator_state(cluster, table_id)
    assert after == before
    st = faults.compactor_status(cluster, "compactor-1")
    assert (st["ecid"], st["completed"], st["failed"], st["cancelled"]) == (ecid, 0, 0, 0), st
    print(f"{refused} calls refused with 401, {len(answers)} malformed calls refused with 4xx")

    # The user compaction still completes normally; then the whole instance is consistent.
    t0 = time.monotonic()
    cluster.wait_for(
        lambda: (
            all(m.selection is None for m in cluster.meta.tablets(table_id))
            and faults.compactors_idle(cluster, ["compactor-1"])
            and faults.no_tmp_files(cluster)
        ),
        120,
        "the user compaction to finish",
    )
    print(f"user compaction finished {time.monotonic() - t0:.1f}s after the refused calls")
    assert faults.compactor_status(cluster, "compactor-1")["completed"] == 2
    assert faults.scanned_rows(c, "t") == [b"a0", b"a1", b"x0", b"x1"]
    assert check_files(cluster.meta, faults.storage_of(cluster), settled=True) == 2
