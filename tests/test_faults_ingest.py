"""Fault test 12 of issue 4: continuous ingest while compactors and the coordinator die.

Two million linked-list entries (SYSTEM.md 7) are written through `lithify.connect` into a
pre-split table of a local cluster whose tablet server flushes every megabyte, so flushes and
compactions run all through the ingest: small jobs on an internal executor, the larger ones on
the external queue DCQ1, served by two compactors. Meanwhile a compactor is killed with SIGKILL
every few seconds (preferably while it runs a job) and started again, and the active
coordinator is killed once, so that its standby takes over and adopts the running
compactions. Afterwards verify must find UNDEFINED = 0 and CORRUPT = 0, the table must hold
exactly the distinct rows written (which also catches the loss of an entry nothing points to),
and the consistency check must pass once everything settled.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from lithify.cli.ci import split_points
from lithify.continuous.ingest import ContinuousIngest
from tests import faults_common as faults
from tests.cluster_util import LocalCluster
from tests.consistency import check_files, check_verify

TABLE = "ci"
ENTRIES = 2_000_000
#: Small jobs stay in the tablet server; medium and large ones go to the compactors.
EXECUTORS = (
    '[{"name": "small", "type": "internal", "maxSize": "4M", "numThreads": 1},'
    ' {"name": "big", "type": "external", "queue": "DCQ1"}]'
)
#: Time between two compactor kills, and how long the faults go on after the ingest ended
#: (the compactions of the last flushes are still running then).
KILL_EVERY_S = 2.5
FAULTS_AFTER_INGEST_S = 15.0
#: How long a kill waits for its compactor to be busy (a kill mid-job is the interesting one).
BUSY_WAIT_S = 2.0


class RowLedger:
    """The distinct rows the ingest wrote, as 64-bit integers (rows are 16 hex digits)."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._lock = threading.Lock()

    def record(self, table: pa.Table) -> None:
        rows = np.array([int(r, 16) for r in table.column("row").to_pylist()], dtype=np.uint64)
        with self._lock:
            self._parts.append(rows)

    def distinct(self) -> int:
        with self._lock:
            return len(np.unique(np.concatenate(self._parts))) if self._parts else 0


def _kill_compactor(cluster: LocalCluster, name: str) -> bool:
    """SIGKILL `name` (waiting up to BUSY_WAIT_S for it to run a job) and start it again;
    returns whether it was running a job when killed."""
    deadline = time.monotonic() + BUSY_WAIT_S
    busy = False
    while time.monotonic() < deadline:
        try:
            busy = faults.compactor_status(cluster, name)["ecid"] is not None
        except Exception:  # noqa: BLE001 - a busy compactor may answer slowly; kill it anyway
            busy = False
        if busy:
            break
        time.sleep(0.1)
    cluster.kill(name)
    cluster.restart(name)
    return busy


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_continuous_ingest_survives_killed_compactors_and_coordinator(
    cluster: LocalCluster,
) -> None:
    t_start = time.monotonic()
    cluster.start(
        coordinators=2,  # the second one stands by
        compactors=2,
        system_properties={
            "tserver.memory.maps.max": "1M",
            "tserver.compaction.major.service.default.planner.opts.executors": EXECUTORS,
            # A standby takes over within about this after the active coordinator dies.
            "coordinator.lease.ttl": "3s",
        },
    )
    c = cluster.client()
    c.create_table(TABLE, splits=split_points(4))
    ledger = RowLedger()

    def write(t: pa.Table) -> None:
        c.write(TABLE, t)
        ledger.record(t)

    ingest = ContinuousIngest(write, batch_size=10_000, seed=12)
    outcome: dict[str, Any] = {}

    def run_ingest() -> None:
        try:
            outcome["stats"] = ingest.run(ENTRIES)
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            outcome["error"] = e

    writer = threading.Thread(target=run_ingest, name="ingest", daemon=True)
    t_ingest = time.monotonic()
    writer.start()

    compactors = cluster.names("compactor")
    kills = busy_kills = 0
    coordinator_killed = False
    _, first_epoch = cluster.lease("coordinator")
    ingest_done_at: float | None = None
    for i in range(1000):  # bounded: one round per KILL_EVERY_S
        if not writer.is_alive() and ingest_done_at is None:
            ingest_done_at = time.monotonic()
        if ingest_done_at is not None and time.monotonic() - ingest_done_at > FAULTS_AFTER_INGEST_S:
            break
        assert time.monotonic() - t_ingest < 360, "the ingest is far too slow"
        round_start = time.monotonic()
        if i == 3 and not coordinator_killed:
            active = cluster.active_coordinator()
            assert active is not None
            cluster.kill(active)
            coordinator_killed = True
            cluster.wait_for(
                lambda: (
                    cluster.lease("coordinator")[1] > first_epoch
                    and cluster.active_coordinator() is not None
                ),
                30,
                "the standby coordinator to take over",
            )
            cluster.restart(active)  # it stands by from now on
        else:
            busy_kills += _kill_compactor(cluster, compactors[i % len(compactors)])
            kills += 1
        time.sleep(max(0.0, KILL_EVERY_S - (time.monotonic() - round_start)))
    writer.join(120)
    assert not writer.is_alive()
    ingest_s = (ingest_done_at or time.monotonic()) - t_ingest
    assert "error" not in outcome, outcome.get("error")
    stats = outcome["stats"]
    assert stats.written >= ENTRIES, stats
    assert coordinator_killed and cluster.lease("coordinator")[1] > first_epoch
    assert kills >= 5 and busy_kills >= 1, (kills, busy_kills)

    # Let the compactions settle: nothing running or queued, no result left to commit.
    table_id = c.table_info(TABLE).id

    def settled() -> bool:
        view = faults.coordinator_view(cluster)
        return (
            view["active"]
            and not view["running"]
            and not any(view["queues"].values())
            and not faults.running_records(cluster.meta, table_id)
            and not cluster.meta.final_states()
            and all(faults.compactor_status(cluster, n)["ecid"] is None for n in compactors)
            and faults.tserver_compactions_idle(cluster)
        )

    t_settle = time.monotonic()
    cluster.wait_for(
        faults.held_for(settled, 2.0), 180, "the compactions to settle", interval_s=0.5
    )
    settle_s = time.monotonic() - t_settle

    t_verify = time.monotonic()
    result = check_verify(c.scan(TABLE))
    verify_s = time.monotonic() - t_verify
    assert result.unreferenced > 0
    assert result.entries == ledger.distinct(), (result.entries, ledger.distinct())
    checked = check_files(cluster.meta, faults.storage_of(cluster), settled=True)

    log = "\n".join(cluster.log(n) for n in cluster.names("coordinator"))
    external = log.count("Compacted ")
    internal = cluster.log("tserver").count("Compacted ")
    print(
        f"\ningest of {stats.written} entries: {ingest_s:.1f}s ({stats.written / ingest_s:.0f}/s); "
        f"{kills} compactor kills ({busy_kills} mid-job), 1 coordinator kill; "
        f"{external} external and {internal} internal compactions committed; "
        f"settled in {settle_s:.1f}s; verify {verify_s:.1f}s: {result}; {checked} files checked; "
        f"total {time.monotonic() - t_start:.0f}s"
    )
    assert external > 0 and internal > 0
    # The standby rebuilt its state at takeover (committing or adopting what the dead one left),
    # and compactors killed mid-job were noticed and their jobs failed (then planned and run
    # again).
    assert f"coordinator epoch {first_epoch + 1} rebuilt: " in log, log
    assert "stopped reporting compaction" in log
