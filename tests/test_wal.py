"""The write-ahead log: framing, sequence numbers, durability, group commit and torn tails."""

from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pytest

from lithify.data.key import ENTRY_SCHEMA
from lithify.errors import ConfigError, CorruptFileError
from lithify.tablet import wal as wal_mod
from lithify.tablet import wal_format
from lithify.tablet.wal import LogClosedError, WriteAheadLog
from lithify.tablet.wal_format import HEADER_SIZE, make_seq, read_log_header, seq_generation
from lithify.tablet.wal_reader import read_log

REPO = Path(__file__).resolve().parent.parent
#: The logger of replay's warnings (the reader's module).
WAL_LOGGER = "lithify.tablet.wal_reader"


def entries(tag: str, n: int = 3, ts: int = 1000) -> pa.Table:
    """`n` distinct entries whose rows carry `tag`, so a record can be matched to its append."""
    return pa.table(
        {
            "row": [f"{tag}-{i:04d}".encode() for i in range(n)],
            "family": [b"f"] * n,
            "qualifier": [f"q{i}".encode() for i in range(n)],
            "visibility": [b""] * n,
            "timestamp": [ts + i for i in range(n)],
            "deleted": [i % 2 == 1 for i in range(n)],
            "value": [f"value {tag} {i}".encode() * 3 for i in range(n)],
        },
        schema=ENTRY_SCHEMA,
    )


def seqs_of(path: Path) -> list[int]:
    return [r.seq for r in read_log(path)]


# -- round trip and sequence numbers ---------------------------------------------------------


def test_round_trip_across_threads(tmp_path: Path) -> None:
    path = tmp_path / "a.wal"
    appended: dict[int, tuple[str, pa.Table]] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(25):
                table = entries(f"t{k}-{i}", n=1 + (i % 5))
                seq = wal.append(f"tablet-{k}", table)
                with lock:
                    appended[seq] = (f"tablet-{k}", table)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with WriteAheadLog.create(path, 5, "flush") as wal:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads)
    assert not errors
    records = list(read_log(path))
    assert len(records) == len(appended) == 200
    seqs = [r.seq for r in records]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert seqs == [make_seq(5, c) for c in range(1, 201)]
    for r in records:
        tablet, table = appended[r.seq]
        assert r.tablet == tablet
        assert r.table.schema.equals(ENTRY_SCHEMA)
        assert r.table.equals(table)


def test_sequence_numbers_increase_across_generations(tmp_path: Path) -> None:
    last = 0
    for gen in (1, 2, 9):
        with WriteAheadLog.create(tmp_path / f"{gen}.wal", gen, "flush") as wal:
            assert wal.generation == gen
            for _ in range(3):
                seq = wal.append("t", entries("x"))
                assert seq > last
                assert seq_generation(seq) == gen
                last = seq
            assert wal.last_seq == last
        assert read_log_header(wal.path).generation == gen
    assert make_seq(1, 1) == (1 << 40) + 1


def test_empty_and_string_typed_tables_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "a.wal"
    loose = pa.table({name: entries("s").column(name) for name in ENTRY_SCHEMA.names})
    with WriteAheadLog.create(path, 1, "flush") as wal:
        wal.append("t", ENTRY_SCHEMA.empty_table())
        wal.append("t", loose)
    first, second = read_log(path)
    assert first.table.num_rows == 0 and first.table.schema.equals(ENTRY_SCHEMA)
    assert second.table.equals(entries("s"))


def test_create_refuses_an_existing_file_and_bad_arguments(tmp_path: Path) -> None:
    path = tmp_path / "a.wal"
    WriteAheadLog.create(path, 1, "flush").close()
    with pytest.raises(FileExistsError):
        WriteAheadLog.create(path, 2, "flush")
    with pytest.raises(ConfigError, match="durability"):
        WriteAheadLog.create(tmp_path / "b.wal", 1, "fsync")
    with pytest.raises(ValueError, match="generation"):
        WriteAheadLog.create(tmp_path / "c.wal", 2**23, "flush")
    with WriteAheadLog.create(tmp_path / "d.wal", 1, "flush") as wal, pytest.raises(ConfigError):
        wal.append("t", entries("x"), durability="always")


def test_closed_log_refuses_appends(tmp_path: Path) -> None:
    wal = WriteAheadLog.create(tmp_path / "a.wal", 1, "none")
    wal.append("t", entries("x"))
    wal.close()
    wal.close()
    assert wal.closed
    with pytest.raises(LogClosedError, match="closed"):
        wal.append("t", entries("y"))
    assert seqs_of(wal.path) == [make_seq(1, 1)]


def test_a_failed_write_fails_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wal = WriteAheadLog.create(tmp_path / "a.wal", 1, "flush")
    wal.append("t", entries("ok"))

    def broken(fd: int, bufs: list) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wal_mod, "_write_all", broken)
    with pytest.raises(LogClosedError, match="No space"):
        wal.append("t", entries("lost"))
    monkeypatch.undo()
    with pytest.raises(LogClosedError, match="failed earlier"):
        wal.append("t", entries("after"))
    wal.close()
    assert seqs_of(wal.path) == [make_seq(1, 1)]


# -- durability ------------------------------------------------------------------------------


def test_durability_none_buffers_in_the_process(tmp_path: Path) -> None:
    path = tmp_path / "a.wal"
    # No timed flush (flush_interval_s=0): a stalled machine must not make it write early.
    with WriteAheadLog.create(path, 1, "none", buffer_bytes=1 << 30, flush_interval_s=0) as wal:
        for i in range(5):
            wal.append("t", entries(f"n{i}"))
        assert path.stat().st_size == HEADER_SIZE
        assert wal.size_bytes > HEADER_SIZE
        assert wal.write_count == 0
        wal.flush()
        assert path.stat().st_size == wal.size_bytes
        assert len(seqs_of(path)) == 5
        assert wal.write_count == 1 and wal.sync_count == 0


def test_durability_none_writes_out_a_full_buffer(tmp_path: Path) -> None:
    path = tmp_path / "a.wal"
    with WriteAheadLog.create(path, 1, "none", buffer_bytes=2000) as wal:
        for i in range(10):
            wal.append("t", entries(f"n{i}"))
        assert 0 < wal.write_count < 10
        assert path.stat().st_size > HEADER_SIZE


def test_durability_flush_reaches_the_os_before_acknowledging(tmp_path: Path) -> None:
    path = tmp_path / "a.wal"
    with WriteAheadLog.create(path, 1, "flush") as wal:
        for i in range(5):
            seq = wal.append("t", entries(f"f{i}"))
            assert seqs_of(path)[-1] == seq
            assert path.stat().st_size == wal.size_bytes
        assert wal.write_count == 5
        assert wal.sync_count == 0


def test_durability_sync_syncs_each_append(tmp_path: Path) -> None:
    path = tmp_path / "a.wal"
    with WriteAheadLog.create(path, 1, "sync") as wal:
        for i in range(4):
            wal.append("t", entries(f"s{i}"))
            assert wal.sync_count == i + 1
    assert len(seqs_of(path)) == 4


def test_per_append_durability_override(tmp_path: Path) -> None:
    path = tmp_path / "a.wal"
    with WriteAheadLog.create(path, 1, "none", buffer_bytes=1 << 30, flush_interval_s=0) as wal:
        a = wal.append("t", entries("a"))
        assert seqs_of(path) == []
        b = wal.append("t", entries("b"), durability="flush")
        assert seqs_of(path) == [a, b]
        assert wal.sync_count == 0
        wal.append("t", entries("c"), durability="sync")
        assert wal.sync_count == 1
        wal.sync()
        assert wal.sync_count == 1  # nothing new to sync
        wal.append("t", entries("d"))
        wal.sync()
        assert wal.sync_count == 2
        assert len(seqs_of(path)) == 4


# -- group commit ----------------------------------------------------------------------------


def _append_concurrently(wal: WriteAheadLog, threads: int, per_thread: int) -> list[int]:
    seqs: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(k: int) -> None:
        start.wait(timeout=10)
        for i in range(per_thread):
            seq = wal.append(f"t{k}", entries(f"{k}-{i}"))
            with lock:
                seqs.append(seq)

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in pool)
    return seqs


def test_group_commit_batches_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = wal_mod._fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.02)
        real_fsync(fd)

    monkeypatch.setattr(wal_mod, "_fsync", slow_fsync)
    path = tmp_path / "a.wal"
    with WriteAheadLog.create(path, 1, "sync") as wal:
        seqs = _append_concurrently(wal, threads=16, per_thread=5)
        assert len(seqs) == 80
        # While one leader syncs, the other 15 threads queue up: one sync covers many appends.
        assert wal.sync_count <= 25, wal.sync_count
        assert wal.write_count <= 25, wal.write_count
        syncs = wal.sync_count
    assert sorted(seqs_of(path)) == sorted(seqs)
    assert syncs < len(seqs)


def test_group_commit_batches_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write_all = wal_mod._write_all
    batch_sizes: list[int] = []

    def slow_write_all(fd: int, bufs: list) -> int:
        batch_sizes.append(len(bufs) // 3)
        time.sleep(0.01)
        return real_write_all(fd, bufs)

    path = tmp_path / "a.wal"
    with WriteAheadLog.create(path, 1, "flush") as wal:
        monkeypatch.setattr(wal_mod, "_write_all", slow_write_all)
        seqs = _append_concurrently(wal, threads=12, per_thread=5)
        assert wal.write_count == len(batch_sizes) < 30
        assert max(batch_sizes) > 1
        assert wal.sync_count == 0
    assert seqs_of(path) == sorted(seqs)


# -- torn and corrupt tails ------------------------------------------------------------------


def _three_records(tmp_path: Path) -> tuple[bytes, int, list[int]]:
    """A log of three records: its bytes, the offset of the last record, and the seqs."""
    path = tmp_path / "full.wal"
    with WriteAheadLog.create(path, 3, "flush") as wal:
        seqs = [wal.append("tab", entries("first")), wal.append("tab", entries("second"))]
        last_start = wal.size_bytes
        seqs.append(wal.append("tablet-with-a-longer-key", entries("third", n=2)))
    return path.read_bytes(), last_start, seqs


def test_torn_tail_at_every_offset_of_the_last_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, last_start, seqs = _three_records(tmp_path)
    assert seqs_of(tmp_path / "full.wal") == seqs
    path = tmp_path / "torn.wal"
    path.write_bytes(data)
    caplog.set_level(logging.WARNING, logger=WAL_LOGGER)
    for cut in range(len(data) - 1, last_start - 1, -1):
        os.truncate(path, cut)
        caplog.clear()
        records = list(read_log(path))
        assert [r.seq for r in records] == seqs[:2], cut
        assert records[1].table.equals(entries("second"))
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        if cut == last_start:
            assert warnings == [], cut
        else:
            assert len(warnings) == 1, cut
            assert str(path) in warnings[0] and f"offset {last_start}" in warnings[0]
            assert "torn" in warnings[0] or "short payload" in warnings[0], warnings[0]


def test_flipped_byte_in_the_last_record_is_detected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, last_start, seqs = _three_records(tmp_path)
    path = tmp_path / "flipped.wal"
    path.write_bytes(data)
    caplog.set_level(logging.WARNING, logger=WAL_LOGGER)
    fd = os.open(path, os.O_WRONLY)
    try:
        for pos in range(last_start, len(data)):
            os.pwrite(fd, bytes([data[pos] ^ 0x5A]), pos)
            caplog.clear()
            assert seqs_of(path) == seqs[:2], pos
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and f"offset {last_start}" in warnings[0], pos
            os.pwrite(fd, data[pos : pos + 1], pos)
    finally:
        os.close(fd)
    assert seqs_of(path) == seqs
    # A flip in the payload proper is reported as a checksum mismatch.
    damaged = bytearray(data)
    damaged[last_start + 20] ^= 0x01
    path.write_bytes(bytes(damaged))
    caplog.clear()
    assert seqs_of(path) == seqs[:2]
    assert "checksum mismatch" in caplog.records[-1].getMessage()


def test_zero_filled_tail_ends_replay(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data, _, seqs = _three_records(tmp_path)
    path = tmp_path / "zeros.wal"
    path.write_bytes(data + bytes(4096))
    caplog.set_level(logging.WARNING, logger=WAL_LOGGER)
    assert seqs_of(path) == seqs
    assert "below the minimum" in caplog.records[-1].getMessage()


def test_damage_in_the_middle_raises_unless_point_in_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Intact records after a damaged one: corruption inside the log, not a torn tail (more in
    tests/test_wal_recovery.py)."""
    data, last_start, seqs = _three_records(tmp_path)
    path = tmp_path / "mid.wal"
    damaged = bytearray(data)
    damaged[HEADER_SIZE + 30] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(CorruptFileError, match=f"offset {HEADER_SIZE}.*intact record follows"):
        seqs_of(path)
    caplog.set_level(logging.WARNING, logger=WAL_LOGGER)
    assert [r.seq for r in read_log(path, recovery="point-in-time")] == []
    message = caplog.records[-1].getMessage()
    assert f"offset {HEADER_SIZE}" in message and "bytes from there on are ignored" in message


def _header(magic: bytes = wal_format.MAGIC, version: int = wal_format.FORMAT_VERSION) -> bytes:
    body = struct.pack("<8sHHQ", magic, version, 0, 4)
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "header is 0 bytes"),
        (_header()[:10], "header is 10 bytes"),
        (_header(magic=b"PAR1\0\0\0\0"), "bad magic"),
        (_header(version=99), "format version 99"),
        (_header()[:-1] + b"\0", "header checksum"),
    ],
    ids=["empty", "short", "magic", "version", "crc"],
)
def test_bad_header_raises_naming_the_file(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.wal"
    path.write_bytes(content)
    with pytest.raises(CorruptFileError, match=reason) as info:
        list(read_log(path))
    assert str(path) in str(info.value)
    with pytest.raises(CorruptFileError):
        read_log_header(path)


def test_header_alone_is_an_empty_log(tmp_path: Path) -> None:
    path = tmp_path / "h.wal"
    path.write_bytes(_header())
    assert list(read_log(path)) == []
    assert read_log_header(path).generation == 4


def test_record_of_another_generation_is_corrupt(tmp_path: Path) -> None:
    data, _, _ = _three_records(tmp_path)
    path = tmp_path / "gen.wal"
    body = struct.pack("<8sHHQ", wal_format.MAGIC, wal_format.FORMAT_VERSION, 0, 4)
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)) + data[HEADER_SIZE:])
    with pytest.raises(CorruptFileError, match="generation"):
        list(read_log(path))


# -- a process killed while appending --------------------------------------------------------

_CHILD = r"""
import sys
import pyarrow as pa
from lithify.data.key import ENTRY_SCHEMA
from lithify.tablet.wal import WriteAheadLog

wal = WriteAheadLog.create(sys.argv[1], 7, "flush")
n = 500
for i in range(1_000_000):
    table = pa.table(
        {
            "row": [b"%08d-%04d" % (i, j) for j in range(n)],
            "family": [b"f"] * n,
            "qualifier": [b"q"] * n,
            "visibility": [b""] * n,
            "timestamp": [i] * n,
            "deleted": [False] * n,
            "value": [b"v" * 50] * n,
        },
        schema=ENTRY_SCHEMA,
    )
    seq = wal.append("t", table)
    sys.stdout.write(f"{seq} {i}\n")
    sys.stdout.flush()
"""


def test_kill_9_loses_nothing_acknowledged_with_flush(tmp_path: Path) -> None:
    path = tmp_path / "child.wal"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    lines: list[str] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.decode())

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while len(lines) < 100 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert len(lines) >= 100, "child acknowledged too few appends in time"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert proc.returncode == -signal.SIGKILL
    acked = [int(line.split()[0]) for line in lines if line.endswith("\n")]
    records = list(read_log(path))
    in_log = [r.seq for r in records]
    assert in_log == [make_seq(7, c) for c in range(1, len(in_log) + 1)]
    assert set(acked) <= set(in_log)
    for r in records[-3:]:
        assert r.table.num_rows == 500
        assert r.table.column("timestamp")[0].as_py() == r.seq - make_seq(7, 1)
