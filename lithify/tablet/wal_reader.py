"""Reading a write-ahead log back (replay after a crash), and what a damaged record means.

Separate from the writer (`lithify.tablet.wal`) because replay shares nothing with appending
but the file format (`lithify.tablet.wal_format`), and runs only when tablets recover.

A crash (kill -9, and for synced records a power loss) can only tear the TAIL of a log: the last
record is short (fewer bytes than its length says) or fails its CRC. A bad record followed by
intact records is something else: corruption inside the log (bit rot, a bad disk, an overwritten
block), and replaying up to it would silently drop acknowledged records after it. So after a
record that fails (short header, impossible length, short payload, bad CRC) the reader looks for
an intact record after it: first at the position the damaged record's length points to, then
(the length itself may be the damaged part) by scanning forward. A candidate is intact if its
frame is well-formed, its CRC holds, its type is known and its sequence number is of this log's
generation and greater than the last good one (records are written in sequence order, so
anything older is not a later record of this log). What happens then is the `recovery` mode
(`tserver.wal.recovery`; RocksDB has the same two):

* `tolerate-tail` (the default): a damaged record with nothing intact after it is a torn tail;
  replay stops there with a warning naming the file, offset and fault. A damaged record with
  intact records after it raises CorruptFileError naming the file, the offset, the fault and
  where the next intact record is, so the tablet server refuses to recover rather than lose
  acknowledged writes without anyone deciding to.
* `point-in-time`: replay stops at the first damaged record, wherever it is, with a warning
  (saying whether intact records follow and are dropped).

One caveat: after a power loss, records that were written but not yet synced may reach the disk
in any order, leaving a hole (typically zeros) before intact later records. Everything after the
last sync is unsynced, so `point-in-time` loses only records that were not acknowledged as
`sync`; `tolerate-tail` refuses such a log, and the operator decides.

The forward scan reads only from the damaged record to the next intact one (or to the end of
the file: for a torn tail that is what the crash left unfinished), so it costs little.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from lithify.data.key import ENTRY_SCHEMA
from lithify.errors import ConfigError, CorruptFileError
from lithify.tablet.wal_format import (
    FRAME,
    HEADER_SIZE,
    MAX_COUNTER,
    MIN_PAYLOAD,
    PAYLOAD_HEAD,
    SEQ,
    LogRecord,
    RecordType,
    make_seq,
    parse_header,
    seq_generation,
)

log = logging.getLogger(__name__)

TOLERATE_TAIL = "tolerate-tail"
POINT_IN_TIME = "point-in-time"
#: The values of `read_log`'s `recovery` (the property `tserver.wal.recovery`).
RECOVERY_MODES = (TOLERATE_TAIL, POINT_IN_TIME)


def parse_recovery(value: str) -> str:
    """The recovery mode `value` names; ConfigError naming the accepted values otherwise."""
    mode = str(value).strip().lower()
    if mode not in RECOVERY_MODES:
        raise ConfigError(
            f"write-ahead log recovery mode {value!r} is not accepted (tserver.wal.recovery); "
            f"accepted values: {', '.join(RECOVERY_MODES)}"
        )
    return mode


def read_log(path: str | Path, *, recovery: str = TOLERATE_TAIL) -> Iterator[LogRecord]:
    """The complete records of a log, in the order written (which is sequence order).

    A torn or corrupt tail (a damaged record with no intact record after it) ends the replay at
    the last good record with a warning. A damaged record followed by an intact one is
    corruption inside the log: with `recovery="tolerate-tail"` (the default) it raises
    CorruptFileError, after yielding the records before it, naming the file, the offset, the
    fault and the next intact record; with `recovery="point-in-time"` replay stops there with a
    warning. A bad header, or a record whose checksum holds but whose contents cannot be decoded
    (a writer bug or a newer format, not a crash), raises CorruptFileError naming the file. The
    mode is checked at once (ConfigError), not when iteration starts.
    """
    return _read_log(Path(path), parse_recovery(recovery))


def _read_log(path: Path, recovery: str) -> Iterator[LogRecord]:
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        header = parse_header(path, f.read(HEADER_SIZE))
        offset = HEADER_SIZE
        last_seq = make_seq(header.generation, 0)
        while True:
            frame = f.read(FRAME.size)
            if not frame:
                return
            fault = None
            length = 0
            available = file_size - offset - FRAME.size
            if len(frame) < FRAME.size:
                fault = f"torn record header ({len(frame)} of {FRAME.size} bytes)"
            else:
                length, crc = FRAME.unpack(frame)
                if length < MIN_PAYLOAD:
                    fault = f"record length {length} is below the minimum {MIN_PAYLOAD}"
                elif length > available:
                    fault = f"short payload ({max(available, 0)} of {length} bytes)"
                else:
                    payload = f.read(length)
                    if len(payload) < length:
                        fault = f"short payload ({len(payload)} of {length} bytes)"
                    elif zlib.crc32(payload) != crc:
                        fault = "checksum mismatch"
            if fault is not None:
                _damaged(f.fileno(), path, file_size, offset, length, fault, last_seq, recovery)
                return
            record = _decode_payload(path, offset, payload)
            if seq_generation(record.seq) != header.generation:
                raise CorruptFileError(
                    f"write-ahead log {path}: record at offset {offset} has sequence number "
                    f"{record.seq} of generation {seq_generation(record.seq)}, the header says "
                    f"{header.generation}"
                )
            yield record
            last_seq = max(last_seq, record.seq)
            offset += FRAME.size + length


def _damaged(
    fd: int,
    path: Path,
    file_size: int,
    offset: int,
    length: int,
    fault: str,
    last_seq: int,
    recovery: str,
) -> None:
    """Judge a damaged record at `offset`: raise for damage inside the log (unless recovery is
    point-in-time), otherwise log the warning that replay stops there."""
    generation = seq_generation(last_seq)
    intact = None
    pointed = offset + FRAME.size + length
    if length >= MIN_PAYLOAD and pointed < file_size:
        intact = _intact_record_at(fd, file_size, pointed, generation, last_seq)
    if intact is None:
        # The length may be the damaged part: look for the next record byte by byte.
        intact = _scan_for_intact_record(fd, file_size, offset + 1, generation, last_seq)
    last = f"sequence number {last_seq}" if last_seq & MAX_COUNTER else "none"
    if intact is not None:
        next_offset, next_seq = intact
        if recovery == TOLERATE_TAIL:
            raise CorruptFileError(
                f"write-ahead log {path}: record at offset {offset} is damaged ({fault}), but an "
                f"intact record follows at offset {next_offset} (sequence number {next_seq}; the "
                f"last good record before the damage: {last}): the log is corrupt inside, not "
                f"torn at its tail, and replaying only up to the damage would lose acknowledged "
                f"writes. Recovery refuses; to recover up to the damage and drop everything "
                f"from offset {offset} on, set tserver.wal.recovery={POINT_IN_TIME}"
            )
        log.warning(
            "write-ahead log %s: replay stops at offset %d: %s (the %d bytes from there on are "
            "ignored, among them intact records from offset %d, sequence number %d, on: dropped "
            "because tserver.wal.recovery=%s)",
            path,
            offset,
            fault,
            file_size - offset,
            next_offset,
            next_seq,
            POINT_IN_TIME,
        )
        return
    after = max(file_size - pointed, 0) if length >= MIN_PAYLOAD else 0
    log.warning(
        "write-ahead log %s: replay stops at offset %d: %s%s",
        path,
        offset,
        fault,
        f" ({after} bytes after the record ignored, no intact record among them)" if after else "",
    )


def _intact_record_at(
    fd: int, file_size: int, pos: int, generation: int, after_seq: int
) -> tuple[int, int] | None:
    """(pos, seq) if a complete record of `generation` newer than `after_seq` starts at `pos`:
    well-formed frame, valid CRC, known type, a tablet key that fits."""
    frame = os.pread(fd, FRAME.size, pos)
    if len(frame) < FRAME.size:
        return None
    length, crc = FRAME.unpack(frame)
    if length < MIN_PAYLOAD or length > file_size - pos - FRAME.size:
        return None
    return _check_candidate(fd, pos, length, crc, generation, after_seq)


def _check_candidate(
    fd: int, pos: int, length: int, crc: int, generation: int, after_seq: int
) -> tuple[int, int] | None:
    tail = os.pread(fd, SEQ.size, pos + FRAME.size + length - SEQ.size)
    if len(tail) < SEQ.size:  # the file shrank under us
        return None
    (seq,) = SEQ.unpack(tail)
    if seq_generation(seq) != generation or seq <= after_seq:
        return None
    payload = os.pread(fd, length, pos + FRAME.size)
    if len(payload) < length or zlib.crc32(payload) != crc:
        return None
    kind, tablet_len = PAYLOAD_HEAD.unpack_from(payload)
    if kind != RecordType.ENTRIES or MIN_PAYLOAD + tablet_len > length:
        return None
    return pos, seq


#: Candidate positions the forward scan examines per step (its arrays are ~20 bytes each).
_SCAN_CHUNK = 1 << 18


def _scan_for_intact_record(
    fd: int, file_size: int, start: int, generation: int, after_seq: int
) -> tuple[int, int] | None:
    """The first (offset, seq) at or after `start` where an intact record of `generation`
    newer than `after_seq` starts, or None.

    Every byte position is a candidate; numpy rules out, a chunk at a time, those whose length
    does not fit the file, whose type byte is not a known type or whose tablet key does not
    fit the length. What remains (a small fraction) is checked one by one: the sequence number
    at the end first (8 bytes), the CRC of the payload last.
    """
    head = FRAME.size + PAYLOAD_HEAD.size  # bytes of a candidate the vector filters read
    last = file_size - FRAME.size - MIN_PAYLOAD  # the last position a record fits at
    pos = start
    while pos <= last:
        n = min(_SCAN_CHUNK, last - pos + 1)
        window = os.pread(fd, n - 1 + head, pos)
        if len(window) < n - 1 + head:  # the file shrank under us
            return None
        lengths = np.ndarray((n,), dtype="<u4", buffer=window, offset=0, strides=(1,))
        crcs = np.ndarray((n,), dtype="<u4", buffer=window, offset=4, strides=(1,))
        kinds = np.ndarray((n,), dtype="u1", buffer=window, offset=FRAME.size, strides=(1,))
        tablet_lens = np.ndarray(
            (n,), dtype="<u2", buffer=window, offset=FRAME.size + 1, strides=(1,)
        )
        room = (file_size - pos - FRAME.size) - np.arange(n, dtype=np.int64)
        lens64 = lengths.astype(np.int64)
        ok = (
            (lens64 >= MIN_PAYLOAD)
            & (lens64 <= room)
            & (kinds == RecordType.ENTRIES)
            & (tablet_lens.astype(np.int64) + MIN_PAYLOAD <= lens64)
        )
        for i in np.flatnonzero(ok).tolist():
            found = _check_candidate(
                fd, pos + i, int(lengths[i]), int(crcs[i]), generation, after_seq
            )
            if found is not None:
                return found
        pos += n
    return None


def _decode_payload(path: Path, offset: int, payload: bytes) -> LogRecord:
    kind, tablet_len = PAYLOAD_HEAD.unpack_from(payload)
    if kind != RecordType.ENTRIES:
        raise CorruptFileError(
            f"write-ahead log {path}: record at offset {offset} has unknown type {kind}"
        )
    start = PAYLOAD_HEAD.size
    end = len(payload) - SEQ.size
    if start + tablet_len > end:
        raise CorruptFileError(
            f"write-ahead log {path}: record at offset {offset} has a tablet key longer than "
            f"the record"
        )
    (seq,) = SEQ.unpack_from(payload, end)
    try:
        tablet = payload[start : start + tablet_len].decode()
        body = pa.py_buffer(payload)[start + tablet_len : end]
        table = pa.ipc.open_stream(body).read_all()
    except (UnicodeDecodeError, pa.ArrowInvalid) as e:
        raise CorruptFileError(
            f"write-ahead log {path}: record at offset {offset} cannot be decoded: {e}"
        ) from None
    if not table.schema.equals(ENTRY_SCHEMA):
        raise CorruptFileError(
            f"write-ahead log {path}: record at offset {offset} has schema {table.schema}, "
            f"expected the entry schema"
        )
    return LogRecord(seq, tablet, table)
