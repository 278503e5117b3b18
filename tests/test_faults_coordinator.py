"""Fault tests 3-5 of issue 4: the compaction coordinator dies (SIGKILL) around external work.

Real processes (`tests/cluster_util.py`) set up by `start_slow_ingest`, so the kill lands while
compactions run. Each test ends with `settle_and_check` (tests/faults_common.py).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import lithify
from lithify.data.ranges import FileRef
from lithify.files.reader import SortedFileReader
from lithify.rpc.auth import SECRET_HEADER
from lithify.tablet import reservation
from lithify.tablet.compactions import selection_after_commit
from tests import faults_common as faults
from tests.cluster_util import SLOW_ITERATOR, LocalCluster
from tests.consistency import check_files

pytestmark = pytest.mark.slow


@pytest.fixture
def backend_cluster(tmp_path: Path, metadata_url: str) -> Iterator[LocalCluster]:
    """A `LocalCluster` on each metadata backend of conftest's `metadata_url` (SQLite always,
    PostgreSQL when LITHIFY_TEST_PG_DSN is set); every process is killed afterwards."""
    c = LocalCluster(tmp_path / "instance", metadata_url=metadata_url)
    try:
        yield c
    finally:
        c.close()


def test_standby_coordinator_takes_over_running_compactions(backend_cluster: LocalCluster) -> None:
    """Test 3: SIGKILL the active coordinator while two compactions run. The standby takes the
    lease once it expires, rebuilds the running set from the records, and the compactors,
    which find it through the lease, report to it: both compactions finish and commit, neither
    is failed or redone."""
    cluster = backend_cluster
    # Each of the two tablets gets four files: two jobs, one per compactor.
    c, table_id, ingest = faults.start_slow_ingest(
        cluster, sleep_s=2, coordinators=2, compactors=2, splits=["8"]
    )

    recs = faults.wait_records(cluster, table_id, 2)
    assert {r["compactor"] for _, r in recs.values()} == set(faults.compactor_names(cluster))
    first = cluster.active_coordinator()
    assert first is not None
    [standby] = [n for n in cluster.names("coordinator") if n != first]
    _, epoch = cluster.lease("coordinator")
    cluster.kill(first)
    # Writes go on meanwhile: they do not need a coordinator.
    ingest.cycles(1, flush=False)

    cluster.wait_for(
        lambda: cluster.lease("coordinator")[1] > epoch and cluster.active_coordinator() == standby,
        30,
        "the standby coordinator to take over",
    )
    check_files(cluster.meta, faults.storage_of(cluster))
    for ecid, (_, rec) in recs.items():
        cluster.wait_for(
            lambda ecid=ecid, rec=rec: faults.committed(cluster.meta, table_id, ecid, rec),
            faults.COMMIT_WAIT_S,
            f"compaction {ecid} to commit through the new coordinator",
        )
    # A commit's log line follows its metadata update: it may trail what the loop above saw.
    cluster.wait_for(
        lambda: all(f"(ecid {ecid})" in cluster.log(standby) for ecid in recs),
        30,
        "the commits' log lines",
    )
    log = cluster.log(standby)
    assert "2 running adopted" in log, log
    for ecid in recs:
        assert "stopped reporting compaction " + ecid not in log
    for name in faults.compactor_names(cluster).values():
        st = faults.compactor_status(cluster, name)
        assert st["completed"] >= 1 and st["failed"] == 0 and st["cancelled"] == 0, st
    faults.settle_and_check(cluster, c, ingest)


def _requests_known(cluster: LocalCluster, name: str) -> int:
    """How many async requests coordinator `name` knows (its Prometheus gauge, all states)."""
    text = httpx.get(
        f"{cluster.url(name)}/metrics", headers={SECRET_HEADER: cluster.secret}, timeout=10
    ).text
    return sum(
        int(float(v))
        for v in re.findall(r"^lithify_coordinator_requests\{[^}]*\} (\S+)$", text, re.M)
    )


def test_waiting_client_follows_its_user_compaction_across_failover(cluster: LocalCluster) -> None:
    """Test 3, with a user compaction and a client waiting for it (SYSTEM.md 5.6): SIGKILL the
    active coordinator while the compaction's passes run. The new coordinator does not know the
    request and answers NOT_SUBMITTED; the client resubmits it (same id), and the resubmission
    must follow the compaction still in progress, not fail because its own selection is
    pending, nor start it over: the client's `compact` returns, each tablet ends with the one
    file its first pass wrote."""
    # Two files per tablet: below the ratio, no system compaction.
    c, table_id, ingest = faults.start_slow_ingest(
        cluster, sleep_s=None, coordinators=2, compactors=2, splits=["8"], cycles=2
    )
    outcome: dict[str, object] = {}

    def compact(client: lithify.Client) -> None:
        try:
            outcome["summary"] = client.compact(
                faults.TABLE, iterators=[(SLOW_ITERATOR, {"sleep_s": "25"})], timeout=150
            )
        except BaseException as e:  # noqa: BLE001 - inspected below
            outcome["error"] = e

    waiter = threading.Thread(target=compact, args=(cluster.client(),), daemon=True)
    waiter.start()
    recs = faults.wait_records(cluster, table_id, 2)
    assert {r["kind"] for _, r in recs.values()} == {"USER"}
    first = cluster.active_coordinator()
    assert first is not None
    [standby] = [n for n in cluster.names("coordinator") if n != first]
    cluster.kill(first)
    cluster.wait_for(
        lambda: _requests_known(cluster, standby) > 0,
        60,
        "the client to resubmit its request to the new coordinator",
    )
    # The resubmission came while the passes still run: what this test is about.
    assert set(recs) <= set(faults.running_records(cluster.meta, table_id))

    waiter.join(150)
    assert not waiter.is_alive()
    assert "error" not in outcome, outcome
    for ecid, (extent, rec) in recs.items():
        assert faults.committed(cluster.meta, table_id, ecid, rec)
        assert faults.tablet_files(cluster.meta, table_id)[extent] == {rec["output_path"]}
    assert all(m.selection is None for m in cluster.meta.tablets(table_id))
    faults.settle_and_check(cluster, c, ingest)


@pytest.mark.parametrize("stage", ["final_state", "renamed", "committed"])
def test_coordinator_dies_between_final_state_and_commit(cluster: LocalCluster, stage: str) -> None:
    """Test 4: the coordinator dies after recording the final state (with `renamed`, after
    renaming the output too; with `committed`, even after the tablet's commit, before the final
    state was deleted). A restarted coordinator finishes the commit from the final state before
    it serves anything, exactly once; the compactor's report, retried all along, then arrives
    as a repeat and changes nothing.

    Method: the commit steps follow each other within milliseconds, too fast to stop the
    coordinator between them from outside. So the coordinator is SIGKILLed while the job runs;
    once the compactor has finished its file (its report fails: nobody hears it), the test
    does exactly what the dead coordinator's commit steps 1 (to 3) would have done, fenced
    with its epoch: `put_final_state` with the result, the rename, the conditional update of
    the tablet. Then the coordinator restarts.
    """
    c, table_id, ingest = faults.start_slow_ingest(cluster, sleep_s=1.5)
    storage = faults.storage_of(cluster)

    [(ecid, (extent, rec))] = faults.wait_records(cluster, table_id, 1).items()
    _, epoch = cluster.lease("coordinator")
    cluster.kill("coordinator-1")
    cluster.wait_for(
        lambda: faults.report_failed(cluster, "compactor-1", ecid), 60, "the compactor's result"
    )
    st = faults.compactor_status(cluster, "compactor-1")
    assert st["ecid"] == ecid
    tmp, output = rec["tmp_path"], rec["output_path"]
    with SortedFileReader.open(storage, tmp) as reader:
        written = reader.entries
    data = {
        "entries_read": st["entries_read"],
        "entries_written": written,
        "bytes_read": 0,
        "bytes_written": storage.size(tmp),
        "tmp_path": tmp,
        "output_path": output,
        "kind": rec["kind"],
        "queue": rec["queue"],
        "compactor": rec["compactor"],
    }
    cluster.meta.put_final_state(
        ecid, table_id, extent, "FINISHED", data, fence=("coordinator", epoch)
    )
    inputs_before = {f.path for f in cluster.meta.get_tablet(extent).files}
    if stage in ("renamed", "committed"):
        storage.rename(tmp, output)
    if stage == "committed":
        out = FileRef(output, data["bytes_written"], written)
        inputs = {FileRef.from_json(x) for x in rec["inputs"]}
        cluster.meta.mutate_tablet(
            extent,
            lambda m: reservation.commit(m, ecid, out).replace(
                selection=selection_after_commit(m, inputs, out, None)
            ),
            fence=("coordinator", epoch),
        )

    cluster.restart("coordinator-1")
    cluster.wait_for(
        lambda: (
            not cluster.meta.final_states() and faults.committed(cluster.meta, table_id, ecid, rec)
        ),
        faults.COMMIT_WAIT_S,
        "the final state to be committed",
    )
    # The final state is gone a moment before the takeover logs its counts: wait for that line
    # (the first one is the first incarnation's).
    cluster.wait_for(
        lambda: cluster.log("coordinator-1").count(" rebuilt: ") == 2, 30, "the rebuild's report"
    )
    log = cluster.log("coordinator-1")
    assert "rebuilt: 1 committed, 0 cleaned, 0 running adopted" in log, log
    commits = 0 if stage == "committed" else 1  # the test made that commit itself
    assert log.count(f"created {output.rsplit('/', 1)[-1]} (ecid {ecid})") == commits, log
    cluster.wait_for(
        lambda: "acknowledged after" in cluster.log("compactor-1"), 30, "the repeated report"
    )
    # Exactly once: one output in place of the inputs, no second file, no record left.
    files = faults.tablet_files(cluster.meta, table_id)[extent]
    assert output in files and not (files & inputs_before)
    assert not storage.exists(tmp) and storage.exists(output)
    with SortedFileReader.open(storage, output) as reader:
        assert reader.entries == written
    cluster.wait_for(
        lambda: faults.compactor_status(cluster, "compactor-1")["ecid"] is None,
        30,
        "the compactor idle",
    )
    assert faults.compactor_status(cluster, "compactor-1")["completed"] == 1
    check_files(cluster.meta, storage)
    faults.settle_and_check(cluster, c, ingest)


def test_result_waits_for_a_returning_coordinator(cluster: LocalCluster) -> None:
    """Test 5: the only coordinator is down (SIGKILL) when the compactor finishes. The compactor
    keeps retrying its report (and its heartbeats) until a coordinator is back; the restarted
    coordinator adopts the record, hears the report and commits that very result: nothing is
    failed or redone."""
    c, table_id, ingest = faults.start_slow_ingest(cluster, sleep_s=1.5)
    storage = faults.storage_of(cluster)

    [(ecid, (_, rec))] = faults.wait_records(cluster, table_id, 1).items()
    cluster.kill("coordinator-1")
    # Several attempts: the compactor backs off and goes on retrying while nobody answers.
    cluster.wait_for(
        lambda: faults.report_failed(cluster, "compactor-1", ecid, attempts=3),
        60,
        "the compactor to retry its report",
    )
    assert storage.exists(rec["tmp_path"]) and not storage.exists(rec["output_path"])
    assert not cluster.meta.final_states()
    assert ecid in faults.running_records(cluster.meta, table_id)

    cluster.restart("coordinator-1")
    cluster.wait_for(
        lambda: faults.committed(cluster.meta, table_id, ecid, rec),
        faults.COMMIT_WAIT_S,
        "the reported result to commit",
    )
    cluster.wait_for(
        lambda: (
            f"report /v1/compactor/finished of {ecid} acknowledged after"
            in cluster.log("compactor-1")
        ),
        30,
        "the acknowledgement",
    )
    log = cluster.log("coordinator-1")
    assert "1 running adopted" in log and "stopped reporting compaction" not in log, log
    st = faults.compactor_status(cluster, "compactor-1")
    assert (st["completed"], st["failed"], st["cancelled"]) == (1, 0, 0), st
    faults.settle_and_check(cluster, c, ingest)
