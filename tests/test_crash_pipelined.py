"""Kills (real SIGKILL) while frozen maps queue behind slow flushes: nothing acknowledged is lost.

The child (crash_child_slow_flush.py) freezes a tablet's map after every write and slows every
flush down, so each tablet holds several frozen maps, waiting for or in a flush and committed
oldest first, while writes go on; the kill lands in the middle of that. The checks are
test_crash.py's: every acknowledged batch complete, every mutation all-or-nothing, no duplicate
versions, nothing seen once disappearing.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests import test_crash as tc

SLOW_CHILD = Path(__file__).resolve().parent / "crash_child_slow_flush.py"
ROUNDS = 6


def test_kill_while_frozen_maps_queue(
    tmp_path: Path, metadata_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tc, "CHILD", SLOW_CHILD)
    path = tmp_path / "store"
    tc.setup_store(path, metadata_url)
    rng = random.Random(11)
    hist = tc.History()
    for _ in range(ROUNDS):
        tc.crash_round(path, metadata_url, "write", rng, hist, tmp_path)
        tc.verify(path, metadata_url, hist)
    assert hist.kills == ROUNDS and hist.acked
    queued = [
        line
        for err in tmp_path.glob("child-*.err")
        for line in err.read_text(errors="replace").splitlines()
        if line.startswith("QUEUED ")
    ]
    assert queued, "no tablet ever held two frozen maps: the test did not test queueing"
