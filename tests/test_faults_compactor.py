"""Fault tests 1-2 of issue 4: a compactor dies (SIGKILL) in the middle of an external compaction.

Real processes (`tests/cluster_util.py`) set up by `start_slow_ingest`, so the kill lands while
the compaction works. Each test ends with `settle_and_check` (tests/faults_common.py).
"""

from __future__ import annotations

import time

import pytest

from lithify.files.reader import SortedFileReader
from tests import faults_common as faults
from tests.cluster_util import LocalCluster
from tests.consistency import check_files

pytestmark = pytest.mark.slow

#: The documented target for a SIGKILLed compactor's job to run elsewhere is 10 s; the bound
#: asserted leaves room for a loaded two-core machine (the measured figure is printed).
RERUN_TARGET_S = 10.0
RERUN_BOUND_S = 15.0


def test_killed_compactor_job_runs_again_elsewhere(cluster: LocalCluster) -> None:
    """Test 1: SIGKILL a compactor in the middle of its compaction. The coordinator's failure
    detector notices the silence, confirms with the compactor (unreachable), deletes the
    temporary file and releases the files; the tablet is planned again and the job runs on
    the other compactor, within seconds of the kill, and then commits."""
    # Four flushed files: the ratio planner compacts them (one job).
    c, table_id, ingest = faults.start_slow_ingest(cluster, sleep_s=2, compactors=2)
    storage = faults.storage_of(cluster)

    [(ecid, (_, rec))] = faults.wait_records(cluster, table_id, 1).items()
    victim, other_id, other = faults.runner_and_spare(cluster, rec["compactor"])

    def midway() -> bool:
        st = faults.compactor_status(cluster, victim)
        done = f"created {rec['tmp_path'].rsplit('/', 1)[-1]}" in cluster.log(victim)
        return st["ecid"] == ecid and st["entries_read"] > 0 and not done

    # It has read some of its inputs, and not finished its output (the slow iterator holds it).
    cluster.wait_for(midway, 30, "the compaction to be half done")
    t_kill = time.monotonic()
    cluster.kill(victim)

    def rerun() -> tuple[str, dict] | None:
        for e, (_, r) in faults.running_records(cluster.meta, table_id).items():
            if r["compactor"] == other_id and faults.inputs_of(rec) <= faults.inputs_of(r):
                return e, r
        return None

    new_ecid, new_rec = cluster.wait_for(rerun, 45, "the job to run again on the other compactor")
    elapsed = time.monotonic() - t_kill
    print(f"\nkill-to-rerun: {elapsed:.2f}s (target {RERUN_TARGET_S:g}s)")
    assert elapsed <= RERUN_BOUND_S, f"the job ran again only {elapsed:.1f}s after the kill"
    assert new_ecid != ecid
    # Failing the dead compaction deleted its temporary file before releasing its files.
    assert not storage.exists(rec["tmp_path"])
    assert ecid not in faults.running_records(cluster.meta, table_id)
    check_files(cluster.meta, storage)
    assert "stopped reporting compaction " + ecid in cluster.log("coordinator-1")

    cluster.wait_for(
        lambda: faults.committed(cluster.meta, table_id, new_ecid, new_rec),
        faults.COMMIT_WAIT_S,
        "the job to commit on the other compactor",
    )
    files = set().union(*faults.tablet_files(cluster.meta, table_id).values())
    assert rec["output_path"] not in files and not storage.exists(rec["output_path"])
    assert faults.compactor_status(cluster, other)["completed"] >= 1
    faults.settle_and_check(cluster, c, ingest)


def test_compactor_killed_after_writing_before_reporting(cluster: LocalCluster) -> None:
    """Test 2: a compactor dies with its output written but no report heard. The work must be
    redone or committed exactly once; here it is redone (the dead compactor's result is
    nobody's), and the half-finished result never shows up.

    Method: the window between "temporary file complete" and "report sent" is microseconds,
    too short to hit with a signal. So the coordinator is SIGKILLed while the compaction runs:
    the compactor then finishes its file and retries its report against nobody. Its log line
    "report ... failed" proves both that the output is complete (checked again by reading the
    file) and that no coordinator heard it; only then is the compactor SIGKILLed. No test hook
    in product code is needed. The restarted coordinator adopts the record, finds the compactor
    gone, deletes its temporary file and releases the files; the other compactor redoes the job.
    """
    c, table_id, ingest = faults.start_slow_ingest(cluster, sleep_s=1.5, compactors=2)
    storage = faults.storage_of(cluster)

    [(ecid, (_, rec))] = faults.wait_records(cluster, table_id, 1).items()
    victim, other_id, other = faults.runner_and_spare(cluster, rec["compactor"])
    cluster.kill("coordinator-1")
    cluster.wait_for(
        lambda: faults.report_failed(cluster, victim, ecid), 60, "the compactor to finish and retry"
    )
    with SortedFileReader.open(storage, rec["tmp_path"]) as reader:
        written = reader.entries
        assert sum(b.num_rows for b in reader.batches()) == written > 0
    assert not cluster.meta.final_states()
    cluster.kill(victim)
    assert faults.compactor_status(cluster, other)["ecid"] is None  # nobody handed it the job

    cluster.restart("coordinator-1")

    def redone() -> tuple[str, dict] | None:
        for e, (_, r) in faults.running_records(cluster.meta, table_id).items():
            if e != ecid and faults.inputs_of(rec) <= faults.inputs_of(r):
                return e, r
        return None

    new_ecid, new_rec = cluster.wait_for(redone, 60, "the job to be redone")
    assert new_rec["compactor"] == other_id
    assert not storage.exists(rec["tmp_path"]), "the dead compactor's output was kept"
    cluster.wait_for(
        lambda: faults.committed(cluster.meta, table_id, new_ecid, new_rec),
        faults.COMMIT_WAIT_S,
        "the redone job to commit",
    )
    # Exactly once: the redone output replaced the inputs, the first result never committed.
    files = set().union(*faults.tablet_files(cluster.meta, table_id).values())
    assert new_rec["output_path"] in files
    assert rec["output_path"] not in files and not storage.exists(rec["output_path"])
    with SortedFileReader.open(storage, new_rec["output_path"]) as reader:
        assert reader.entries == written
    faults.settle_and_check(cluster, c, ingest)
