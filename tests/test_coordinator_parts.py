"""The coordinator's pure parts, without processes, metadata store or files.

`test_coordinator_core.py` runs the whole coordinator against a real metadata store; these tests
pin the rules its parts decide alone: the configuration's defaults (one definition, in
`lithify.table.properties`), the judgement of a vanished compaction, the final state's content,
the commit's tablet mutation, the bounded memory of ended compactions, and the queue of
background commits.
"""

from __future__ import annotations

import threading

import pytest

from lithify.coordinator import commit
from lithify.coordinator.commit import BackgroundCommits, commit_mutation, final_state_data
from lithify.coordinator.config import CoordinatorConfig
from lithify.coordinator.phi import PhiAccrualDetector
from lithify.coordinator.running import (
    CANCELLING,
    COMMITTING,
    RunningCompaction,
    RunningSet,
    cancel_reason,
    suspected,
)
from lithify.data.ranges import Extent, FileRef
from lithify.metadata.store import TabletMeta
from lithify.table.properties import system_properties

EXTENT = Extent("t1", None, None)


def record(ecid: str = "e1", kind: str = "SYSTEM", selection_id: str | None = None) -> dict:
    return {
        "ecid": ecid,
        "kind": kind,
        "queue": "q",
        "compactor": "c1",
        "address": None,
        "inputs": [FileRef("t1/F1.parquet", 10, 1).to_json()],
        "tmp_path": "t1/C1.parquet_tmp_" + ecid,
        "output_path": "t1/C1.parquet",
        "selection_id": selection_id,
        "priority": 3,
        "started": 1.0,
    }


def run_of(rec: dict) -> RunningCompaction:
    return RunningCompaction.from_record(EXTENT, rec, PhiAccrualDetector(window=10))


def test_config_defaults_are_the_property_defaults() -> None:
    p = system_properties({})
    c = CoordinatorConfig()
    assert c == CoordinatorConfig.from_properties({})
    assert c.lease_ttl_s == p.get_duration("coordinator.lease.ttl")
    assert c.queue_max == p.get_int("coordinator.queue.max")
    assert c.phi_threshold == p.get_float("coordinator.phi.threshold")
    assert c.phi_window == p.get_int("coordinator.phi.window")
    assert c.phi_min_std_s == p.get_duration("coordinator.phi.min.std")
    assert c.check_interval_s == p.get_duration("coordinator.check.interval")


def test_config_from_properties_and_overrides() -> None:
    c = CoordinatorConfig.from_properties(
        {"coordinator.phi.threshold": "3", "coordinator.lease.ttl": "2s"}, reserve_max_s=0.5
    )
    assert (c.phi_threshold, c.lease_ttl_s, c.reserve_max_s) == (3.0, 2.0, 0.5)


def test_from_record_round_trips_the_record() -> None:
    run = run_of(record(kind="USER", selection_id="s1"))
    assert (run.ecid, run.queue, run.kind, run.compactor) == ("e1", "q", "USER", "c1")
    assert (run.selection_id, run.priority, run.started) == ("s1", 3, 1.0)
    assert run.job is None


@pytest.mark.parametrize(
    ("meta", "kind", "reason"),
    [
        (None, "SYSTEM", "tablet gone"),
        (TabletMeta(EXTENT), "SYSTEM", "record gone"),
        (TabletMeta(EXTENT, compactions={"e1": record()}), "SYSTEM", None),
        (TabletMeta(EXTENT, compactions={"e1": record()}), "USER", "user compaction cancelled"),
        (
            TabletMeta(EXTENT, compactions={"e1": record()}, selection={"id": "s2", "files": []}),
            "USER",
            "user compaction cancelled",
        ),
        (
            TabletMeta(EXTENT, compactions={"e1": record()}, selection={"id": "s1", "files": []}),
            "USER",
            None,
        ),
    ],
)
def test_cancel_reason(meta: TabletMeta | None, kind: str, reason: str | None) -> None:
    assert cancel_reason(run_of(record(kind=kind, selection_id="s1")), meta) == reason


def test_request_cancel_only_from_running_and_never_while_committing() -> None:
    run = run_of(record())
    assert run.request_cancel("why")
    assert (run.state, run.cancel_reason) == (CANCELLING, "why")
    assert not run.request_cancel("again")
    run.state = COMMITTING
    run.detector.heartbeat(0.0)
    assert not suspected(run, 1e6, 1.0)  # a commit in progress is never judged dead


def test_running_set_remembers_ended_ecids_with_their_leftover() -> None:
    s = RunningSet()
    run = run_of(record())
    assert s.add(run) is run and s.add(run_of(record())) is run  # adoption keeps the first
    s.end("e1", run.tmp_path)
    assert "e1" not in s and s.ended("e1") and s.leftover_tmp("e1") == run.tmp_path
    assert not s.ended("e2") and s.leftover_tmp("e2") is None


def test_final_state_data_keeps_paths_at_the_top_level() -> None:
    data = final_state_data(
        {"entries_read": "5", "entries_written": 4},
        tmp_path="t",
        output_path="o",
        kind="SYSTEM",
        queue="q",
        compactor="c",
    )
    assert data["tmp_path"] == "t" and data["output_path"] == "o"  # the GC looks there
    assert (data["entries_read"], data["entries_written"], data["bytes_written"]) == (5, 4, 0)


def test_commit_mutation_replaces_inputs_or_reports_a_vanished_record() -> None:
    f1 = FileRef("t1/F1.parquet", 10, 1)
    f2 = FileRef("t1/F2.parquet", 10, 1)
    out = FileRef("t1/C1.parquet", 7, 1)
    m = TabletMeta(EXTENT, files=(f1, f2), compactions={"e1": record()})
    new = commit_mutation("e1", out)(m)
    assert new is not None and set(new.files) == {f2, out} and "e1" not in new.compactions
    assert commit_mutation("e9", out)(m) is None


def test_background_commits_retry_without_holding_up_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(commit, "RETRY_MIN_S", 0.3)
    done: list[str] = []
    failures = {"a": 2}

    def run(item: str) -> bool:
        if failures.get(item):
            failures[item] -= 1
            return False  # a passing error: again later
        done.append(item)
        return True

    commits: BackgroundCommits[str] = BackgroundCommits(run)
    assert commits.submit("a") and commits.submit("b") and commits.submit("c")
    assert commits.drain(30)
    assert done == ["b", "c", "a"]  # "a" waited for its retries behind nobody
    assert commits.pending() == 0
    assert commits.close(1.0)
    assert not commits.submit("d")  # closed: left for a successor


def test_background_commits_close_gives_up_after_its_timeout() -> None:
    gate = threading.Event()
    started = threading.Event()

    def run(item: str) -> bool:
        started.set()
        gate.wait(30)
        return True

    commits: BackgroundCommits[str] = BackgroundCommits(run)
    commits.submit("slow")
    commits.submit("never")
    assert started.wait(10)
    assert commits.pending() == 2
    assert not commits.close(0.1)  # "never" is dropped: its final state is a successor's
    gate.set()
    assert commits.drain(10) and commits.pending() == 0
