"""A map frozen just as a background flush decides it is done is still flushed, with no more writes.

A writer that freezes a map schedules a flush unless an unfinished flush task of the tablet is
already queued or running (`Store._after_write`, `Store._schedule_flush`). If the task has just
found the frozen queue empty but not yet finished, the writer must not rely on it: the map would
wait (safe in the log, but in memory) for the next write or explicit flush. The test holds the
task at exactly that point, with a gate, freezes a map there, and waits (bounded) for the map to
be flushed without writing anything more.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import lithify
from lithify import Mutation
from lithify.data.mutation import mutations_to_table
from lithify.tablet.tablet import Tablet
from tests.gates import Gate, new_gate, wait_until

#: Seconds the test waits for anything the fix makes happen (a failing run waits this long).
FLUSH_WAIT_S = 10.0


def _write(tb: Tablet, first: int, count: int) -> None:
    muts = [Mutation(f"r{i:06d}").put("f", "q", f"v{i}") for i in range(first, first + count)]
    tb.write(mutations_to_table(muts))


def _hold_when_done(monkeypatch: pytest.MonkeyPatch, gate: Gate) -> None:
    """The first time a flush thread counts the frozen maps and finds none (the flush task
    deciding it has nothing left to do), hold it in the gate before it acts on that count."""
    original = Tablet.frozen_maps.fget
    assert original is not None

    def held(self: Tablet) -> int:
        n = original(self)
        if n == 0 and threading.current_thread().name.startswith("minc"):
            gate.hold(only_first=True)
        return n

    monkeypatch.setattr(Tablet, "frozen_maps", property(held))


def test_a_map_frozen_as_the_background_flush_ends_is_flushed_without_another_write(
    tmp_path: Path, metadata_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with lithify.open(tmp_path / "store", metadata_url=metadata_url) as s, new_gate() as gate:
        s.create_table("t")
        (tb,) = s._hosted(s.table_info("t"))
        _hold_when_done(monkeypatch, gate)

        _write(tb, 0, 10)
        assert tb.freeze()
        _write(tb, 10, 10)  # the live map, frozen below while the task is held
        first = s._schedule_flush(tb, live=False)
        assert wait_until(lambda: gate.active == 1, timeout=FLUSH_WAIT_S), "flush never ended"
        assert [f.entries for f in tb.refresh().files] == [10]

        # What `_after_write` does for a writer at the memory limit, in the window between the
        # task's last look at the frozen queue and its end. In a thread: the scheduler may wait
        # (on the store lock) for the held task to settle.
        def writer() -> None:
            assert tb.freeze()
            s._schedule_flush(tb, live=False)

        t = threading.Thread(target=writer, name="writer")
        t.start()
        assert wait_until(lambda: tb.flushing_bytes > 0, timeout=FLUSH_WAIT_S)
        gate.open()
        t.join(timeout=FLUSH_WAIT_S)
        assert not t.is_alive(), "the writer never got its flush scheduled"
        first.result(timeout=FLUSH_WAIT_S)

        # No further write and no explicit flush: the frozen map must be flushed all the same.
        assert wait_until(lambda: tb.flushing_bytes == 0, timeout=FLUSH_WAIT_S), (
            "the map frozen as the background flush ended was never flushed"
        )
        assert sorted(f.entries for f in tb.refresh().files) == [10, 10]
        assert tb.memory_bytes == 0
        assert len(list(s.scan_entries("t"))) == 20
