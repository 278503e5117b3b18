"""Fault tests 6-7 of issue 4: the tablet server goes away (SIGKILL, or the table goes offline)
while external compactions of its tablets run.

SYSTEM.md 5.5: "The commit needs no hosting server; a tablet that is offline or moving commits
all the same", and a server death or taking a table offline does not cancel external work.
Real processes (`tests/cluster_util.py`) set up by `start_slow_ingest`. Each test ends with
`settle_and_check` (tests/faults_common.py).
"""

from __future__ import annotations

import pytest

from lithify.errors import LithifyError
from tests import faults_common as faults
from tests.cluster_util import LocalCluster
from tests.consistency import check_files

pytestmark = pytest.mark.slow


def test_tserver_killed_while_external_compactions_run(cluster: LocalCluster) -> None:
    """Test 6: SIGKILL the tablet server while two external compactions of its tablets run
    and a client is writing. Both compactions commit while it is down; after it restarts
    (write-ahead log recovery) every write it acknowledged, with `table.durability=flush`, is
    there, and the compacted tablets serve the new files."""
    c, table_id, ingest = faults.start_slow_ingest(
        cluster,
        sleep_s=2,
        compactors=2,
        splits=["8"],
        properties={"table.durability": "flush"},
    )

    recs = faults.wait_records(cluster, table_id, 2)
    # More writes, never flushed: after the kill they exist only in the write-ahead log.
    before = ingest.writes_done()
    ingest.start()
    cluster.wait_for(
        lambda: ingest.writes_done() >= before + 10 or ingest.error, 30, "unflushed writes"
    )
    assert ingest.error is None, ingest.error
    cluster.kill("tserver")
    # The write in flight fails (or the next one, when the kill fell between two cycles);
    # stopping first could end the ingest between cycles without a failed write.
    cluster.wait_for(lambda: ingest.error is not None, 60, "the ingest's write to fail")
    ingest.stop()
    assert isinstance(ingest.error, LithifyError), ingest.error

    for ecid, (_, rec) in recs.items():
        cluster.wait_for(
            lambda ecid=ecid, rec=rec: faults.committed(cluster.meta, table_id, ecid, rec),
            faults.COMMIT_WAIT_S,
            f"compaction {ecid} to commit without a tablet server",
        )
    assert not cluster.alive("tserver")
    check_files(cluster.meta, faults.storage_of(cluster))
    assert all(
        faults.compactor_status(cluster, n)["failed"] == 0
        for n in faults.compactor_names(cluster).values()
    )

    cluster.restart("tserver")
    faults.wait_tserver_back(cluster)
    assert "recovered " in cluster.log("tserver")
    served = {t.extent: {f.path for f in t.files} for t in c.tablets(faults.TABLE)}
    for _, rec in recs.values():
        assert any(rec["output_path"] in files for files in served.values())
    assert served == faults.tablet_files(cluster.meta, table_id)
    n = ingest.check_present(c)
    print(f"\nacknowledged entries checked after the restart: {n}")
    faults.settle_and_check(cluster, c, ingest)


def test_offline_table_compaction_commits_and_is_seen_online(cluster: LocalCluster) -> None:
    """Test 7: take the table offline while its external compaction runs. The compaction is
    not cancelled: it commits into the offline tablet's metadata, and once the table is online
    again the tablet serves the new file (and not the inputs)."""
    c, table_id, ingest = faults.start_slow_ingest(cluster, sleep_s=1.5)

    [(ecid, (extent, rec))] = faults.wait_records(cluster, table_id, 1).items()
    c.offline(faults.TABLE)
    assert c.table_info(faults.TABLE).state == "offline"
    cluster.wait_for(
        lambda: faults.committed(cluster.meta, table_id, ecid, rec),
        faults.COMMIT_WAIT_S,
        "the compaction to commit while the table is offline",
    )
    assert cluster.meta.get_table(table_id).state == "offline"
    assert faults.compactor_status(cluster, "compactor-1")["cancelled"] == 0
    check_files(cluster.meta, faults.storage_of(cluster))

    c.online(faults.TABLE)
    [tablet] = c.tablets(faults.TABLE)
    served = {f.path for f in tablet.files}
    assert rec["output_path"] in served
    assert served == faults.tablet_files(cluster.meta, table_id)[extent]
    faults.settle_and_check(cluster, c, ingest)
