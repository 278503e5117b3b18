"""A split, merge or offline while a background flush of the tablet runs: the flush holds the
tablet's flush lock and takes the store's lock to finish; the split waits for the flush lock.
Were the split to hold the store's lock meanwhile, both would wait for ever."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import lithify
from lithify import Mutation
from lithify.tablet.tablet import Tablet


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.add_splits("t", [b"r050"]),
        lambda s: s.merge_tablets("t"),
        lambda s: s.offline("t"),
    ],
    ids=["split", "merge", "offline"],
)
def test_a_layout_change_during_a_background_flush_finishes(
    tmp_path: Path,
    metadata_url: str,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[lithify.Store], None],
) -> None:
    with lithify.open(tmp_path / "s", metadata_url=metadata_url) as s:
        s.create_table("t", splits=[b"r090"])
        s.write("t", [Mutation(b"r%03d" % i).put("f", "q", "v") for i in range(100)])
        real = Tablet._write_flush_file
        started = threading.Event()

        def slow(self: Tablet, *args: object, **kw: object) -> object:
            started.set()
            time.sleep(0.5)  # the layout change arrives while this flush holds its lock
            return real(self, *args, **kw)

        monkeypatch.setattr(Tablet, "_write_flush_file", slow)
        s.flush("t", wait=False)
        assert started.wait(10)
        worker = threading.Thread(target=change, args=(s,), daemon=True)
        worker.start()
        worker.join(20)
        assert not worker.is_alive(), "the layout change and the flush wait for each other"
        monkeypatch.setattr(Tablet, "_write_flush_file", real)
        if s.table_info("t").state == "offline":
            s.online("t")
        assert s.count("t") == 100
