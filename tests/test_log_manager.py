"""Log rolls and log deletion racing writes: a log is neither closed under an append nor
deleted between a write's append and the tablet's reference to it (which would lose an
acknowledged write at the next restart)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

import lithify
from lithify import Mutation
from lithify.data.key import ENTRY_SCHEMA
from lithify.metadata.store import MetadataStore
from lithify.tablet.log_manager import LogManager
from lithify.tablet.tablet import Tablet
from lithify.tablet.wal_reader import read_log


def _entry(value: bytes) -> pa.Table:
    row = {
        "row": [b"r"],
        "family": [b"f"],
        "qualifier": [b"q"],
        "visibility": [b""],
        "timestamp": [1],
        "deleted": [False],
        "value": [value],
    }
    return pa.table(row, schema=ENTRY_SCHEMA)


def test_a_roll_does_not_close_a_log_under_a_concurrent_append(tmp_path: Path) -> None:
    meta = MetadataStore.open_in(tmp_path, None)
    logs = LogManager(meta, tmp_path / "wal", 4096)
    entry = _entry(b"x" * 2000)
    errors: list[BaseException] = []
    appended: list[int] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        try:
            for _ in range(100):
                with logs.writing() as wal:
                    wal.append(f"t;{n}", entry, durability="flush")
                with lock:
                    appended.append(n)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    logs.close()
    assert not errors, errors[:2]
    assert len(appended) == 400
    paths = sorted((tmp_path / "wal").glob("*.wal"))
    assert len(paths) > 10  # it rolled, many times
    assert sum(len(list(read_log(p))) for p in paths) == 400
    meta.close()


def _restart_count(path: Path, metadata_url: str, table: str) -> int:
    with lithify.open(path, metadata_url=metadata_url) as s:
        return s.count(table)


def _small_logs_store(path: Path, metadata_url: str) -> lithify.Store:
    s = lithify.open(path, metadata_url=metadata_url)
    s.set_system_property("tserver.wal.max.size", "1K")
    s.close()
    s = lithify.open(path, metadata_url=metadata_url)
    s.create_table("t")
    s.write("t", [Mutation(b"a").put("f", "q", "x" * 4000)])  # the log is past 1K
    s.flush("t")  # the tablet lists no log now
    return s


def test_a_log_is_kept_between_a_write_and_its_reference(
    tmp_path: Path, metadata_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _small_logs_store(tmp_path / "s", metadata_url)
    real = Tablet._add_log_ref

    def roll_and_release_first(self: Tablet, log_path: str) -> None:
        # What another thread may do in this window: roll the full log, release unlisted logs.
        with s.logs.writing():
            pass
        s._release_logs()
        assert Path(log_path).exists()
        real(self, log_path)

    monkeypatch.setattr(Tablet, "_add_log_ref", roll_and_release_first)
    s.write("t", [Mutation(b"b").put("f", "q", "v")])  # acknowledged (durability flush)
    monkeypatch.setattr(Tablet, "_add_log_ref", real)
    s.close()  # without a flush: "b" is only in the log
    assert _restart_count(tmp_path / "s", metadata_url, "t") == 2


def test_the_log_that_becomes_current_while_logs_are_released_is_kept(
    tmp_path: Path, metadata_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _small_logs_store(tmp_path / "s", metadata_url)
    real = s.meta.list_logs

    def roll() -> None:
        with s.logs.writing():
            pass

    roller = threading.Thread(target=roll)

    def roll_then_list() -> list[tuple[str, int]]:
        # Another writer rolls the full log while the logs are listed (it may have to wait).
        roller.start()
        roller.join(0.5)
        return real()

    monkeypatch.setattr(s.meta, "list_logs", roll_then_list)
    s._release_logs()
    monkeypatch.setattr(s.meta, "list_logs", real)
    roller.join(10)
    assert not roller.is_alive()
    with s.logs.writing() as wal:
        assert wal.path.exists()
    s.write("t", [Mutation(b"b%d" % i).put("f", "q", "v") for i in range(5)])
    s.close()
    assert _restart_count(tmp_path / "s", metadata_url, "t") == 6


def test_a_map_older_than_its_age_limit_is_flushed_and_its_log_released(
    tmp_path: Path, metadata_url: str
) -> None:
    with lithify.open(tmp_path / "s", metadata_url=metadata_url) as s:
        s.set_system_property("tserver.memory.maps.max.age", "300ms")
        s.set_system_property("tserver.wal.max.size", "1K")
    with lithify.open(tmp_path / "s", metadata_url=metadata_url) as s:
        s.create_table("t")
        s.write("t", [Mutation(b"a").put("f", "q", "x" * 4000)])  # fills the first log
        first_log = next(iter(s.tablets("t")[0].files), None)
        assert first_log is None  # nothing flushed yet
        [tb] = s._hosted(s.table_info("t"))
        (log_path,) = tb.meta.logs
        s.write("t", [Mutation(b"b").put("f", "q", "v")])  # the next write rolls the log
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and tb.meta.logs:
            time.sleep(0.05)
        assert not tb.meta.logs, "the map was not flushed by age"
        s.gc()  # logs no tablet lists go with the collection (the tablet server's is periodic)
        assert not Path(log_path).exists(), "the log was kept after the flush"
        assert len(s.tablets("t")[0].files) >= 1 and s.count("t") == 2


def test_an_age_limit_of_zero_flushes_only_by_size(tmp_path: Path, metadata_url: str) -> None:
    with lithify.open(tmp_path / "s", metadata_url=metadata_url) as s:
        s.set_system_property("tserver.memory.maps.max.age", "0")
    with lithify.open(tmp_path / "s", metadata_url=metadata_url) as s:
        s.create_table("t")
        s.write("t", [Mutation(b"a").put("f", "q", "v")])
        time.sleep(0.5)
        assert not s.tablets("t")[0].files and s.count("t") == 1
