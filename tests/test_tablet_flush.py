"""Frozen maps and pipelined flushes: writes go on while frozen maps wait for or are in a flush.

A frozen map is read by scans and its logs stay listed in the metadata until its file is
committed; maps are committed oldest first; a failed flush leaves the map queued; the server
freezes maps at the memory limit so flushes stay about that size.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import lithify
from lithify import Mutation
from lithify.data.mutation import mutations_to_table
from lithify.tablet.tablet import Tablet
from tests.consistency import race_writes_and_flushes


def _open(tmp_path: Path, metadata_url: str) -> lithify.Store:
    return lithify.open(tmp_path / "store", metadata_url=metadata_url)


def _tablet(store: lithify.Store, table: str = "t") -> Tablet:
    (tb,) = store._hosted(store.table_info(table))
    return tb


def _write(tb: Tablet, first: int, count: int, value: str = "v") -> int:
    """Rows r<first>..r<first+count-1> through the tablet itself; returns the sequence number."""
    muts = [Mutation(f"r{i:06d}").put("f", "q", f"{value}{i}") for i in range(first, first + count)]
    return tb.write(mutations_to_table(muts))


def _rows(store: lithify.Store) -> list[bytes]:
    return [k.row for k, _ in store.scan_entries("t")]


def _expect(first: int, count: int) -> list[bytes]:
    return [f"r{i:06d}".encode() for i in range(first, first + count)]


def test_frozen_maps_are_scanned_and_flushed_oldest_first(tmp_path: Path, metadata_url: str):
    with _open(tmp_path, metadata_url) as s:
        s.create_table("t")
        tb = _tablet(s)
        seq_a = _write(tb, 0, 10)
        assert tb.freeze() and not tb.freeze()  # an empty live map is not frozen
        seq_b = _write(tb, 10, 10)
        assert tb.freeze()
        _write(tb, 20, 10)  # stays live
        assert tb.frozen_maps == 2 and tb.flushing_bytes > 0 and tb.memory_bytes > 0
        assert _rows(s) == _expect(0, 30)

        ref = tb.flush(live=False)
        assert ref is not None and tb.frozen_maps == 0
        meta = tb.refresh()
        assert [f.entries for f in meta.files] == [10, 10]  # one file per frozen map, in order
        assert meta.flushed_seq == seq_b > seq_a
        assert meta.logs, "the live map's entries still need their log"
        assert tb.memory_bytes > 0 and _rows(s) == _expect(0, 30)

        tb.flush()  # live=True: the live map too
        assert tb.memory_bytes == 0 and not tb.refresh().logs
        assert _rows(s) == _expect(0, 30)


def test_a_failed_flush_keeps_the_map_queued_and_loses_nothing(
    tmp_path: Path, metadata_url: str, monkeypatch: pytest.MonkeyPatch
):
    with _open(tmp_path, metadata_url) as s:
        s.create_table("t")
        tb = _tablet(s)
        _write(tb, 0, 10)
        tb.freeze()
        _write(tb, 10, 10)
        original = Tablet._write_flush_file

        def failing(self: Tablet, frozen, path: str):
            raise OSError("disk full (test)")

        monkeypatch.setattr(Tablet, "_write_flush_file", failing)
        with pytest.raises(OSError, match="disk full"):
            tb.flush()
        # Both maps are queued now (the live one was frozen first), still read by scans, and
        # their logs still listed.
        assert tb.frozen_maps == 2 and tb.memory_bytes == 0
        assert _rows(s) == _expect(0, 20)
        assert tb.refresh().logs and not tb.refresh().files
        monkeypatch.setattr(Tablet, "_write_flush_file", original)
        tb.flush()
        assert tb.frozen_maps == 0 and [f.entries for f in tb.refresh().files] == [10, 10]
        assert _rows(s) == _expect(0, 20)


def test_acknowledged_writes_stay_recoverable_while_frozen_maps_commit(
    tmp_path: Path, metadata_url: str
):
    """With maps frozen and flushed while writes go on, every acknowledged write is at every
    moment in a committed file (flushed_seq >= its seq) or in a log the metadata lists."""
    with _open(tmp_path, metadata_url) as s:
        s.create_table("t")
        tb = _tablet(s)
        written = [0]

        def write(i: int) -> int:
            seq = _write(tb, i, 1)
            written[0] = i + 1
            if i % 7 == 0:
                tb.freeze()
            return seq

        race_writes_and_flushes(s.meta, tb.extent, write, lambda: tb.flush(live=False))
        assert s.flush_totals()["files"] >= 2, "no frozen map was flushed meanwhile"
        assert _rows(s) == _expect(0, written[0])
    with _open(tmp_path, metadata_url) as s:  # recovery replays exactly the unflushed rest
        assert _rows(s) == _expect(0, written[0])


def test_the_server_freezes_at_the_memory_limit(tmp_path: Path, metadata_url: str):
    """Live memory never passes the limit after a write returns, and every map flushed in the
    background holds just over the limit (the write that passed it included)."""
    limit = 64 * 1024
    batch = 50
    with _open(tmp_path, metadata_url) as s:
        s.set_system_property("tserver.memory.maps.max", "64K")
        # No compactions: the flushed files are what the test looks at.
        s.create_table("t", properties={"table.compaction.major.ratio": "1000"})
        tb = _tablet(s)
        per_entry = None
        for b in range(60):
            before = tb.memory_bytes
            s.write(
                "t", [Mutation(f"r{b:03d}{j:03d}").put("f", "q", "x" * 100) for j in range(batch)]
            )
            if per_entry is None:
                per_entry = (tb.memory_bytes - before) / batch
            assert tb.memory_bytes <= limit
        s.flush("t")
        assert per_entry
        *background, _last = [f.entries for f in tb.refresh().files]
        assert len(background) >= 4
        for entries in background:
            assert limit < entries * per_entry <= limit + batch * per_entry, entries
        assert len(_rows(s)) == 60 * batch


def test_an_explicit_flush_covers_the_live_map_while_a_background_flush_runs(
    tmp_path: Path, metadata_url: str, monkeypatch: pytest.MonkeyPatch
):
    with _open(tmp_path, metadata_url) as s:
        s.create_table("t")
        tb = _tablet(s)
        release = threading.Event()
        started = threading.Event()
        original = Tablet._write_flush_file

        def slow(self: Tablet, frozen, path: str):
            started.set()
            assert release.wait(30), "the test never released the flush"
            return original(self, frozen, path)

        monkeypatch.setattr(Tablet, "_write_flush_file", slow)
        _write(tb, 0, 10)
        tb.freeze()
        background = s._schedule_flush(tb, live=False)
        assert started.wait(30)
        _write(tb, 10, 10)  # written after the background flush took its maps
        explicit = threading.Thread(target=s.flush, args=("t",))
        explicit.start()
        release.set()
        explicit.join(timeout=60)
        assert not explicit.is_alive()
        background.result(timeout=60)
        assert tb.memory_bytes == 0 and tb.frozen_maps == 0
        assert sum(f.entries for f in tb.refresh().files) == 20
