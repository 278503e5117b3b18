"""A client's far-future timestamp replayed after a restart must not drag the tablet's time."""

from __future__ import annotations

import time

import lithify
from lithify import Mutation

MAX_TIMESTAMP = 2**63 - 1


def test_replayed_far_future_timestamp_does_not_move_the_tablet_time(tmp_path) -> None:
    path = tmp_path / "s"
    s = lithify.open(path)
    s.create_table("t", properties={"table.durability": "flush"})
    s.write("t", [Mutation(b"a").put("f", "q", "future", timestamp=MAX_TIMESTAMP)])
    assert [t.files for t in s.tablets("t")] == [()]  # only in the log
    s.close()  # close does not flush: reopening replays the log

    with lithify.open(path) as s:
        before = time.time_ns() // 1_000_000
        s.write("t", [Mutation(b"b").put("f", "q", "now")])
        stamps = {k.row: (k.timestamp, v) for k, v in s.scan_entries("t")}
        assert stamps[b"a"] == (MAX_TIMESTAMP, b"future")
        ts, value = stamps[b"b"]
        assert value == b"now"
        assert abs(ts - before) < 60_000
        # The persisted tablet time (recorded by recovery's flush) is not the client's either.
        assert all(t.time < before + 60_000 for t in s.meta.tablets(s.table_info("t").id))
