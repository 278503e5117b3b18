"""Group commit of conditional updates: `MetadataStore.update_tablets` / `mutate_tablets` and the
coordinator's batched reservations (`CompactionCoordinator.next_jobs`), on every backend the
`metadata_url` fixture provides (SQLite always, PostgreSQL with LITHIFY_TEST_PG_DSN).

What must hold for a batch is what holds for one update: each item wins or loses on its own
version check, a loser changes nothing, a lost lease writes nothing at all, and the winners are
committed (durable) before anyone is told.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from lithify.coordinator.core import CompactionCoordinator
from lithify.coordinator.queues import PlannedJob
from lithify.coordinator.reserve import JobRequest
from lithify.data.ranges import Extent, FileRef
from lithify.errors import ConditionalUpdateError
from lithify.files.storage import Storage
from lithify.metadata.store import LeaseLostError, MetadataStore, TabletMeta
from lithify.rpc.wire import extent_from_json
from lithify.tablet import reservation

LEASE = "coordinator"


@pytest.fixture
def store(metadata_url: str) -> Iterator[MetadataStore]:
    s = MetadataStore.open(metadata_url)
    try:
        yield s
    finally:
        s.close()


def write_commits(store: MetadataStore) -> list[int]:
    """A counter of committed write transactions (the store's writer connections)."""
    counter = [0]

    def on_commit(conn: Any) -> None:
        if conn.get_execution_options().get("lithify_write"):
            counter[0] += 1

    event.listen(store._engine, "commit", on_commit)
    return counter


def table(store: MetadataStore, tablets: int, files: int = 2, name: str = "t") -> list[TabletMeta]:
    """A table of `tablets` tablets, each with `files` (non-existent) files in its metadata."""
    info = store.create_table(name, splits=[b"r%03d" % i for i in range(1, tablets)])
    out = []
    for i, m in enumerate(store.tablets(info.id)):
        refs = tuple(
            FileRef(f"tables/{info.id}/F{i:03d}{k}.parquet", 100, 10) for k in range(files)
        )
        out.append(store.update_tablet(m, m.replace(files=refs)))
    return out


def bump(m: TabletMeta) -> TabletMeta:
    return m.replace(flushed_seq=m.flushed_seq + 1)


# ---------------------------------------------------------------------- the metadata store


def test_update_tablets_each_item_wins_or_loses_on_its_own(store: MetadataStore) -> None:
    a, b, c = table(store, 3)
    stale_b = b
    b = store.update_tablet(b, bump(b))  # someone else moved b on
    commits = write_commits(store)
    out = store.update_tablets(
        [(a, a.replace(logs=("x",))), (stale_b, stale_b.replace(logs=("y",))), (c, bump(c))]
    )
    assert commits[0] == 1  # one transaction for the lot
    assert out[1] is None
    assert out[0] is not None and out[0].version == a.version + 1 and out[0].logs == ("x",)
    assert out[2] is not None and out[2].version == c.version + 1
    assert store.get_tablets([a.extent, b.extent, c.extent]) == [out[0], b, out[2]]
    assert store.update_tablets([]) == []


def test_update_tablets_same_tablet_twice_chains_like_two_calls(store: MetadataStore) -> None:
    (a,) = table(store, 1)
    first = bump(a)
    second = first.replace(version=a.version + 1, flushed_seq=first.flushed_seq + 1)
    out = store.update_tablets([(a, first), (a, bump(a))])
    assert out[0] is not None and out[1] is None  # the same version read twice: one wins
    out = store.update_tablets([(out[0], second)])
    assert out[0] is not None and out[0].flushed_seq == 2


def test_update_tablets_fenced_writes_nothing_after_takeover(store: MetadataStore) -> None:
    a, b = table(store, 2)
    epoch = store.acquire_lease(LEASE, "old", 60.0)
    assert epoch is not None
    store.release_lease(LEASE, "old")
    assert store.acquire_lease(LEASE, "new", 60.0) == epoch + 1
    with pytest.raises(LeaseLostError):
        store.update_tablets([(a, bump(a)), (b, bump(b))], fence=(LEASE, epoch))
    assert store.get_tablets([a.extent, b.extent]) == [a, b]
    with pytest.raises(ValueError, match="extent"):
        store.update_tablets([(a, b)])


def test_get_tablets_keeps_order_and_reports_missing(store: MetadataStore) -> None:
    a, b = table(store, 2)
    missing = Extent(a.extent.table_id, b"zz", b"zzz")
    assert store.get_tablets([b.extent, missing, a.extent]) == [b, None, a]
    assert store.get_tablets([]) == []


def test_mutate_tablets_outcomes_per_item(store: MetadataStore) -> None:
    a, b, c, d = table(store, 4)
    gone = Extent(a.extent.table_id, b"zz", b"zzz")

    def refuse(m: TabletMeta) -> TabletMeta:
        raise reservation.ReservationError(f"no files to reserve in {m.extent}")

    commits = write_commits(store)
    items = [(a.extent, bump), (b.extent, refuse), (c.extent, lambda m: None), (gone, bump)]
    out = store.mutate_tablets([*items, (d.extent, bump)])
    assert commits[0] == 1
    assert out[0].meta is not None and out[0].meta.flushed_seq == 1 and out[0].error is None
    assert isinstance(out[1].error, reservation.ReservationError) and out[1].meta is None
    assert out[2].meta is None and out[2].error is None  # no change wanted
    assert out[3].meta is None and out[3].error is None  # no such tablet
    assert out[4].meta is not None and out[4].meta.flushed_seq == 1
    with pytest.raises(reservation.ReservationError):
        out[1].result()
    assert store.get_tablet(b.extent) == b and store.get_tablet(c.extent) == c


def test_mutate_tablets_retries_only_the_losers(store: MetadataStore) -> None:
    a, b, c = table(store, 3)
    calls = {a.extent: 0, b.extent: 0, c.extent: 0}

    def contended(m: TabletMeta) -> TabletMeta:
        calls[m.extent] += 1
        if m.extent == b.extent and calls[b.extent] == 1:
            store.update_tablet(m, m.replace(logs=("theirs",)))  # lose the first round
        return bump(m)

    def always_loses(m: TabletMeta) -> TabletMeta:
        calls[m.extent] += 1
        store.update_tablet(m, m.replace(flushed_seq=m.flushed_seq + 10))
        return m.replace(logs=("mine",))

    out = store.mutate_tablets(
        [(a.extent, contended), (b.extent, contended), (c.extent, always_loses)],
        max_attempts=3,
        backoff=False,
    )
    assert calls == {a.extent: 1, b.extent: 2, c.extent: 3}
    assert out[0].meta is not None and out[0].meta.flushed_seq == 1
    assert out[1].meta is not None and out[1].meta.logs == ("theirs",)  # re-read, then won
    assert isinstance(out[2].error, ConditionalUpdateError)
    assert "3 conflicting" in str(out[2].error)
    assert store.get_tablet(c.extent).logs == ()  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        store.mutate_tablets([(a.extent, bump)], max_attempts=0)


def test_mutate_tablets_lost_lease_raises_for_all(store: MetadataStore) -> None:
    a, b = table(store, 2)
    epoch = store.acquire_lease(LEASE, "old", 60.0)
    assert epoch is not None
    store.release_lease(LEASE, "old")
    store.acquire_lease(LEASE, "new", 60.0)
    with pytest.raises(LeaseLostError):
        store.mutate_tablets([(a.extent, bump), (b.extent, bump)], fence=(LEASE, epoch))
    assert store.get_tablets([a.extent, b.extent]) == [a, b]


# ---------------------------------------------------------------------- batched reservations


@pytest.fixture
def core(store: MetadataStore, tmp_path: Path) -> Iterator[CompactionCoordinator]:
    epoch = store.acquire_lease(LEASE, "http://coordinator", 60.0)
    assert epoch is not None
    c = CompactionCoordinator(store, Storage(str(tmp_path / "data")), epoch)
    try:
        yield c
    finally:
        c.close()


def plan(core: CompactionCoordinator, metas: list[TabletMeta], priority: int = 5) -> None:
    for m in metas:
        assert core.plan(m.extent, [PlannedJob(m.files, "e.q", priority, "SYSTEM")]) == 1


def ask(ecid: str, compactor: str | None = None, queue: str = "q") -> JobRequest:
    return JobRequest(queue, compactor or f"c-{ecid}", None, ecid)


def test_next_jobs_reserves_a_batch_in_one_transaction(
    store: MetadataStore, core: CompactionCoordinator
) -> None:
    metas = table(store, 4)
    plan(core, metas)
    commits = write_commits(store)
    answers = core.next_jobs([ask(f"e{i}") for i in range(3)])
    assert commits[0] == 1  # group commit: three reservations, one write transaction
    assert all(isinstance(a, dict) for a in answers)
    extents = [extent_from_json(a["extent"]) for a in answers]  # type: ignore[index]
    assert len(set(extents)) == 3
    for i, (answer, extent) in enumerate(zip(answers, extents, strict=True)):
        assert answer["ecid"] == f"e{i}"  # type: ignore[index]
        rec = store.get_tablet(extent).compactions[f"e{i}"]  # type: ignore[union-attr]
        assert rec["compactor"] == f"c-e{i}"  # durable before the answer
    assert core.queue_depth("q") == 1
    rest = core.next_jobs([ask("e9"), ask("e10")])  # one job left for two requests
    assert isinstance(rest[0], dict) and rest[1] is None


def test_next_jobs_stale_item_moves_on_alone(
    store: MetadataStore, core: CompactionCoordinator
) -> None:
    metas = table(store, 3)
    plan(core, metas[:2], priority=9)  # taken first
    plan(core, metas[2:], priority=1)
    # The tablet server compacted the first tablet meanwhile: its queued job is stale.
    store.update_tablet(metas[0], metas[0].replace(files=metas[0].files[:1]))
    answers = core.next_jobs([ask("e1"), ask("e2")])
    got = sorted(extent_from_json(a["extent"]) for a in answers)  # type: ignore[index]
    assert got == sorted([metas[1].extent, metas[2].extent])
    assert core.metrics().stale_dropped == 1
    assert core.queue_depth("q") == 0


def test_next_jobs_answers_per_request(store: MetadataStore, core: CompactionCoordinator) -> None:
    metas = table(store, 2)
    plan(core, metas)
    first = core.next_job("q", "c1", None, "e1")
    assert first is not None
    answers = core.next_jobs(
        [
            ask("bad/ecid"),  # invalid: its own 422
            JobRequest("q", "c1", None, "e1"),  # a retry of a lost answer: the same job
            JobRequest("q", "other", None, "e1"),  # the same ECID from another compactor
            ask("e2"),
            JobRequest("q", "c-e2", None, "e2"),  # the same ECID twice in one batch
            ask("e3", queue="empty"),
        ]
    )
    assert isinstance(answers[0], ValueError)
    assert answers[1] == first
    assert answers[2] is None
    assert isinstance(answers[3], dict) and answers[4] == answers[3]
    assert answers[5] is None


def test_next_jobs_after_takeover_answers_lease_lost(
    store: MetadataStore, core: CompactionCoordinator
) -> None:
    metas = table(store, 2)
    plan(core, metas)
    store.release_lease(LEASE, "http://coordinator")
    store.acquire_lease(LEASE, "http://newer", 60.0)
    answers = core.next_jobs([ask("e1"), ask("e2")])
    assert all(isinstance(a, LeaseLostError) for a in answers)
    assert not core.active
    for m in metas:
        assert store.get_tablet(m.extent).compactions == {}  # type: ignore[union-attr]
