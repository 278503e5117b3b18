"""The on-disk format of the write-ahead log, shared by its writer and its reader.

The writer (`lithify.tablet.wal`) and the reader (`lithify.tablet.wal_reader`) both depend on
this module and on nothing of each other, as LevelDB's log_writer and log_reader share
log_format: what a log file looks like is defined once, here.

File layout (little-endian)::

    header  = magic "LITHWAL\\0" | u16 format version | u16 flags (0) | u64 generation
              | u32 crc32 of the preceding 20 bytes
    record  = u32 payload length | u32 crc32 of payload | payload
    payload = u8 record type | u16 tablet length | tablet (utf-8)
              | Arrow IPC stream of the entries (ENTRY_SCHEMA, uncompressed) | u64 sequence number

The sequence number comes last so that the CRC of the large part (the Arrow stream) can be
computed before the appender takes the log's lock, in parallel with other appenders; only the
8-byte tail is checksummed under the lock, once the sequence number is known.

Sequence numbers are `generation << 40 | counter` (counter from 1), so they increase across log
generations as long as generations do (the metadata store hands them out). They fit in a signed
64-bit integer because generations are below 2**23.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from lithify.errors import CorruptFileError

MAGIC = b"LITHWAL\x00"
FORMAT_VERSION = 1

HEADER_BODY = struct.Struct("<8sHHQ")
HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = HEADER_BODY.size + HEADER_CRC.size
FRAME = struct.Struct("<II")
PAYLOAD_HEAD = struct.Struct("<BH")
SEQ = struct.Struct("<Q")
#: The smallest payload a writer produces: type, an empty tablet name, no entries, the seq.
MIN_PAYLOAD = PAYLOAD_HEAD.size + SEQ.size

SEQ_COUNTER_BITS = 40
MAX_GENERATION = 2**23 - 1
MAX_COUNTER = 2**SEQ_COUNTER_BITS - 1
MAX_TABLET_KEY = 2**16 - 1


class RecordType(enum.IntEnum):
    """What a record holds. Only entries so far; the byte leaves room for markers (for example
    'flush started' or 'tablet defined') without a format change."""

    ENTRIES = 1


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One replayed record: its sequence number, the tablet it belongs to, and its entries."""

    seq: int
    tablet: str
    table: pa.Table


@dataclass(frozen=True, slots=True)
class LogHeader:
    version: int
    generation: int


def make_seq(generation: int, counter: int) -> int:
    return generation << SEQ_COUNTER_BITS | counter


def seq_generation(seq: int) -> int:
    return seq >> SEQ_COUNTER_BITS


def parse_header(path: Path, data: bytes) -> LogHeader:
    if len(data) < HEADER_SIZE:
        raise CorruptFileError(
            f"write-ahead log {path}: header is {len(data)} bytes, expected {HEADER_SIZE}"
        )
    magic, version, _flags, generation = HEADER_BODY.unpack_from(data)
    if magic != MAGIC:
        raise CorruptFileError(f"write-ahead log {path}: bad magic {magic!r}, not a lithify log")
    (crc,) = HEADER_CRC.unpack_from(data, HEADER_BODY.size)
    if zlib.crc32(data[: HEADER_BODY.size]) != crc:
        raise CorruptFileError(f"write-ahead log {path}: header checksum mismatch")
    if version != FORMAT_VERSION:
        raise CorruptFileError(
            f"write-ahead log {path}: format version {version}, this lithify reads {FORMAT_VERSION}"
        )
    return LogHeader(version, generation)


def read_log_header(path: str | Path) -> LogHeader:
    """The header of a log; raises CorruptFileError naming the file when it is bad."""
    path = Path(path)
    with open(path, "rb") as f:
        return parse_header(path, f.read(HEADER_SIZE))
