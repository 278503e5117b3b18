"""The garbage collector: immediate on request, two confirming passes when periodic."""

from __future__ import annotations

from pathlib import Path

import lithify
from lithify.data.mutation import Mutation
from lithify.server.tserver import PeriodicGc


def _replaced_file(store: lithify.Store) -> str:
    """Flush a file, then compact it away; returns the path that became garbage."""
    store.create_table("t")
    store.write("t", [Mutation(b"a").put(b"f", b"q", b"v")])
    store.flush("t")
    (flushed,) = [f.path for t in store.tablets("t") for f in t.files]
    store.compact("t")
    return flushed


def test_gc_only_deletes_what_it_is_asked_to(tmp_path: Path, metadata_url: str) -> None:
    with lithify.open(tmp_path / "s", metadata_url=metadata_url) as store:
        garbage = _replaced_file(store)
        assert store.find_garbage() == {garbage}
        assert store.gc(only=set()) == []
        assert store.storage.exists(garbage)
        assert store.gc(only={garbage, "tables/x/not-garbage.parquet"}) == [garbage]
        assert not store.storage.exists(garbage)


def test_periodic_gc_deletes_what_two_passes_found(tmp_path: Path) -> None:
    with lithify.open(tmp_path / "s") as store:
        garbage = _replaced_file(store)
        gc = PeriodicGc(store, interval_s=1e-9)
        gc.tick()  # first pass: a candidate only
        assert store.storage.exists(garbage)
        gc.tick()  # second pass: still garbage, deleted
        assert not store.storage.exists(garbage)
        assert [r.row for r, _ in store.scan_entries("t")] == [b"a"]


def test_periodic_gc_spares_a_file_referenced_again(tmp_path: Path) -> None:
    """A file found unreferenced once but in use at the next pass is kept."""
    with lithify.open(tmp_path / "s") as store:
        garbage = _replaced_file(store)
        gc = PeriodicGc(store, interval_s=1e-9)
        gc.tick()
        with store.in_use.using([garbage]):
            gc.tick()
        assert store.storage.exists(garbage)


def test_periodic_gc_with_interval_zero_never_runs(tmp_path: Path) -> None:
    with lithify.open(tmp_path / "s") as store:
        garbage = _replaced_file(store)
        gc = PeriodicGc(store, interval_s=0)
        gc.tick()
        gc.tick()
        assert store.storage.exists(garbage)
