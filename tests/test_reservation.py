"""Reservation rules (SYSTEM.md 5.1): pure functions first, then a property test on a live store.

The pure tests pin the rules one by one: a file is reserved by at most one compaction and only
while the tablet has it, a commit swaps exactly the reserved inputs for the output once, a release
changes nothing but the record, and a user compaction's selection follows its outputs.

The property test runs system compactions (small flushes, ratio 2, maxOpen 3), direct
`compact_files` calls from threads, user compactions and cancellations against a stream of writes
and deletes, and checks what must hold whatever the interleaving: no file is input to two
committed compactions, deletes are dropped only by a compaction over all of a tablet's files, and
the final scan equals a model of the writes (nothing lost, nothing resurrected). The reservation
and commit functions are wrapped to record what each compaction reserved and committed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lithify
import lithify.tablet.reservation as reservation_module
from lithify import Mutation
from lithify.data.ranges import Extent, FileRef, RowRange
from lithify.errors import CompactionCancelledError
from lithify.metadata.store import TabletMeta
from lithify.tablet.compactions import selection_after_commit
from lithify.tablet.reservation import (
    ReservationError,
    commit,
    may_drop_deletes,
    release,
    reserve,
    reserved_files,
)
from tests.conftest import PG_DSN_ENV, _fresh_pg_database

EXT = Extent("t1", None, None)


def ref(name: str, size: int = 100, fence: RowRange | None = None) -> FileRef:
    return FileRef(f"tables/t1/{name}.parquet", size, 10, fence or RowRange())


F1, F2, F3, F4 = ref("F1"), ref("F2"), ref("F3"), ref("F4")


def meta(*files: FileRef, compactions: dict | None = None, selection: dict | None = None):
    return TabletMeta(EXT, files=files, compactions=compactions or {}, selection=selection)


# -- reserve ---------------------------------------------------------------------------------------


def test_reserve_records_inputs_and_leaves_the_original_alone() -> None:
    m = meta(F1, F2, F3)
    r = reserve(m, "c1", [F1, F2], {"kind": "SYSTEM", "propagate_deletes": True})
    assert m.compactions == {}
    rec = r.compactions["c1"]
    assert [FileRef.from_json(x) for x in rec["inputs"]] == [F1, F2]
    assert rec["kind"] == "SYSTEM" and rec["propagate_deletes"] is True
    assert isinstance(rec["started"], float)
    assert r.files == m.files
    assert reserved_files(r) == {F1, F2}


def test_reserve_refusals() -> None:
    m = reserve(meta(F1, F2, F3), "c1", [F1, F2], {})
    with pytest.raises(ReservationError, match="already recorded"):
        reserve(m, "c1", [F3], {})
    with pytest.raises(ReservationError, match="no input"):
        reserve(m, "c2", [], {})
    with pytest.raises(ReservationError, match="F4"):
        reserve(m, "c2", [F3, F4], {})
    with pytest.raises(ReservationError, match="F2"):
        reserve(m, "c2", [F2, F3], {})
    # A disjoint set is fine, and then both sets are reserved.
    both = reserve(m, "c2", [F3], {})
    assert reserved_files(both) == {F1, F2, F3}
    with pytest.raises(ReservationError):
        reserve(both, "c3", [F3], {})


def test_fenced_references_to_one_path_are_different_files() -> None:
    low = ref("S", fence=RowRange.rows(None, b"m"))
    high = ref("S", fence=RowRange(b"m", None, start_inclusive=False))
    m = reserve(meta(low, high), "c1", [low], {})
    assert reserved_files(m) == {low}
    assert set(reserve(m, "c2", [high], {}).compactions) == {"c1", "c2"}


def test_may_drop_deletes_only_for_all_files() -> None:
    m = meta(F1, F2, F3)
    assert may_drop_deletes(m, [F3, F1, F2])
    assert not may_drop_deletes(m, [F1, F2])
    assert not may_drop_deletes(m, [F1, F2, F3, F4])
    assert may_drop_deletes(meta(F1), [F1])


# -- commit and release ----------------------------------------------------------------------------


def test_commit_replaces_exactly_the_reserved_inputs() -> None:
    m = reserve(meta(F1, F2, F3), "c1", [F1, F2], {})
    m = reserve(m, "c2", [F3], {})
    new = m.replace(files=(*m.files, F4))  # a flush after the reservation
    out = ref("C9", 200)
    done = commit(new, "c1", out)
    assert set(done.files) == {F3, F4, out}
    assert set(done.compactions) == {"c2"}
    # Once: the record is gone, so a second commit of c1 is refused.
    with pytest.raises(ReservationError, match="c1"):
        commit(done, "c1", out)


def test_commit_of_empty_output_removes_inputs() -> None:
    m = reserve(meta(F1, F2, F3), "c1", [F1, F2], {})
    assert commit(m, "c1", None).files == (F3,)


def test_commit_unknown_compaction_refused() -> None:
    with pytest.raises(ReservationError, match="not running"):
        commit(meta(F1), "nope", ref("A1"))


def test_release_drops_only_the_record() -> None:
    m = reserve(meta(F1, F2), "c1", [F1], {})
    m = reserve(m, "c2", [F2], {})
    r = release(m, "c1")
    assert r is not None and r.files == m.files and set(r.compactions) == {"c2"}
    assert release(r, "c1") is None
    assert reserve(r, "c3", [F1], {}).compactions.keys() == {"c2", "c3"}


# -- selection after commit ------------------------------------------------------------------------


def selected(*files: FileRef, outputs: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "id": "u1",
        "files": [f.to_json() for f in files],
        "outputs": list(outputs),
        "hints": {},
        "iterators": [],
    }


def sel_files(sel: dict[str, Any]) -> set[FileRef]:
    return {FileRef.from_json(x) for x in sel["files"]}


def test_selection_none_stays_none() -> None:
    assert selection_after_commit(meta(F1, F2), {F1, F2}, ref("A1"), "u1") is None


def test_selection_untouched_by_unselected_inputs() -> None:
    sel = selected(F1, F2)
    m = meta(F1, F2, F3, F4, selection=sel)
    assert selection_after_commit(m, {F3, F4}, ref("C5"), None) == sel


def test_selection_partial_user_pass_continues_with_its_output() -> None:
    out = ref("C5", 300)
    m = meta(F1, F2, F3, selection=selected(F1, F2, F3))
    after = selection_after_commit(m, {F1, F2}, out, "u1")
    assert after is not None
    assert sel_files(after) == {F3, out} and after["outputs"] == [out.path]
    assert after["id"] == "u1"


def test_selection_ends_with_one_user_output() -> None:
    out = ref("A6", 300)
    m = meta(F1, F2, selection=selected(F1, F2))
    assert selection_after_commit(m, {F1, F2}, out, "u1") is None


def test_single_selected_file_must_still_be_rewritten() -> None:
    """One selected file that the user compaction did not write keeps the selection open, and
    once the user compaction rewrote it the selection ends."""
    m = meta(F1, selection=selected(F1))
    assert selection_after_commit(m, set(), None, "u1") == m.selection
    out = ref("A7")
    assert selection_after_commit(m, {F1}, out, "u1") is None


def test_selection_with_a_non_user_output_continues() -> None:
    out = ref("C8", 500)
    m = meta(F1, F2, selection=selected(F1, F2))
    after = selection_after_commit(m, {F1, F2}, out, None)
    assert after is not None and sel_files(after) == {out} and after["outputs"] == []


def test_selection_empty_output() -> None:
    m = meta(F1, F2, F3, selection=selected(F1, F2, F3))
    after = selection_after_commit(m, {F1, F2}, None, "u1")
    assert after is not None and sel_files(after) == {F3}
    assert selection_after_commit(m, {F1, F2, F3}, None, "u1") is None
    # The last remaining file is an earlier output of this user compaction: done.
    out = ref("C9")
    m2 = meta(out, F3, selection=selected(out, F3, outputs=(out.path,)))
    assert selection_after_commit(m2, {F3}, None, "u1") is None


def test_a_cancelled_selections_output_is_rewritten_by_a_newer_one() -> None:
    """Selection u1 was cancelled and u2 selected the same files while u1's compaction ran:
    its output is no output of u2, which goes on and rewrites it."""
    out = ref("A10", 300)
    m = meta(F1, F2, selection=selected(F1, F2))  # id u1
    newer = m.replace(selection={**m.selection, "id": "u2"})
    after = selection_after_commit(newer, {F1, F2}, out, "u1")
    assert after is not None and sel_files(after) == {out} and after["outputs"] == []


# -- property test on a live store -----------------------------------------------------------------

ROWS = 40
SPLITS = [b"r10", b"r20", b"r30"]
TIMEOUT_S = 20.0


@dataclass
class Observed:
    """What the wrapped reservation functions saw, keyed by compaction id."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    #: cid -> (extent, tablet files at the reservation, inputs, propagate_deletes)
    reserved: dict[str, tuple[Extent, frozenset[FileRef], frozenset[FileRef], bool]] = field(
        default_factory=dict
    )
    #: cid -> (extent, inputs, propagate_deletes) as recorded in the committed metadata
    committed: dict[str, tuple[Extent, frozenset[FileRef], bool]] = field(default_factory=dict)


CURRENT: dict[str, Observed] = {}


def _recording_reserve(m: TabletMeta, cid: str, inputs: Any, record: dict[str, Any]) -> TabletMeta:
    inputs = list(inputs)
    out = _REAL["reserve"](m, cid, inputs, record)
    obs = CURRENT.get("obs")
    if obs is not None:
        with obs.lock:
            # The last successful call is the one the conditional update is made against.
            obs.reserved[cid] = (
                m.extent,
                frozenset(m.files),
                frozenset(inputs),
                bool(record.get("propagate_deletes")),
            )
    return out


def _recording_commit(m: TabletMeta, cid: str, output: FileRef | None) -> TabletMeta:
    out = _REAL["commit"](m, cid, output)
    obs = CURRENT.get("obs")
    if obs is not None:
        rec = m.compactions[cid]
        with obs.lock:
            obs.committed[cid] = (
                m.extent,
                frozenset(FileRef.from_json(x) for x in rec["inputs"]),
                bool(rec.get("propagate_deletes")),
            )
    return out


_REAL: dict[str, Callable[..., Any]] = {
    "reserve": reservation_module.reserve,
    "commit": reservation_module.commit,
}

row_ids = st.lists(st.integers(0, ROWS - 1), min_size=1, max_size=8)
step = st.one_of(
    st.tuples(st.just("put"), row_ids, st.sampled_from("ab")),
    st.tuples(st.just("put"), row_ids, st.sampled_from("ab")),
    st.tuples(st.just("delete"), row_ids, st.sampled_from("ab")),
    st.tuples(st.just("flush")),
    st.tuples(st.just("flush")),
    st.tuples(
        st.just("compact_files"), st.integers(0, 3), st.one_of(st.integers(2, 4), st.just(-1))
    ),
    st.tuples(st.just("user"), st.integers(0, ROWS - 1), st.integers(0, ROWS - 1)),
    st.tuples(st.just("cancel")),
    # Several small flushes in a row: more files than maxOpen, so partial compactions happen.
    st.tuples(st.just("burst"), st.lists(row_ids, min_size=2, max_size=5)),
)


@contextlib.contextmanager
def metadata_url_for(backend: str, where: str) -> Iterator[str]:
    """A fresh metadata database per example (the `metadata_url` fixture gives one per test)."""
    if backend == "sqlite":
        yield f"sqlite:///{where}/meta.db"
        return
    gen = _fresh_pg_database(os.environ[PG_DSN_ENV])
    url = next(gen)
    try:
        yield url
    finally:
        with contextlib.suppress(StopIteration):
            next(gen)


BACKENDS = ["sqlite"] + (["postgresql"] if os.environ.get(PG_DSN_ENV) else [])


def row(i: int) -> bytes:
    return f"r{i:02d}".encode()


def run_example(store: lithify.Store, ops: list[tuple]) -> dict[tuple[bytes, bytes], bytes]:
    """Apply `ops` with direct and user compactions in background threads; returns the model."""
    model: dict[tuple[bytes, bytes], bytes] = {}
    errors: list[BaseException] = []
    futures: list[Future] = []

    def direct(tablet: int, n: int) -> None:
        """Compact the `n` smallest files of a tablet now (n = -1: all but the largest)."""
        tb = store.tablets("t")[tablet]
        files = sorted(tb.files, key=lambda f: (f.size, f.path))[:n]
        if len(files) >= 2:
            store.compact_files("t", tb.extent, files)

    def user(a: int, b: int) -> None:
        lo, hi = sorted((a, b))
        # A "cancel" step may stop it; anything else (a timeout above all) is an error.
        with contextlib.suppress(CompactionCancelledError):
            store.compact("t", row(lo), row(hi), timeout=TIMEOUT_S)

    with (
        ThreadPoolExecutor(3, thread_name_prefix="direct") as pool,
        ThreadPoolExecutor(1, thread_name_prefix="user") as users,
    ):
        for i, op in enumerate(ops):
            kind = op[0]
            if kind == "put":
                _, rows, qual = op
                store.write(
                    "t", [Mutation(row(r)).put("f", qual, f"v{i}-{r}") for r in sorted(set(rows))]
                )
                model.update({(row(r), qual.encode()): f"v{i}-{r}".encode() for r in rows})
            elif kind == "delete":
                _, rows, qual = op
                store.write("t", [Mutation(row(r)).delete("f", qual) for r in sorted(set(rows))])
                for r in rows:
                    model.pop((row(r), qual.encode()), None)
            elif kind == "flush":
                store.flush("t")
            elif kind == "burst":
                for j, rows in enumerate(op[1]):
                    value = f"v{i}.{j}"
                    store.write(
                        "t", [Mutation(row(r)).put("f", "a", value) for r in sorted(set(rows))]
                    )
                    model.update({(row(r), b"a"): value.encode() for r in rows})
                    store.flush("t")
                for tablet in range(len(SPLITS) + 1):
                    futures.append(pool.submit(direct, tablet, -1))
            elif kind == "compact_files":
                futures.append(pool.submit(direct, op[1], op[2]))
            elif kind == "user":
                futures.append(users.submit(user, op[1], op[2]))
            elif kind == "cancel":
                store.cancel_compaction("t")
        for f in futures:
            try:
                f.result(timeout=TIMEOUT_S)
            except BaseException as e:  # noqa: BLE001 - collected and reported below
                errors.append(e)
    assert not errors, errors
    return model


def check_observations(obs: Observed) -> None:
    seen: dict[tuple[Extent, FileRef], str] = {}
    for cid, (extent, inputs, propagate) in obs.committed.items():
        for f in inputs:
            other = seen.setdefault((extent, f), cid)
            assert other == cid, f"{f.path} was input to committed compactions {other} and {cid}"
        assert cid in obs.reserved, f"committed compaction {cid} was never reserved"
        r_extent, files_then, r_inputs, r_propagate = obs.reserved[cid]
        assert (r_extent, r_inputs, r_propagate) == (extent, inputs, propagate)
        if not propagate:
            assert inputs == files_then, (
                f"compaction {cid} dropped deletes but its inputs were not all the tablet's files"
            )


def scan_model(store: lithify.Store) -> dict[tuple[bytes, bytes], bytes]:
    return {(k.row, k.qualifier): v for k, v in store.scan_entries("t")}


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_compactions_never_double_compact_or_lose_data(
    backend: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reservation_module, "reserve", _recording_reserve)
    monkeypatch.setattr(reservation_module, "commit", _recording_commit)
    totals = {"committed": 0, "full": 0, "partial": 0, "examples": 0}

    @settings(
        max_examples=12 if backend == "sqlite" else 6,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(ops=st.lists(step, min_size=15, max_size=45))
    def example(ops: list[tuple]) -> None:
        obs = Observed()
        CURRENT["obs"] = obs
        with (
            tempfile.TemporaryDirectory(dir=tmp_path) as where,
            metadata_url_for(backend, where) as url,
        ):
            store = lithify.open(f"{where}/store", metadata_url=url)
            try:
                store.set_system_property(
                    "tserver.compaction.major.service.default.planner.opts.maxOpen", "3"
                )
                store.set_system_property("tserver.memory.maps.max", "16K")
                # No periodic planning: work that waits for it instead of being planned when
                # files change would stall a user compaction into its timeout.
                store.set_system_property("tserver.compaction.major.delay", "1h")
                store.create_table(
                    "t", splits=SPLITS, properties={"table.compaction.major.ratio": "2"}
                )
                model = run_example(store, ops)
                assert store.wait_for_compactions(TIMEOUT_S)
                assert scan_model(store) == model
                # A final full compaction drops every delete; the data must not change.
                store.compact("t", timeout=TIMEOUT_S)
                assert store.wait_for_compactions(TIMEOUT_S)
                assert scan_model(store) == model
                for m in store.meta.tablets(store.table_info("t").id):
                    assert not m.compactions, f"reservations left on {m.extent}"
                    assert m.selection is None, f"selection left on {m.extent}"
                    assert len(m.files) <= 1
                    for f in m.files:
                        assert store.storage.exists(f.path)
                check_observations(obs)
            finally:
                CURRENT.pop("obs", None)
                store.close()
        totals["examples"] += 1
        totals["committed"] += len(obs.committed)
        totals["full"] += sum(1 for _, _, p in obs.committed.values() if not p)
        totals["partial"] += sum(1 for _, _, p in obs.committed.values() if p)

    started = time.monotonic()
    example()
    # The checks above are only worth something if compactions of both kinds really happened.
    assert totals["examples"] >= 3
    assert totals["partial"] > 0 and totals["full"] > 0, totals
    assert time.monotonic() - started < 120


def test_check_observations_catches_violations() -> None:
    """The checker itself must be able to fail (so the property test is not vacuous)."""
    ok = Observed()
    ok.reserved["c1"] = (EXT, frozenset({F1, F2, F3}), frozenset({F1, F2}), True)
    ok.committed["c1"] = (EXT, frozenset({F1, F2}), True)
    check_observations(ok)

    twice = Observed()
    twice.reserved["c1"] = (EXT, frozenset({F1, F2, F3}), frozenset({F1, F2}), True)
    twice.reserved["c2"] = (EXT, frozenset({F1, F2, F3}), frozenset({F2, F3}), True)
    twice.committed["c1"] = (EXT, frozenset({F1, F2}), True)
    twice.committed["c2"] = (EXT, frozenset({F2, F3}), True)
    with pytest.raises(AssertionError, match="F2"):
        check_observations(twice)

    early = Observed()
    early.reserved["c1"] = (EXT, frozenset({F1, F2, F3}), frozenset({F1, F2}), False)
    early.committed["c1"] = (EXT, frozenset({F1, F2}), False)
    with pytest.raises(AssertionError, match="dropped deletes"):
        check_observations(early)
