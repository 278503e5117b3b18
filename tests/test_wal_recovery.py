"""Replay of damaged write-ahead logs, and the timed flush of `none` appends.

A crash can only tear the tail of a log; a damaged record with intact records after it is
corruption inside the log. `read_log` tells the two apart: with `recovery="tolerate-tail"` (the
default, `tserver.wal.recovery`) damage inside raises CorruptFileError, with "point-in-time"
replay stops at the damage with a warning; a torn tail is a warning in both modes.

`tserver.wal.flush.interval` bounds how long a `none` append stays in the process's buffer.
Every wait here is bounded by time.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import lithify
from lithify import Mutation
from lithify.cli.shell import config
from lithify.errors import ConfigError, CorruptFileError
from lithify.table.properties import system_properties, validate_system_property
from lithify.tablet.wal import WriteAheadLog
from lithify.tablet.wal_format import HEADER_SIZE, make_seq
from lithify.tablet.wal_reader import POINT_IN_TIME, TOLERATE_TAIL, read_log
from tests.test_wal import entries

#: The logger of replay's warnings (the reader's module).
WAL_LOGGER = "lithify.tablet.wal_reader"
MODES = [TOLERATE_TAIL, POINT_IN_TIME]


def write_log(tmp_path: Path, n: int = 6, generation: int = 3) -> tuple[Path, list[int], list[int]]:
    """A log of `n` records of different sizes: its path, each record's offset, the seqs."""
    path = tmp_path / "full.wal"
    offsets, seqs = [], []
    with WriteAheadLog.create(path, generation, "flush") as wal:
        for i in range(n):
            offsets.append(wal.size_bytes)
            seqs.append(wal.append(f"tablet-{i % 2}", entries(f"r{i}", n=2 + i)))
    assert offsets[0] == HEADER_SIZE
    return path, offsets, seqs


def damaged_copy(src: Path, dst: Path, edits: dict[int, int]) -> Path:
    """A copy of `src` with the byte at each offset replaced (XORed with the given mask)."""
    data = bytearray(src.read_bytes())
    for pos, mask in edits.items():
        data[pos] ^= mask
    dst.write_bytes(bytes(data))
    return dst


def replay(path: Path, recovery: str) -> tuple[list[int], CorruptFileError | None]:
    """The seqs yielded before replay ended, and the error that ended it (if any)."""
    seqs: list[int] = []
    try:
        for record in read_log(path, recovery=recovery):
            seqs.append(record.seq)
    except CorruptFileError as e:
        return seqs, e
    return seqs, None


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == WAL_LOGGER and r.levelno == logging.WARNING
    ]


# -- damage inside the log ---------------------------------------------------------------------


@pytest.mark.parametrize("victim", [0, 2, 4])
def test_flipped_payload_byte_inside_the_log_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, victim: int
) -> None:
    path, offsets, seqs = write_log(tmp_path)
    bad = damaged_copy(path, tmp_path / "bad.wal", {offsets[victim] + 8 + 30: 0x10})
    caplog.set_level(logging.WARNING, logger=WAL_LOGGER)
    got, error = replay(bad, TOLERATE_TAIL)
    assert got == seqs[:victim]  # the records before the damage were yielded first
    assert error is not None
    message = str(error)
    assert str(bad) in message
    assert f"offset {offsets[victim]}" in message
    assert "checksum mismatch" in message
    assert "intact record follows" in message and f"offset {offsets[victim + 1]}" in message
    assert f"sequence number {seqs[victim + 1]}" in message
    assert "tserver.wal.recovery=point-in-time" in message
    assert warnings_of(caplog) == []
    # The default mode is tolerate-tail.
    with pytest.raises(CorruptFileError, match=f"offset {offsets[victim]}"):
        list(read_log(bad))


@pytest.mark.parametrize("victim", [0, 2, 4])
def test_point_in_time_stops_at_the_damage_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, victim: int
) -> None:
    path, offsets, seqs = write_log(tmp_path)
    bad = damaged_copy(path, tmp_path / "bad.wal", {offsets[victim] + 8 + 30: 0x10})
    caplog.set_level(logging.WARNING, logger=WAL_LOGGER)
    records = list(read_log(bad, recovery=POINT_IN_TIME))
    assert [r.seq for r in records] == seqs[:victim]
    for i, r in enumerate(records):
        assert r.table.equals(entries(f"r{i}", n=2 + i))
    (warning,) = warnings_of(caplog)
    assert str(bad) in warning and f"offset {offsets[victim]}" in warning
    assert "checksum mismatch" in warning
    assert f"intact records from offset {offsets[victim + 1]}" in warning
    assert "point-in-time" in warning


@pytest.mark.parametrize(
    ("name", "new_length"),
    [
        ("zero", lambda n: 0),
        ("below the minimum", lambda n: 5),
        ("one short", lambda n: n - 1),
        ("one long", lambda n: n + 1),
        ("into a later record", lambda n: n + 100),
        ("past the end", lambda n: 0xFFFF_FFF0),
    ],
)
def test_damaged_length_field_in_the_middle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, new_length
) -> None:
    """The length is what frames the next record, so its damage hides where that record
    starts: the reader finds it by scanning forward."""
    path, offsets, seqs = write_log(tmp_path)
    data = bytearray(path.read_bytes())
    victim = 2
    (length,) = struct.unpack_from("<I", data, offsets[victim])
    struct.pack_into("<I", data, offsets[victim], new_length(length))
    bad = tmp_path / "bad.wal"
    bad.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING, logger=WAL_LOGGER)
    got, error = replay(bad, TOLERATE_TAIL)
    assert got == seqs[:victim]
    assert error is not None, name
    assert f"offset {offsets[victim]}" in str(error) and str(bad) in str(error)
    assert f"intact record follows at offset {offsets[victim + 1]}" in str(error)
    caplog.clear()
    got, error = replay(bad, POINT_IN_TIME)
    assert got == seqs[:victim] and error is None
    (warning,) = warnings_of(caplog)
    assert f"offset {offsets[victim]}" in warning
    assert f"intact records from offset {offsets[victim + 1]}" in warning


def test_damaged_sequence_number_in_the_middle(tmp_path: Path) -> None:
    path, offsets, seqs = write_log(tmp_path)
    seq_pos = offsets[3] - 2  # inside the 8-byte sequence number that ends record 2
    bad = damaged_copy(path, tmp_path / "bad.wal", {seq_pos: 0x01})
    got, error = replay(bad, TOLERATE_TAIL)
    assert got == seqs[:2]
    assert error is not None and f"offset {offsets[2]}" in str(error)


def test_an_overwritten_block_spanning_records(tmp_path: Path) -> None:
    """Zeros over the end of record 1, all of records 2 and 3 and the start of record 4: the
    next intact record is 5, found by the scan."""
    path, offsets, seqs = write_log(tmp_path, n=7)
    data = bytearray(path.read_bytes())
    start, end = offsets[1] + 40, offsets[4] + 20
    data[start:end] = bytes(end - start)
    bad = tmp_path / "bad.wal"
    bad.write_bytes(bytes(data))
    got, error = replay(bad, TOLERATE_TAIL)
    assert got == seqs[:1]
    assert error is not None
    assert f"offset {offsets[1]}" in str(error)
    assert f"intact record follows at offset {offsets[5]}" in str(error)
    assert replay(bad, POINT_IN_TIME) == (seqs[:1], None)


def test_damage_in_the_first_record(tmp_path: Path) -> None:
    path, offsets, seqs = write_log(tmp_path, n=2)
    bad = damaged_copy(path, tmp_path / "bad.wal", {offsets[0] + 3: 0x40})  # its length
    got, error = replay(bad, TOLERATE_TAIL)
    assert got == [] and error is not None
    assert f"offset {HEADER_SIZE}" in str(error)
    assert "last good record before the damage: none" in str(error)
    assert replay(bad, POINT_IN_TIME) == ([], None)


# -- a torn or damaged tail ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_damaged_last_record_is_a_torn_tail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    path, offsets, seqs = write_log(tmp_path)
    caplog.set_level(logging.WARNING, logger=WAL_LOGGER)
    size = path.stat().st_size
    for pos in (offsets[-1], offsets[-1] + 2, offsets[-1] + 5, offsets[-1] + 30, size - 1):
        bad = damaged_copy(path, tmp_path / "bad.wal", {pos: 0x21})
        caplog.clear()
        assert replay(bad, mode) == (seqs[:-1], None), pos
        (warning,) = warnings_of(caplog)
        assert str(bad) in warning and f"offset {offsets[-1]}" in warning, pos
        assert "intact" not in warning.replace("no intact record", ""), warning


@pytest.mark.parametrize("mode", MODES)
def test_truncated_mid_record_is_a_torn_tail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    path, offsets, seqs = write_log(tmp_path)
    data = path.read_bytes()
    caplog.set_level(logging.WARNING, logger=WAL_LOGGER)
    torn = tmp_path / "torn.wal"
    for k in (2, 5):  # torn inside record k (the last of what is left)
        for cut in (offsets[k] + 3, offsets[k] + 8, offsets[k] + 50):
            torn.write_bytes(data[:cut])
            caplog.clear()
            assert replay(torn, mode) == (seqs[:k], None), (k, cut)
            (warning,) = warnings_of(caplog)
            assert f"offset {offsets[k]}" in warning, warning
            assert "torn" in warning or "short payload" in warning, warning


@pytest.mark.parametrize("mode", MODES)
def test_zero_filled_tail_is_a_torn_tail(tmp_path: Path, mode: str) -> None:
    path, _, seqs = write_log(tmp_path)
    padded = tmp_path / "padded.wal"
    padded.write_bytes(path.read_bytes() + bytes(8192))
    assert replay(padded, mode) == (seqs, None)


def test_an_older_record_after_the_damage_is_not_intact_data(tmp_path: Path) -> None:
    """Only a record newer than the last good one counts: a stale copy of an earlier record
    (an overwritten block can hold one) after a damaged last record is still a torn tail."""
    path, offsets, seqs = write_log(tmp_path, n=4)
    data = bytearray(path.read_bytes())
    data[offsets[3] + 30] ^= 0x08
    stale = tmp_path / "stale.wal"
    stale.write_bytes(bytes(data) + bytes(data[offsets[0] : offsets[2]]))
    assert replay(stale, TOLERATE_TAIL) == (seqs[:3], None)


def test_a_record_of_another_log_after_the_damage_is_not_intact_data(tmp_path: Path) -> None:
    path, offsets, seqs = write_log(tmp_path, n=3, generation=3)
    other = tmp_path / "other.wal"
    with WriteAheadLog.create(other, 4, "flush") as wal:
        wal.append("t", entries("other"))
    data = bytearray(path.read_bytes())
    data[offsets[2] + 30] ^= 0x08
    mixed = tmp_path / "mixed.wal"
    mixed.write_bytes(bytes(data) + other.read_bytes()[HEADER_SIZE:])
    assert replay(mixed, TOLERATE_TAIL) == (seqs[:2], None)


def test_an_intact_log_reads_the_same_in_both_modes(tmp_path: Path) -> None:
    path, _, seqs = write_log(tmp_path)
    assert replay(path, TOLERATE_TAIL) == (seqs, None)
    assert replay(path, POINT_IN_TIME) == (seqs, None)


def test_a_large_damaged_record_is_scanned_quickly(tmp_path: Path) -> None:
    """The forward scan covers the bytes from the damage to the next intact record: a few MB
    take well under a second."""
    path = tmp_path / "big.wal"
    offsets, seqs = [], []
    with WriteAheadLog.create(path, 2, "flush") as wal:
        for i in range(3):
            offsets.append(wal.size_bytes)
            seqs.append(wal.append("t", entries(f"big{i}", n=40_000)))
    size = path.stat().st_size
    assert offsets[1] - offsets[0] > 2_000_000
    data = bytearray(path.read_bytes())
    data[offsets[1] + 1] ^= 0x7F  # the length: the scan has to cross the whole record
    bad = tmp_path / "bad.wal"
    bad.write_bytes(bytes(data))
    started = time.monotonic()
    got, error = replay(bad, TOLERATE_TAIL)
    assert got == seqs[:1] and error is not None
    assert f"intact record follows at offset {offsets[2]}" in str(error)
    # And a damaged last record: the scan runs to the end of the file and finds nothing.
    data = bytearray(path.read_bytes())
    data[offsets[2] + 1] ^= 0x7F
    bad.write_bytes(bytes(data))
    assert replay(bad, TOLERATE_TAIL) == (seqs[:2], None)
    assert time.monotonic() - started < 10, f"{size} bytes"


# -- the recovery mode and the properties ----------------------------------------------------


def test_unknown_recovery_mode_is_rejected_at_once(tmp_path: Path) -> None:
    path, _, _ = write_log(tmp_path, n=1)
    with pytest.raises(ConfigError, match="tolerate-tail, point-in-time"):
        read_log(path, recovery="skip-any")  # no iteration needed
    assert len(list(read_log(path, recovery=" Point-In-Time "))) == 1


def test_wal_properties_are_validated() -> None:
    props = system_properties({})
    assert props["tserver.wal.recovery"] == "tolerate-tail"
    assert props.get_duration("tserver.wal.flush.interval") == 1.0
    assert validate_system_property("tserver.wal.recovery", "Point-In-Time") == "point-in-time"
    with pytest.raises(ConfigError) as err:
        validate_system_property("tserver.wal.recovery", "skip-corrupted")
    assert "tserver.wal.recovery" in str(err.value)
    assert "tolerate-tail, point-in-time" in str(err.value)
    assert validate_system_property("tserver.wal.flush.interval", "0") == "0"
    assert validate_system_property("tserver.wal.flush.interval", "250ms") == "250ms"
    with pytest.raises(ConfigError, match="tserver.wal.flush.interval.*duration"):
        validate_system_property("tserver.wal.flush.interval", "soon")


# -- recovery of a store ---------------------------------------------------------------------


def _crash(s: lithify.Store) -> None:
    """Release a store without flushing its tablets, as a crash would leave it."""
    s.logs.close()
    s.meta.close()
    s._closed = True
    s._lock_file.close()


def test_store_refuses_a_log_damaged_inside_unless_point_in_time(
    tmp_path: Path, metadata_url: str
) -> None:
    path = tmp_path / "s"
    with lithify.open(path, metadata_url=metadata_url) as s:
        s.create_table("t")
        for i in range(5):
            s.write("t", [Mutation(f"r{i}".encode()).put("f", "q", f"v{i}" * 50)])
        (log_path,) = sorted((path / "wal").glob("*.wal"))
        _crash(s)
    data = bytearray(log_path.read_bytes())
    offsets = []
    pos = HEADER_SIZE
    while pos < len(data):
        offsets.append(pos)
        pos += 8 + struct.unpack_from("<I", data, pos)[0]
    assert len(offsets) == 5
    data[offsets[2] + 40] ^= 0x01
    log_path.write_bytes(bytes(data))

    with pytest.raises(CorruptFileError) as info:
        lithify.open(path, metadata_url=metadata_url)
    message = str(info.value)
    assert str(log_path) in message and f"offset {offsets[2]}" in message
    assert "tserver.wal.recovery=point-in-time" in message

    # The failed open released the store's lock at once, and the operator's way out is the
    # offline config command (the store itself cannot open to be configured).
    args = ["--store", str(path), "--metadata-url", metadata_url]
    result = CliRunner().invoke(
        config, [*args, "--offline", "-s", "tserver.wal.recovery=point-in-time"]
    )
    assert result.exit_code == 0, result.output
    assert "tserver.wal.recovery=point-in-time" in result.output
    bad = CliRunner().invoke(config, [*args, "--offline", "-s", "tserver.wal.recovery=never"])
    assert bad.exit_code != 0 and "tserver.wal.recovery" in bad.output
    with lithify.open(path, metadata_url=metadata_url) as s:
        rows = [k.row for k, _ in s.scan_entries("t")]
        assert rows == [b"r0", b"r1"]


# -- the timed flush of `none` appends -------------------------------------------------------


def _wait_for_records(path: Path, count: int, timeout_s: float) -> float | None:
    """Seconds until `path` holds `count` records read from another handle, or None."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if len(list(read_log(path))) >= count:
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def _write_count_reaching(wal: WriteAheadLog, count: int, timeout_s: float = 5.0) -> int:
    """`wal.write_count` once it reaches `count` (or after `timeout_s`): the flusher counts a
    write after the bytes are in the file, so a reader can see them a moment earlier."""
    deadline = time.monotonic() + timeout_s
    while wal.write_count < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return wal.write_count


def _flusher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("wal-flush-")]


def test_none_append_is_written_out_within_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "a.wal"
    interval = 0.3
    before = set(_flusher_threads())
    with WriteAheadLog.create(
        path, 1, "none", buffer_bytes=1 << 30, flush_interval_s=interval
    ) as wal:
        assert wal.flush_interval_s == interval
        appended = time.monotonic()
        a = wal.append("t", entries("a"))
        waited = _wait_for_records(path, 1, timeout_s=interval + 5)
        assert waited is not None, "the none append never reached the file"
        assert time.monotonic() - appended >= interval * 0.9
        assert time.monotonic() - appended < interval + 5
        assert [r.seq for r in read_log(path)] == [a]
        assert _write_count_reaching(wal, 1) == 1
        # A second round: the flusher sleeps while nothing is buffered, then bounds this one.
        time.sleep(interval)
        assert wal.write_count == 1
        b = wal.append("t", entries("b"))
        c = wal.append("t", entries("c"))
        assert _wait_for_records(path, 3, timeout_s=interval + 5) is not None
        assert [r.seq for r in read_log(path)] == [a, b, c]
        # 2, or 3 if a stall longer than the interval fell between the appends of b and c.
        assert _write_count_reaching(wal, 2) in (2, 3) and wal.sync_count == 0
        assert len(set(_flusher_threads()) - before) == 1
    deadline = time.monotonic() + 10
    while set(_flusher_threads()) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not set(_flusher_threads()) - before, "close() did not stop the flusher"


def test_interval_zero_leaves_none_appends_buffered_until_close(tmp_path: Path) -> None:
    path = tmp_path / "a.wal"
    before = set(_flusher_threads())
    wal = WriteAheadLog.create(path, 1, "none", buffer_bytes=1 << 30, flush_interval_s=0)
    try:
        seq = wal.append("t", entries("a"))
        assert _wait_for_records(path, 1, timeout_s=1.5) is None
        assert path.stat().st_size == HEADER_SIZE
        assert not set(_flusher_threads()) - before
    finally:
        wal.close()
    assert [r.seq for r in read_log(path)] == [seq]


def test_no_flusher_thread_without_none_appends(tmp_path: Path) -> None:
    before = set(_flusher_threads())
    with WriteAheadLog.create(tmp_path / "a.wal", 1, "flush", flush_interval_s=0.05) as wal:
        for i in range(3):
            wal.append("t", entries(f"f{i}"))
        assert not set(_flusher_threads()) - before


def test_negative_interval_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="interval"):
        WriteAheadLog.create(tmp_path / "a.wal", 1, "none", flush_interval_s=-1)
    assert not (tmp_path / "a.wal").exists()


def test_timed_flush_with_group_commit(tmp_path: Path) -> None:
    """Threads mixing none, flush and sync appends with a short interval: every record lands
    once and in order, and the last none appends are written without another append."""
    path = tmp_path / "a.wal"
    errors: list[BaseException] = []
    seqs: list[int] = []
    lock = threading.Lock()
    levels = ["none", "none", "flush", "none", "sync"]

    def worker(k: int) -> None:
        try:
            for i in range(20):
                seq = wal.append(f"t{k}", entries(f"{k}-{i}"), durability=levels[(k + i) % 5])
                with lock:
                    seqs.append(seq)
                if i % 7 == 0:
                    time.sleep(0.02)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with WriteAheadLog.create(path, 6, "none", buffer_bytes=1 << 30, flush_interval_s=0.02) as wal:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        assert not errors
        last = wal.append("t", entries("last"))
        assert _wait_for_records(path, 161, timeout_s=5) is not None
        assert [r.seq for r in read_log(path)] == [make_seq(6, c) for c in range(1, 162)]
        assert last == make_seq(6, 161)
    assert sorted(seqs) == [make_seq(6, c) for c in range(1, 161)]
    assert os.path.getsize(path) == wal.size_bytes
