"""The coordinator's logic against a real metadata store (SQLite and PostgreSQL) and real files.

Only the other processes are stood in for: the compactor is this test calling `run_compaction`
on the job JSON exactly as a compactor would, the tablet server is a small recording class, and
time is a fake clock so that failure detection needs no sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lithify.compaction.compactor_job import CompactionRequest, run_compaction
from lithify.coordinator.commit import Committer, commit_mutation
from lithify.coordinator.config import CoordinatorConfig
from lithify.coordinator.core import CompactionCoordinator, NotActiveError
from lithify.coordinator.queues import PlannedJob, planned_job_from_json
from lithify.coordinator.requests import NOT_SUBMITTED, request_id
from lithify.data.ranges import Extent, FileRef
from lithify.errors import LithifyError
from lithify.files.naming import new_file_name
from lithify.files.reader import SortedFileReader
from lithify.files.storage import Storage
from lithify.files.writer import SortedFileWriter
from lithify.metadata.store import FinalState, LeaseLostError, MetadataStore, TabletMeta
from lithify.rpc.wire import extent_from_json, extent_to_json
from tests.test_merge import to_table

LEASE = "coordinator"

JOB_KEYS = {
    "ecid",
    "extent",
    "inputs",
    "output_path",
    "tmp_path",
    "propagate_deletes",
    "versions",
    "iterators",
    "compression",
    "kind",
    "queue",
    "priority",
}
RECORD_KEYS = {
    "ecid",
    "kind",
    "executor",
    "queue",
    "priority",
    "compactor",
    "inputs",
    "tmp_path",
    "output_path",
    "propagate_deletes",
    "selection_id",
    "started",
}


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@dataclass
class Env:
    meta: MetadataStore
    storage: Storage
    clock: FakeClock
    refreshed: list[Extent] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)
    running_on_compactor: dict[str, str | None] = field(default_factory=dict)
    cores: list[CompactionCoordinator] = field(default_factory=list)

    def ask(self, address: str) -> str | None:
        self.asked.append(address)
        return self.running_on_compactor.get(address)

    def core(self, epoch: int | None = None, **kw: Any) -> CompactionCoordinator:
        if epoch is None:
            epoch = self.meta.lease_info(LEASE).epoch
        core = CompactionCoordinator(
            self.meta,
            self.storage,
            epoch,
            clock=self.clock,
            ask_compactor=self.ask,
            refresh=self.refreshed.extend,
            **kw,
        )
        self.cores.append(core)
        return core

    def take_lease(self, holder: str) -> int:
        """Depose whoever holds the coordinator lease (as a takeover after its TTL would)."""
        current = self.meta.lease_info(LEASE)
        if current is not None and current.holder is not None:
            self.meta.release_lease(LEASE, current.holder)
        epoch = self.meta.acquire_lease(LEASE, holder, 60.0)
        assert epoch is not None
        return epoch


@pytest.fixture
def env(metadata_url: str, tmp_path: Path) -> Iterator[Env]:
    meta = MetadataStore.open(metadata_url)
    e = Env(meta, Storage(str(tmp_path / "data")), FakeClock())
    e.take_lease("http://coordinator-a")
    try:
        yield e
    finally:
        for c in e.cores:
            c.close()
        meta.close()


# ---------------------------------------------------------------------- helpers


def write_file(
    storage: Storage, table_id: str, rows: list[bytes], *, ts: int = 1, deleted: bool = False
) -> FileRef:
    path = new_file_name("F", table_id)
    entries = [(r, b"f", b"q", b"", ts, deleted, b"" if deleted else b"v" + r) for r in rows]
    w = SortedFileWriter(storage, path)
    w.write(to_table(sorted(entries)).to_batches()[0])
    info = w.close()
    return FileRef(info.path, info.size, info.entries)


def add_files(env: Env, extent: Extent, files: list[FileRef]) -> TabletMeta:
    out = env.meta.mutate_tablet(extent, lambda m: m.replace(files=(*m.files, *files)))
    assert out is not None
    return out


def table_with_files(
    env: Env, name: str = "t", splits: tuple[bytes, ...] = (), files_per_tablet: int = 3
) -> tuple[str, list[TabletMeta]]:
    info = env.meta.create_table(name, splits=splits)
    metas = []
    for i, m in enumerate(env.meta.tablets(info.id)):
        lo = m.extent.prev_end_row or b""
        refs = [
            write_file(env.storage, info.id, [lo + b"r%d_%d_%d" % (i, k, j) for j in range(5)])
            for k in range(files_per_tablet)
        ]
        metas.append(add_files(env, m.extent, refs))
    return info.id, metas


def plan_all(
    core: CompactionCoordinator,
    meta: TabletMeta,
    *,
    queue: str = "q",
    priority: int = 5,
    kind: str = "SYSTEM",
    files: tuple[FileRef, ...] | None = None,
) -> int:
    return core.plan(meta.extent, [PlannedJob(files or meta.files, f"e.{queue}", priority, kind)])


def compact_as_compactor(storage: Storage, job: dict[str, Any]) -> dict[str, int]:
    """What a compactor does with a job: run_compaction to the temporary name, nothing else."""
    result = run_compaction(
        storage,
        CompactionRequest(
            inputs=[FileRef.from_json(f) for f in job["inputs"]],
            extent_range=extent_from_json(job["extent"]).range,
            output_path=job["output_path"],
            tmp_id=job["ecid"],
            propagate_deletes=job["propagate_deletes"],
            versions=job["versions"],
            iterators=[(c, o) for c, o in job["iterators"]],
            compression=job["compression"],
        ),
    )
    assert result.tmp_path == job["tmp_path"]
    return {
        "entries_read": result.entries_read,
        "entries_written": result.entries_written,
        "bytes_read": result.bytes_read,
        "bytes_written": result.bytes_written,
    }


def finish(core: CompactionCoordinator, ecid: str, compactor: str, result: dict[str, Any]) -> None:
    """`finished`, then wait for its background commit (what the assertions look at)."""
    core.finished(ecid, compactor, result)
    assert core.drain_commits(30)


def count_entries(storage: Storage, path: str) -> int:
    with SortedFileReader.open(storage, path) as r:
        return sum(b.num_rows for b in r.batches())


def tablet(env: Env, extent: Extent) -> TabletMeta:
    m = env.meta.get_tablet(extent)
    assert m is not None
    return m


# ---------------------------------------------------------------------- the normal path


def test_plan_reserve_compact_commit(env: Env) -> None:
    _, (m,) = table_with_files(env)
    core = env.core()
    assert plan_all(core, m) == 1
    job = core.next_job("q", "c1", "http://127.0.0.1:1", "ecid-1")
    assert job is not None and set(job) == JOB_KEYS
    assert job["ecid"] == "ecid-1"
    assert extent_from_json(job["extent"]) == m.extent
    assert job["tmp_path"] == job["output_path"] + "_tmp_ecid-1"
    assert job["propagate_deletes"] is False  # all the tablet's files: a full compaction
    assert job["output_path"].rsplit("/", 1)[-1].startswith("A")
    assert (job["versions"], job["compression"], job["iterators"]) == (1, "zstd", [])
    assert [FileRef.from_json(f) for f in job["inputs"]] == sorted(
        m.files, key=lambda f: f.path, reverse=True
    )  # newest first
    rec = tablet(env, m.extent).compactions["ecid-1"]
    assert set(rec) >= RECORD_KEYS
    assert (rec["compactor"], rec["queue"], rec["executor"]) == ("c1", "q", "e.q")

    result = compact_as_compactor(env.storage, job)
    assert result["entries_written"] == 15
    finish(core, "ecid-1", "c1", result)

    after = tablet(env, m.extent)
    assert [f.path for f in after.files] == [job["output_path"]]
    assert after.files[0].entries == 15
    assert after.compactions == {}
    assert env.meta.final_states() == []
    assert not env.storage.exists(job["tmp_path"])
    assert count_entries(env.storage, job["output_path"]) == 15
    assert env.refreshed == [m.extent]
    assert core.metrics().completed == 1 and core.metrics().running == 0

    # A repeated report (the compactor never saw the answer) changes nothing.
    finish(core, "ecid-1", "c1", result)
    assert tablet(env, m.extent) == after
    assert env.storage.exists(job["output_path"])
    assert core.metrics().completed == 1


def test_second_finished_after_restart_is_harmless(env: Env) -> None:
    _, (m,) = table_with_files(env)
    core = env.core()
    plan_all(core, m)
    job = core.next_job("q", "c1", None, "e1")
    result = compact_as_compactor(env.storage, job)
    finish(core, "e1", "c1", result)
    after = tablet(env, m.extent)
    fresh = env.core(env.take_lease("http://coordinator-b"))
    fresh.rebuild()
    finish(fresh, "e1", "c1", result)
    assert tablet(env, m.extent) == after
    assert env.storage.exists(job["output_path"])


def test_partial_compaction_keeps_deletes_and_other_files(env: Env) -> None:
    _, (m,) = table_with_files(env, files_per_tablet=4)
    core = env.core()
    chosen = m.files[:2]
    plan_all(core, m, files=chosen)
    job = core.next_job("q", "c1", None, "e1")
    assert job["propagate_deletes"] is True
    assert job["output_path"].rsplit("/", 1)[-1].startswith("C")
    finish(core, "e1", "c1", compact_as_compactor(env.storage, job))
    paths = {f.path for f in tablet(env, m.extent).files}
    assert paths == {f.path for f in m.files[2:]} | {job["output_path"]}


def test_empty_output_removes_the_inputs(env: Env) -> None:
    info = env.meta.create_table("t")
    (m,) = env.meta.tablets(info.id)
    m = add_files(env, m.extent, [write_file(env.storage, info.id, [b"a", b"b"], deleted=True)])
    core = env.core()
    plan_all(core, m)
    job = core.next_job("q", "c1", None, "e1")
    result = compact_as_compactor(env.storage, job)
    assert result["entries_written"] == 0
    finish(core, "e1", "c1", result)
    assert tablet(env, m.extent).files == ()
    assert not env.storage.exists(job["tmp_path"])
    assert not env.storage.exists(job["output_path"])


def test_same_ecid_asked_twice_gets_the_same_job(env: Env) -> None:
    _, (m,) = table_with_files(env)
    core = env.core()
    plan_all(core, m)
    first = core.next_job("q", "c1", None, "e1")
    again = core.next_job("q", "c1", None, "e1")
    assert again == first
    assert list(tablet(env, m.extent).compactions) == ["e1"]
    assert core.next_job("q", "c2", None, "e1") is None  # another compactor: no


def test_queue_order_and_table_properties(env: Env) -> None:
    tid, metas = table_with_files(env, splits=(b"m",))
    env.meta.set_table_properties(
        tid,
        {
            "table.versions": "3",
            "table.file.compress.type": "snappy",
            "table.iterator.majc.ageoff": "10,lithify.compaction.iterators:AgeOffFilter",
            "table.iterator.majc.ageoff.opt.ttl": "1000",
        },
    )
    core = env.core()
    plan_all(core, metas[0], priority=1)
    plan_all(core, metas[1], priority=9)
    job = core.next_job("q", "c1", None, "e1")
    assert extent_from_json(job["extent"]) == metas[1].extent
    assert job["versions"] == 3 and job["compression"] == "snappy"
    assert job["iterators"] == [["lithify.compaction.iterators:AgeOffFilter", {"ttl": "1000"}]]
    assert extent_from_json(core.next_job("q", "c2", None, "e2")["extent"]) == metas[0].extent
    assert core.next_job("q", "c3", None, "e3") is None


def test_stale_job_is_dropped_and_the_next_tried(env: Env) -> None:
    _, metas = table_with_files(env, splits=(b"m",))
    core = env.core()
    plan_all(core, metas[0], priority=9)
    plan_all(core, metas[1], priority=1)
    # The tablet changed after planning: one of the planned files is gone.
    env.meta.mutate_tablet(metas[0].extent, lambda m: m.replace(files=m.files[1:]))
    job = core.next_job("q", "c1", None, "e1")
    assert extent_from_json(job["extent"]) == metas[1].extent
    assert tablet(env, metas[0].extent).compactions == {}
    assert core.metrics().stale_dropped == 1
    assert core.queue_depth("q") == 0


def test_reserved_files_cannot_be_reserved_twice(env: Env) -> None:
    _, (m,) = table_with_files(env)
    core = env.core()
    plan_all(core, m)
    assert core.next_job("q", "c1", None, "e1") is not None
    plan_all(core, m)  # a plan naming files already reserved (a racing tablet server)
    assert core.next_job("q", "c2", None, "e2") is None
    assert list(tablet(env, m.extent).compactions) == ["e1"]


def test_system_job_cannot_take_files_selected_by_a_user_compaction(env: Env) -> None:
    _, (m,) = table_with_files(env)
    sel = {"id": "u1", "files": [f.to_json() for f in m.files], "outputs": [], "hints": {}}
    m = env.meta.mutate_tablet(m.extent, lambda t: t.replace(selection=sel))
    core = env.core()
    plan_all(core, m, kind="SYSTEM")
    assert core.next_job("q", "c1", None, "e1") is None
    assert tablet(env, m.extent).compactions == {}


def test_user_compaction_job_and_selection_update(env: Env) -> None:
    _, (m,) = table_with_files(env)
    sel = {
        "id": "u1",
        "files": [f.to_json() for f in m.files],
        "outputs": [],
        "hints": {},
        "iterators": [["lithify.compaction.iterators:AgeOffFilter", {"ttl": "5"}]],
    }
    m = env.meta.mutate_tablet(m.extent, lambda t: t.replace(selection=sel))
    core = env.core()
    plan_all(core, m, kind="USER", priority=100)
    job = core.next_job("q", "c1", None, "e1")
    assert job["kind"] == "USER"
    assert job["iterators"] == [["lithify.compaction.iterators:AgeOffFilter", {"ttl": "5"}]]
    assert tablet(env, m.extent).compactions["e1"]["selection_id"] == "u1"
    job["iterators"] = []  # keep every entry for the count below (the filter is tested elsewhere)
    finish(core, "e1", "c1", compact_as_compactor(env.storage, job))
    after = tablet(env, m.extent)
    assert [f.path for f in after.files] == [job["output_path"]]
    assert after.selection is None  # one file written by the user compaction: done


def test_failed_deletes_the_temporary_and_frees_the_files(env: Env) -> None:
    _, (m,) = table_with_files(env)
    core = env.core()
    plan_all(core, m)
    job = core.next_job("q", "c1", None, "e1")
    compact_as_compactor(env.storage, job)
    assert env.storage.exists(job["tmp_path"])
    core.failed("e1", "c1", "FAILED", "disk full")
    after = tablet(env, m.extent)
    assert after.compactions == {} and after.files == m.files
    assert not env.storage.exists(job["tmp_path"])
    assert env.refreshed == [m.extent]
    assert core.metrics().failed == 1
    core.failed("e1", "c1", "FAILED", "again")  # repeated: harmless
    assert core.metrics().failed == 1
    plan_all(core, m)
    assert core.next_job("q", "c2", None, "e2") is not None  # candidates again


def test_plan_refuses_internal_executors(env: Env) -> None:
    _, (m,) = table_with_files(env)
    core = env.core()
    with pytest.raises(ValueError):
        core.plan(m.extent, [PlannedJob(m.files, "i.default.small", 1, "SYSTEM")])
    job = planned_job_from_json(
        {"files": [f.to_json() for f in m.files], "executor": "e.q", "priority": 3}
    )
    assert job.kind == "SYSTEM" and job.queue == "q"


def test_cancel_drops_queued_and_flags_running(env: Env) -> None:
    tid, metas = table_with_files(env, splits=(b"m",))
    core = env.core()
    plan_all(core, metas[0])
    job = core.next_job("q", "c1", None, "e1")
    plan_all(core, metas[1])
    assert core.cancel(tid, None, None) == 2
    assert core.queue_depth("q") == 0
    assert core.status("e1", "c1", "IN_PROGRESS") is True
    core.failed("e1", "c1", "CANCELLED", "")
    assert tablet(env, metas[0].extent).compactions == {}
    assert not env.storage.exists(job["tmp_path"])
    assert core.metrics().cancelled == 1
    assert core.cancel("other-table", None, None) == 0


# ---------------------------------------------------------------------- leases and crashes


def test_deposed_coordinator_cannot_reserve(env: Env) -> None:
    _, (m,) = table_with_files(env)
    core = env.core()
    plan_all(core, m)
    env.take_lease("http://coordinator-b")
    with pytest.raises(LeaseLostError):
        core.next_job("q", "c1", None, "e1")
    assert tablet(env, m.extent).compactions == {}
    assert not core.active
    with pytest.raises(LeaseLostError):
        core.status("e1", "c1", "STARTED")


def test_deposed_coordinator_cannot_commit_and_leaves_no_partial_state(env: Env) -> None:
    _, (m,) = table_with_files(env)
    old = env.core()
    plan_all(old, m)
    job = old.next_job("q", "c1", None, "e1")
    result = compact_as_compactor(env.storage, job)
    new_epoch = env.take_lease("http://coordinator-b")
    with pytest.raises(LeaseLostError):
        finish(old, "e1", "c1", result)
    assert env.meta.final_states() == []
    assert env.storage.exists(job["tmp_path"])
    assert not env.storage.exists(job["output_path"])
    assert list(tablet(env, m.extent).compactions) == ["e1"]
    # The compactor retries at the new coordinator, which adopted the record.
    new = env.core(new_epoch)
    assert new.rebuild().adopted == 1
    finish(new, "e1", "c1", result)
    assert [f.path for f in tablet(env, m.extent).files] == [job["output_path"]]


def test_crash_between_final_state_and_commit_commits_once(env: Env) -> None:
    _, (m,) = table_with_files(env)
    old = env.core()
    plan_all(old, m)
    job = old.next_job("q", "c1", None, "e1")
    result = compact_as_compactor(env.storage, job)
    old.record_final_state("e1", result)  # ... and the process dies here
    (fs,) = env.meta.final_states()
    assert (fs.ecid, fs.state, fs.data["tmp_path"]) == ("e1", "FINISHED", job["tmp_path"])
    assert job["tmp_path"] in env.meta.referenced_files()

    new = env.core(env.take_lease("http://coordinator-b"))
    report = new.rebuild()
    assert (report.committed, report.adopted) == (1, 0)
    after = tablet(env, m.extent)
    assert [f.path for f in after.files] == [job["output_path"]]
    assert after.compactions == {}
    assert env.meta.final_states() == []
    # The compactor's retried report, and a second rebuild, change nothing.
    finish(new, "e1", "c1", result)
    assert new.rebuild().committed == 0
    assert tablet(env, m.extent) == after
    assert count_entries(env.storage, job["output_path"]) == 15


def test_crash_after_rename_commits_once(env: Env) -> None:
    _, (m,) = table_with_files(env)
    old = env.core()
    plan_all(old, m)
    job = old.next_job("q", "c1", None, "e1")
    result = compact_as_compactor(env.storage, job)
    old.record_final_state("e1", result)
    env.storage.rename(job["tmp_path"], job["output_path"])  # step 2 done, then the crash
    new = env.core(env.take_lease("http://coordinator-b"))
    assert new.rebuild().committed == 1
    assert [f.path for f in tablet(env, m.extent).files] == [job["output_path"]]


def test_crash_after_commit_before_forgetting_keeps_the_output(env: Env) -> None:
    _, (m,) = table_with_files(env)
    old = env.core()
    plan_all(old, m)
    job = old.next_job("q", "c1", None, "e1")
    result = compact_as_compactor(env.storage, job)
    data = old.record_final_state("e1", result)
    finish(old, "e1", "c1", result)
    after = tablet(env, m.extent)
    # As if the process died between the commit and delete_final_state.
    env.meta.put_final_state("e1", m.extent.table_id, m.extent, "FINISHED", data)
    new = env.core(env.take_lease("http://coordinator-b"))
    new.rebuild()
    assert tablet(env, m.extent) == after
    assert env.storage.exists(job["output_path"])
    assert env.meta.final_states() == []


def test_finished_on_a_core_closed_before_its_commit_is_refused(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process stepped down and took the lease again (same epoch) while a `finished`
    report waited: its successor rebuilt before the final state was written, so this core must
    not acknowledge a commit it will not run; the compactor retries at the successor."""
    _, (m,) = table_with_files(env)
    old = env.core()
    plan_all(old, m)
    job = old.next_job("q", "c1", None, "e1")
    result = compact_as_compactor(env.storage, job)
    holder = env.meta.lease_info(LEASE).holder
    real = old._committer.put_final_state
    successors: list[CompactionCoordinator] = []

    def closed_meanwhile(*args: Any) -> None:
        old.close()
        new = env.core(env.meta.acquire_lease(LEASE, holder, 60.0))
        assert new.rebuild().adopted == 1
        successors.append(new)
        real(*args)

    monkeypatch.setattr(old._committer, "put_final_state", closed_meanwhile)
    with pytest.raises(NotActiveError):
        old.finished("e1", "c1", result)
    (new,) = successors
    finish(new, "e1", "c1", result)
    assert [f.path for f in tablet(env, m.extent).files] == [job["output_path"]]
    assert env.meta.final_states() == []


def test_a_deposed_release_keeps_the_temporary_file(env: Env) -> None:
    """The fenced write comes before the delete: a deposed coordinator must not delete an
    output its successor may be committing."""
    _, (m,) = table_with_files(env)
    core = env.core()
    plan_all(core, m)
    job = core.next_job("q", "c1", None, "e1")
    compact_as_compactor(env.storage, job)
    env.meta.put_final_state("e1", m.extent.table_id, m.extent, "FAILED", dict(job))

    def lease_lost(fn: Any) -> Any:
        raise LeaseLostError("deposed")

    deposed = Committer(env.meta, env.storage, core.fence, lease_lost)
    with pytest.raises(LeaseLostError):
        deposed.release(m.extent, "e1", job["tmp_path"])
    assert env.storage.exists(job["tmp_path"])
    (fs,) = env.meta.final_states()
    with pytest.raises(LeaseLostError):
        deposed.recover(fs)
    assert env.storage.exists(job["tmp_path"])
    assert list(tablet(env, m.extent).compactions) == ["e1"]


def test_rebuild_goes_on_past_a_final_state_it_cannot_recover(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    metas = [table_with_files(env, name)[1][0] for name in ("t1", "t2")]
    old = env.core()
    jobs, results = [], []
    for i, m in enumerate(metas):
        plan_all(old, m)
        jobs.append(old.next_job("q", "c1", None, f"e{i}"))
        results.append(compact_as_compactor(env.storage, jobs[-1]))
        old.record_final_state(f"e{i}", results[-1])  # ... and the process dies
    new = env.core(env.take_lease("http://coordinator-b"))
    real = new._committer.recover

    def broken_once(fs: FinalState) -> bool:
        if fs.ecid == "e1":
            raise OSError("storage hiccup")
        return real(fs)

    monkeypatch.setattr(new._committer, "recover", broken_once)
    report = new.rebuild()
    assert (report.committed, report.failed) == (1, 1)
    new.finished("e1", "c1", results[1])  # the compactor's retry: acknowledged
    assert new.drain_commits(30)  # the background committer retried it
    for m, job in zip(metas, jobs, strict=True):
        assert [f.path for f in tablet(env, m.extent).files] == [job["output_path"]]
    assert env.meta.final_states() == []
    assert new.metrics().completed == 1


def test_rebuild_adopts_external_records_only(env: Env) -> None:
    _, (m,) = table_with_files(env)
    old = env.core()
    plan_all(old, m, files=m.files[:1])
    old.next_job("q", "c1", "http://127.0.0.1:9", "e1")
    internal = {"kind": "SYSTEM", "executor": "i.default.small", "inputs": [m.files[2].to_json()]}
    internal |= {"tmp_path": "tables/x/C1.parquet_tmp_i1", "output_path": "tables/x/C1.parquet"}
    env.meta.mutate_tablet(
        m.extent, lambda t: t.replace(compactions={**t.compactions, "i1": internal})
    )
    new = env.core(env.take_lease("http://coordinator-b"))
    assert new.rebuild().adopted == 1
    assert new.running_ecids() == {"e1"}
    # Adopted compactions are treated as just heard from: not dead at once.
    assert new.check().dead == []
    assert new.status("e1", "c1", "IN_PROGRESS", 10, 5) is False


# ---------------------------------------------------------------------- failure detection


def test_dead_compactor_is_failed_and_its_files_freed(env: Env) -> None:
    _, (m,) = table_with_files(env)
    core = env.core()
    plan_all(core, m)
    job = core.next_job("q", "c1", "http://compactor-1", "e1")
    compact_as_compactor(env.storage, job)  # it wrote its temporary file, then died
    for _ in range(5):
        env.clock.advance(1.0)
        assert core.status("e1", "c1", "IN_PROGRESS") is False
    env.clock.advance(2.0)
    assert core.check().dead == []  # a bit late is not dead
    assert env.asked == []
    env.clock.advance(10.0)
    report = core.check()
    assert report.dead == ["e1"]
    assert env.asked == ["http://compactor-1"]
    after = tablet(env, m.extent)
    assert after.compactions == {} and after.files == m.files
    assert not env.storage.exists(job["tmp_path"])
    assert core.metrics().failed == 1
    assert core.status("e1", "c1", "IN_PROGRESS") is True  # if it comes back: stop
    plan_all(core, m)
    assert core.next_job("q", "c2", "http://compactor-2", "e2") is not None
    # It was only partitioned away and finishes after all: its result is nobody's.
    result = compact_as_compactor(env.storage, job)
    finish(core, "e1", "c1", result)
    assert not env.storage.exists(job["tmp_path"])
    assert not env.storage.exists(job["output_path"])
    assert {f.path for f in tablet(env, m.extent).files} == {f.path for f in m.files}


def test_silent_compactor_that_still_runs_the_ecid_is_kept(env: Env) -> None:
    _, (m,) = table_with_files(env)
    core = env.core()
    plan_all(core, m)
    core.next_job("q", "c1", "http://compactor-1", "e1")
    env.running_on_compactor["http://compactor-1"] = "e1"
    env.clock.advance(60.0)
    assert core.check().dead == []
    assert env.asked == ["http://compactor-1"]
    assert core.running_ecids() == {"e1"}
    env.running_on_compactor["http://compactor-1"] = "something-else"
    assert core.check().dead == ["e1"]


def test_vanished_record_cancels_on_next_status(env: Env) -> None:
    tid, (m,) = table_with_files(env)
    core = env.core()
    plan_all(core, m)
    job = core.next_job("q", "c1", "http://compactor-1", "e1")
    # The tablet server splits the tablet: the children carry the files, not the record.
    cur = tablet(env, m.extent)
    left = TabletMeta(Extent(tid, None, b"m"), files=cur.files)
    right = TabletMeta(Extent(tid, b"m", None), files=cur.files)
    env.meta.replace_tablets(tid, [cur], [left, right])
    assert core.status("e1", "c1", "IN_PROGRESS") is False  # not checked yet
    assert core.check().cancelled == ["e1"]
    assert core.status("e1", "c1", "IN_PROGRESS") is True
    compact_as_compactor(env.storage, job)
    core.failed("e1", "c1", "CANCELLED", "told to stop")
    assert not env.storage.exists(job["tmp_path"])
    assert core.metrics().cancelled == 1


def test_finished_after_the_record_vanished_deletes_the_output(env: Env) -> None:
    tid, (m,) = table_with_files(env)
    core = env.core()
    plan_all(core, m)
    job = core.next_job("q", "c1", None, "e1")
    result = compact_as_compactor(env.storage, job)
    env.meta.delete_table(tid)
    finish(core, "e1", "c1", result)
    assert not env.storage.exists(job["output_path"])
    assert not env.storage.exists(job["tmp_path"])
    assert env.meta.final_states() == []
    assert core.metrics().cancelled == 1


def test_a_cancelled_user_compactions_output_joins_a_newer_selection(env: Env) -> None:
    """User compaction u1 is cancelled while its compaction runs, and u2 selects the same
    files: u1's output was written without u2's iterators, so u2 must still rewrite it."""
    _, (m,) = table_with_files(env)
    sel = {"id": "u1", "files": [f.to_json() for f in m.files], "outputs": [], "hints": {}}
    m = env.meta.mutate_tablet(m.extent, lambda t: t.replace(selection=sel))
    core = env.core()
    plan_all(core, m, kind="USER")
    job = core.next_job("q", "c1", None, "e1")
    env.meta.mutate_tablet(m.extent, lambda t: t.replace(selection={**sel, "id": "u2"}))
    finish(core, "e1", "c1", compact_as_compactor(env.storage, job))
    after = tablet(env, m.extent)
    assert [f.path for f in after.files] == [job["output_path"]]
    assert after.selection is not None and after.selection["id"] == "u2"
    assert [FileRef.from_json(x) for x in after.selection["files"]] == list(after.files)
    assert after.selection["outputs"] == []


def test_commit_mutation_counts_user_outputs_of_the_current_selection_only() -> None:
    f1, f2, out = (FileRef(f"tables/t/{n}.parquet", 10, 1) for n in ("F1", "F2", "C3"))
    sel = {"id": "u2", "files": [f1.to_json(), f2.to_json()], "outputs": [], "hints": {}}
    rec = {"ecid": "e1", "kind": "USER", "inputs": [f1.to_json(), f2.to_json()]}
    m = TabletMeta(Extent("t", None, None), files=(f1, f2), selection=sel)
    stale = commit_mutation("e1", out)(m.replace(compactions={"e1": {**rec, "selection_id": "u1"}}))
    assert stale is not None and stale.selection == {**sel, "files": [out.to_json()]}
    current = commit_mutation("e1", out)(
        m.replace(compactions={"e1": {**rec, "selection_id": "u2"}})
    )
    assert current is not None and current.selection is None


def test_dropped_user_selection_cancels(env: Env) -> None:
    _, (m,) = table_with_files(env)
    sel = {"id": "u1", "files": [f.to_json() for f in m.files], "outputs": [], "hints": {}}
    m = env.meta.mutate_tablet(m.extent, lambda t: t.replace(selection=sel))
    core = env.core()
    plan_all(core, m, kind="USER")
    core.next_job("q", "c1", None, "e1")
    env.meta.mutate_tablet(m.extent, lambda t: t.replace(selection=None))
    assert core.check().cancelled == ["e1"]
    assert core.status("e1", "c1", "IN_PROGRESS") is True


def test_unknown_ecid_is_told_to_stop(env: Env) -> None:
    table_with_files(env)
    core = env.core()
    assert core.status("nobody-knows", "c9", "IN_PROGRESS") is True
    finish(core, "nobody-knows", "c9", {"entries_written": 5})  # harmless
    core.failed("nobody-knows", "c9", "FAILED", "")


def test_unknown_but_recorded_ecid_is_adopted(env: Env) -> None:
    _, (m,) = table_with_files(env)
    old = env.core()
    plan_all(old, m)
    job = old.next_job("q", "c1", None, "e1")
    other = env.core()  # same epoch, no rebuild: knows nothing of e1
    assert other.status("e1", "c1", "IN_PROGRESS") is False
    finish(other, "e1", "c1", compact_as_compactor(env.storage, job))
    assert [f.path for f in tablet(env, m.extent).files] == [job["output_path"]]


def test_concurrent_finished_reports_commit_once(env: Env) -> None:
    _, (m,) = table_with_files(env)
    core = env.core()
    plan_all(core, m)
    job = core.next_job("q", "c1", None, "e1")
    result = compact_as_compactor(env.storage, job)
    errors: list[BaseException] = []

    def report() -> None:
        try:
            core.finished("e1", "c1", result)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=report) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert core.drain_commits(30)
    assert [f.path for f in tablet(env, m.extent).files] == [job["output_path"]]
    assert core.metrics().completed == 1


def gate_commits(core: CompactionCoordinator, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold every background commit of `core` until the returned event is set."""
    gate = threading.Event()
    real = core._committer.commit

    def held(ecid: str, extent: Extent, data: dict[str, Any]) -> str:
        assert gate.wait(30)
        return real(ecid, extent, data)

    monkeypatch.setattr(core._committer, "commit", held)
    return gate


def test_finished_answers_once_the_final_state_is_recorded(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    tid, (m,) = table_with_files(env)
    core = env.core()
    plan_all(core, m)
    job = core.next_job("q", "c1", "http://compactor-1", "e1")
    result = compact_as_compactor(env.storage, job)
    gate = gate_commits(core, monkeypatch)
    core.finished("e1", "c1", result)  # answered while the commit waits
    assert [fs.ecid for fs in env.meta.final_states()] == ["e1"]
    assert list(tablet(env, m.extent).compactions) == ["e1"]
    # Pending: a repeated report changes nothing; the compactor's silence is not death, and
    # neither a cancellation nor a late failure report undoes the decision.
    core.finished("e1", "c1", result)
    env.clock.advance(60.0)
    assert core.check().dead == [] and env.asked == []
    assert core.cancel(tid, None, None) == 0
    core.failed("e1", "c1", "FAILED", "late")
    assert (core.metrics().running, core.metrics().completed) == (1, 0)
    assert core.running()[0]["state"] == "COMMITTING"
    gate.set()
    assert core.drain_commits(30)
    after = tablet(env, m.extent)
    assert [f.path for f in after.files] == [job["output_path"]] and after.compactions == {}
    assert env.meta.final_states() == [] and env.refreshed == [m.extent]
    metrics = core.metrics()
    assert (metrics.running, metrics.completed, metrics.failed, metrics.cancelled) == (0, 1, 0, 0)


def test_a_failed_background_commit_is_retried(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lithify.coordinator.commit.RETRY_MIN_S", 0.05)
    _, (m,) = table_with_files(env)
    core = env.core()
    plan_all(core, m)
    job = core.next_job("q", "c1", None, "e1")
    real = core._committer.commit
    failures = [OSError("storage hiccup")]

    def flaky(ecid: str, extent: Extent, data: dict[str, Any]) -> str:
        if failures:
            raise failures.pop()
        return real(ecid, extent, data)

    monkeypatch.setattr(core._committer, "commit", flaky)
    finish(core, "e1", "c1", compact_as_compactor(env.storage, job))
    assert not failures
    assert [f.path for f in tablet(env, m.extent).files] == [job["output_path"]]
    assert env.meta.final_states() == [] and core.metrics().completed == 1


def test_a_deposed_coordinators_pending_commit_is_left_to_its_successor(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, (m,) = table_with_files(env)
    old = env.core()
    plan_all(old, m)
    job = old.next_job("q", "c1", None, "e1")
    result = compact_as_compactor(env.storage, job)
    gate = gate_commits(old, monkeypatch)
    old.finished("e1", "c1", result)
    new = env.core(env.take_lease("http://coordinator-b"))
    gate.set()
    assert old.drain_commits(30)
    assert not old.active and old.metrics().completed == 0
    assert [fs.ecid for fs in env.meta.final_states()] == ["e1"]  # fenced: no commit
    assert list(tablet(env, m.extent).compactions) == ["e1"]
    assert new.rebuild().committed == 1
    assert [f.path for f in tablet(env, m.extent).files] == [job["output_path"]]
    assert env.meta.final_states() == [] and tablet(env, m.extent).compactions == {}


def test_close_lets_pending_commits_finish(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    _, (m,) = table_with_files(env)
    core = env.core()
    plan_all(core, m)
    job = core.next_job("q", "c1", None, "e1")
    gate = gate_commits(core, monkeypatch)
    core.finished("e1", "c1", compact_as_compactor(env.storage, job))
    threading.Timer(0.2, gate.set).start()
    core.close()
    assert [f.path for f in tablet(env, m.extent).files] == [job["output_path"]]
    assert env.meta.final_states() == []


def test_metrics_snapshot(env: Env) -> None:
    _, metas = table_with_files(env, splits=(b"m",))
    core = env.core()
    plan_all(core, metas[0], queue="a")
    plan_all(core, metas[1], queue="b")
    env.clock.advance(3.0)
    core.next_job("a", "c1", None, "e1")
    m = core.metrics()
    assert m.active and m.running == 1 and m.running_by_queue == {"a": 1}
    assert m.queues["a"].dequeued == 1 and m.queues["b"].depth == 1
    assert m.queues["b"].oldest_age_s == pytest.approx(3.0)
    assert m.compactors_seen == 1
    assert core.running()[0]["ecid"] == "e1"


def test_config_from_properties() -> None:
    cfg = CoordinatorConfig.from_properties(
        {"coordinator.phi.threshold": "12", "coordinator.lease.ttl": "9s"}, queue_max=7
    )
    assert (cfg.phi_threshold, cfg.lease_ttl_s, cfg.queue_max) == (12.0, 9.0, 7)
    assert cfg.phi_min_std_s == 0.5 and cfg.check_interval_s == 1.0


# ---------------------------------------------------------------------- async requests


class FakeTserver:
    """Stands in for the tablet server process: records calls; `compact` selects like it."""

    def __init__(self, meta: MetadataStore, *, fail: bool = False) -> None:
        self.meta = meta
        self.fail = fail
        self.calls: list[tuple] = []

    def compact(self, table, start, end, iterators, hints, request_id) -> str | None:
        self.calls.append(("compact", table, start, end, list(iterators), dict(hints)))
        if self.fail:
            raise LithifyError("tablet server says no")
        info = self.meta.get_table(table)
        for m in self.meta.tablets(info.id):
            if m.files:
                sel = {"id": "ts-" + request_id[:8], "files": [f.to_json() for f in m.files]}
                self.meta.mutate_tablet(m.extent, lambda t, s=sel: t.replace(selection=s))
        return "ts-" + request_id[:8]

    def flush(self, table: str) -> None:
        self.calls.append(("flush", table))

    def cancel_compaction(self, table: str) -> None:
        self.calls.append(("cancel", table))
        info = self.meta.get_table(table)
        for m in self.meta.tablets(info.id):
            self.meta.mutate_tablet(m.extent, lambda t: t.replace(selection=None))


def wait_for(fn, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


def compact_body(**kw: Any) -> dict[str, Any]:
    body = {
        "op": "compact",
        "table": "t",
        "start": None,
        "end": None,
        "iterators": [],
        "hints": {"compaction_type": "big"},
        "client": "client-1",
        "nonce": "n1",
        "cancel_on_client_loss": False,
    }
    body.update(kw)
    return body


def test_request_submit_is_idempotent_and_finishes_from_metadata(env: Env) -> None:
    tid, metas = table_with_files(env, splits=(b"m",))
    ts = FakeTserver(env.meta)
    core = env.core(tserver=ts)
    rid, tick = core.submit_request(compact_body())
    assert (rid, tick) == (request_id(compact_body()), 1.0)
    assert core.submit_request(compact_body())[0] == rid
    assert request_id(compact_body(nonce="n2")) != rid
    wait_for(lambda: core.request_status(rid)["progress"]["selection_made"])
    calls = [c for c in ts.calls if c[0] == "compact"]
    assert len(calls) == 1  # the retry did not start a second compaction
    assert calls[0][1:] == ("t", None, None, [], {"compaction_type": "big"})
    st = core.request_status(rid)
    assert st["state"] == "RUNNING" and st["progress"]["tablets_pending"] == 2
    # Passes commit (as the coordinator would); when no selection is left, it is finished.
    for m in metas:
        env.meta.mutate_tablet(m.extent, lambda t: t.replace(selection=None))
    assert core.request_status(rid)["state"] == "FINISHED"
    assert core.request_status("no-such-id")["state"] == NOT_SUBMITTED
    assert core.cancel_request("no-such-id")["state"] == NOT_SUBMITTED


def test_request_finishes_when_its_passes_commit(env: Env) -> None:
    _, (m,) = table_with_files(env)
    core = env.core(tserver=FakeTserver(env.meta))
    rid, _ = core.submit_request(compact_body())
    wait_for(lambda: core.request_status(rid)["progress"]["selection_made"])
    m = tablet(env, m.extent)
    plan_all(core, m, kind="USER", priority=100)
    job = core.next_job("q", "c1", None, "e1")
    finish(core, "e1", "c1", compact_as_compactor(env.storage, job))
    st = core.request_status(rid)
    assert st["state"] == "FINISHED"
    p = st["progress"]
    assert (p["selected"], p["tablets_total"], p["tablets_pending"]) == (3, 1, 0)
    assert p["entries_written"] == 15 and p["bytes_written"] > 0


def test_request_cancel(env: Env) -> None:
    table_with_files(env)
    ts = FakeTserver(env.meta)
    core = env.core(tserver=ts)
    rid, _ = core.submit_request(compact_body())
    wait_for(lambda: core.request_status(rid)["progress"]["selection_made"])
    assert core.cancel_request(rid)["state"] == "CANCELLED"
    wait_for(lambda: ("cancel", "t") in ts.calls)
    assert core.request_status(rid)["state"] == "CANCELLED"


def test_request_cancelled_when_its_client_stops_polling(env: Env) -> None:
    table_with_files(env, "t")
    table_with_files(env, "u")
    ts = FakeTserver(env.meta)
    core = env.core(tserver=ts)
    keep, _ = core.submit_request(compact_body(cancel_on_client_loss=True, table="t"))
    lose, _ = core.submit_request(compact_body(cancel_on_client_loss=True, table="u"))
    wait_for(lambda: core.request_status(lose)["progress"]["selection_made"])
    wait_for(lambda: core.request_status(keep)["progress"]["selection_made"])
    for _ in range(10):
        env.clock.advance(1.0)
        core.request_status(keep)  # this client keeps polling every tick
        core.check()
    assert core.request_status(lose)["state"] == "CANCELLED"
    assert core.request_status(keep)["state"] == "RUNNING"
    wait_for(lambda: ("cancel", "u") in ts.calls)
    assert ("cancel", "t") not in ts.calls


def test_flush_request_and_failures(env: Env) -> None:
    table_with_files(env)
    ts = FakeTserver(env.meta)
    core = env.core(tserver=ts)
    rid, _ = core.submit_request(compact_body(op="flush"))
    assert wait_for(lambda: core.request_status(rid)["state"] == "FINISHED")
    assert ("flush", "t") in ts.calls
    failing = env.core(tserver=FakeTserver(env.meta, fail=True))
    rid2, _ = failing.submit_request(compact_body())
    wait_for(lambda: failing.request_status(rid2)["state"] == "FAILED")
    assert "says no" in failing.request_status(rid2)["progress"]["error"]
    with pytest.raises(ValueError):
        core.submit_request(compact_body(op="scan"))
    with pytest.raises(LithifyError):
        core.submit_request(compact_body(table="missing"))


def test_extent_json_round_trip() -> None:
    for e in (Extent("t", None, None), Extent("t", b"\x00a", b"\xffz"), Extent("1", None, b"m")):
        assert extent_from_json(extent_to_json(e)) == e
