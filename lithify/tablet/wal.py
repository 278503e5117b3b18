"""The write-ahead log: every write is appended here before it reaches a tablet's in-memory map.

One log file per tablet-server generation is shared by all the tablets the server hosts (as in
Accumulo), so one write, and for `sync` one fsync, can cover the records of many tablets at once
(group commit). After a crash, a tablet replays the records newer than its last flush.

Durability of an acknowledged append: `none` (may still sit in this process's buffer and is lost
if the process dies), `flush` (handed to the operating system: survives kill -9 of the process,
not a power loss), `sync` (fdatasync'ed: survives a power loss). A `none` record does not sit in
the buffer indefinitely: a daemon thread of the log (started by the first `none` append, stopped
by `close`) writes buffered `none` records out at most `flush_interval_s` after they were
appended (`tserver.wal.flush.interval`, default 1s; 0: only when the buffer fills or a later
`flush`/`sync` append, `flush()`, `sync()` or `close()` writes them).

The file format (header, record framing, sequence numbers) is defined in
`lithify.tablet.wal_format`; reading a log back, and what a damaged record means, in
`lithify.tablet.wal_reader`.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
import zlib
from pathlib import Path

import pyarrow as pa

from lithify.data.key import ENTRY_SCHEMA
from lithify.errors import ConfigError, LithifyError
from lithify.tablet.wal_format import (
    FORMAT_VERSION,
    FRAME,
    HEADER_BODY,
    HEADER_CRC,
    HEADER_SIZE,
    MAGIC,
    MAX_COUNTER,
    MAX_GENERATION,
    MAX_TABLET_KEY,
    PAYLOAD_HEAD,
    SEQ,
    RecordType,
    make_seq,
)

log = logging.getLogger(__name__)

#: os.writev takes at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_MAX = 1024


class Durability(enum.IntEnum):
    """How far an append has got before it is acknowledged; ordered, so `>=` means 'at least'."""

    NONE = 0
    FLUSH = 1
    SYNC = 2

    @staticmethod
    def parse(value: str | Durability) -> Durability:
        if isinstance(value, Durability):
            return value
        try:
            return Durability[str(value).strip().upper()]
        except KeyError:
            raise ConfigError(
                f"durability {value!r} is not accepted; accepted values: none, flush, sync"
            ) from None


class LogClosedError(LithifyError):
    """An append to a write-ahead log that was closed (or failed: see the cause)."""


# Looked up at call time so tests can slow it down to observe group commit.
_fsync = getattr(os, "fdatasync", os.fsync)


class _PartsSink:
    """A file-like sink that keeps what Arrow's IPC writer hands it instead of copying it.

    Through `pa.PythonFile` the writer passes the column buffers themselves (as `pa.Buffer`,
    no copy) and small `bytes` for metadata and padding; the parts go to `writev` as they are.
    Encoding into one contiguous buffer instead copied every append (10 MB for 100,000 entries)
    into freshly allocated memory, and under load its page faults made encoding as slow as the
    write itself.
    """

    __slots__ = ("parts", "size", "closed")

    def __init__(self) -> None:
        self.parts: list[bytes | pa.Buffer] = []
        self.size = 0
        self.closed = False

    def write(self, data: bytes | pa.Buffer) -> int:
        n = memoryview(data).nbytes
        if n:
            self.parts.append(data)
            self.size += n
        return n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _encode_entries(table: pa.Table) -> tuple[list[bytes | pa.Buffer], int]:
    """The entries as an uncompressed Arrow IPC stream: its parts in order, and its size.

    Uncompressed because lz4 made encoding about 6x slower for little gain on typical values,
    and the log is written once and read only after a crash. The parts share memory with the
    table's (immutable) buffers wherever Arrow allows: sliced variable-width columns get
    rebased offsets, everything else is referenced, not copied. `append` copies them only for
    a `none` append, the one kind that returns before its record is written.
    """
    if not table.schema.equals(ENTRY_SCHEMA):
        table = table.cast(ENTRY_SCHEMA)
    sink = _PartsSink()
    with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), ENTRY_SCHEMA) as writer:
        writer.write_table(table)
    return sink.parts, sink.size


def _write_all(fd: int, bufs: list) -> int:
    """Write every buffer in order with as few system calls as possible; returns calls made."""
    calls = 0
    i = 0
    while i < len(bufs):
        chunk = bufs[i : i + _IOV_MAX]
        want = sum(memoryview(b).nbytes for b in chunk)
        done = os.writev(fd, chunk)
        calls += 1
        if done < want:
            # A short write (rare on regular files): finish this chunk one buffer at a time.
            for b in chunk:
                mv = memoryview(b).cast("B")
                if done >= mv.nbytes:
                    done -= mv.nbytes
                    continue
                mv = mv[done:]
                done = 0
                while mv.nbytes:
                    n = os.write(fd, mv)
                    calls += 1
                    mv = mv[n:]
        i += _IOV_MAX
    return calls


def _fsync_dir(path: Path) -> None:
    """Make a new file's name durable, so a synced log is not lost with its directory entry."""
    try:
        dfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


class WriteAheadLog:
    """An append-only log shared by the tablets of one server generation; thread-safe.

    Group commit is leader/follower: an appender puts its framed record on the pending list and,
    if no write is in progress, becomes the leader and writes everything pending with one
    `writev` (and one fdatasync if any waiting appender asked for `sync`); appenders that arrive
    meanwhile wait on a condition and are covered by the next leader's write. A single-threaded
    appender is always the leader, so it never pays for a hand-off to another thread: a
    dedicated writer thread measured 5-10% slower for one appender of 10,000-entry batches
    (about 720 against 660 us per append with `flush`).
    """

    def __init__(
        self,
        path: Path,
        fd: int,
        generation: int,
        durability: Durability,
        buffer_bytes: int,
        wait_timeout_s: float,
        flush_interval_s: float = 1.0,
    ) -> None:
        """Use `WriteAheadLog.create`; this wraps an open file whose header is written."""
        if not flush_interval_s >= 0:
            raise ValueError(f"flush interval {flush_interval_s!r} is negative")
        self._path = path
        self._fd = fd
        self._generation = generation
        self._durability = durability
        self._buffer_bytes = buffer_bytes
        self._wait_timeout_s = wait_timeout_s
        self._flush_interval_s = flush_interval_s
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        #: Wakes the timed flusher; separate from `_cond` so appends never wake group-commit
        #: waiters for it (and its waits never steal their notifications).
        self._flush_cond = threading.Condition(self._lock)
        self._flusher: threading.Thread | None = None
        #: When the oldest `none` record still in `_pending` was appended (None: there is none).
        self._none_pending_since: float | None = None
        self._counter = 0
        self._pending: list = []
        self._pending_bytes = 0
        self._appended_seq = 0
        self._written_seq = 0
        self._synced_seq = 0
        self._sync_wanted_seq = 0
        self._writing = False
        self._closed = False
        self._failed: BaseException | None = None
        self._size = HEADER_SIZE
        self._records = 0
        self._write_batches = 0
        self._write_calls = 0
        self._sync_count = 0

    @classmethod
    def create(
        cls,
        path: str | Path,
        generation: int,
        durability: str | Durability = "flush",
        *,
        buffer_bytes: int = 1 << 20,
        wait_timeout_s: float = 300.0,
        flush_interval_s: float = 1.0,
    ) -> WriteAheadLog:
        """Create a new log file (never an existing one: that would destroy its records).

        `durability` is the default for appends that do not say otherwise. `buffer_bytes` is how
        much `none` appends may accumulate in the process before they are written out.
        `wait_timeout_s` bounds how long an append waits for another thread's write or fsync.
        `flush_interval_s` bounds how long a `none` record stays in that buffer: a thread of
        the log writes it out at most this long after its append (0: only when the buffer
        fills, or a later append, `flush`, `sync` or `close` writes it).
        The header is synced, with the directory, before this returns.
        """
        if not flush_interval_s >= 0:
            raise ValueError(f"flush interval {flush_interval_s!r} is negative")
        path = Path(path)
        if not (0 <= generation <= MAX_GENERATION):
            raise ValueError(f"log generation {generation} is outside [0, {MAX_GENERATION}]")
        level = Durability.parse(durability)
        body = HEADER_BODY.pack(MAGIC, FORMAT_VERSION, 0, generation)
        header = body + HEADER_CRC.pack(zlib.crc32(body))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0))
        try:
            _write_all(fd, [header])
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        _fsync_dir(path.parent)
        return cls(path, fd, generation, level, buffer_bytes, wait_timeout_s, flush_interval_s)

    # -- properties ---------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def durability(self) -> str:
        return self._durability.name.lower()

    @property
    def size_bytes(self) -> int:
        """Bytes appended so far, including records still buffered in the process."""
        return self._size

    @property
    def last_seq(self) -> int:
        """The sequence number of the latest append (0 when none yet)."""
        return make_seq(self._generation, self._counter) if self._counter else 0

    @property
    def record_count(self) -> int:
        return self._records

    @property
    def write_count(self) -> int:
        """Group-commit batches written (each one `writev` unless a batch exceeds IOV_MAX)."""
        return self._write_batches

    @property
    def write_calls(self) -> int:
        """System calls made to write records."""
        return self._write_calls

    @property
    def sync_count(self) -> int:
        """fdatasync calls made for appends, `sync()` and `close()` (not the header's)."""
        return self._sync_count

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def flush_interval_s(self) -> float:
        """How long a `none` record may stay buffered in the process (0: until the buffer fills)."""
        return self._flush_interval_s

    # -- appending ----------------------------------------------------------------------------

    def append(
        self, tablet: str, table: pa.Table, *, durability: str | Durability | None = None
    ) -> int:
        """Append one record of `tablet`'s entries; returns its sequence number once durable.

        `durability` overrides the log's default for this append, because durability is a table
        property while the log is shared by all tables. Acknowledging an append also makes every
        earlier append at least as durable (records are written in sequence order).
        """
        level = self._durability if durability is None else Durability.parse(durability)
        tablet_bytes = tablet.encode()
        if len(tablet_bytes) > MAX_TABLET_KEY:
            raise ValueError(f"tablet key of {len(tablet_bytes)} bytes is too long for the log")
        body, body_size = _encode_entries(table)
        if level == Durability.NONE:
            # The record outlives this call in the buffer: copy it, so that what is written
            # later is what was checksummed now even if the caller then reuses its memory.
            body = [b"".join(body)]
        head = PAYLOAD_HEAD.pack(RecordType.ENTRIES, len(tablet_bytes)) + tablet_bytes
        crc = zlib.crc32(head)
        for part in body:
            crc = zlib.crc32(part, crc)
        payload_len = len(head) + body_size + SEQ.size
        with self._lock:
            self._check_usable()
            if self._counter >= MAX_COUNTER:
                raise LogClosedError(
                    f"write-ahead log {self._path} is out of sequence numbers; roll to a new one"
                )
            self._counter += 1
            seq = make_seq(self._generation, self._counter)
            tail = SEQ.pack(seq)
            frame = FRAME.pack(payload_len, zlib.crc32(tail, crc))
            self._pending.append(frame + head)
            self._pending += body
            self._pending.append(tail)
            self._pending_bytes += FRAME.size + payload_len
            self._appended_seq = seq
            self._size += FRAME.size + payload_len
            self._records += 1
            if level == Durability.NONE:
                if self._pending_bytes >= self._buffer_bytes and not self._writing:
                    self._lead()
                elif self._none_pending_since is None and self._flush_interval_s > 0:
                    self._none_pending_since = time.monotonic()
                    if self._flusher is None:
                        self._start_flusher()
                    else:
                        self._flush_cond.notify()
                return seq
            if level == Durability.SYNC:
                self._sync_wanted_seq = seq
            self._await(seq, level)
            return seq

    def flush(self) -> None:
        """Hand every appended record to the operating system (no fsync)."""
        with self._lock:
            self._check_usable()
            if self._appended_seq:
                self._await(self._appended_seq, Durability.FLUSH)

    def sync(self) -> None:
        """Make every appended record durable on disk."""
        with self._lock:
            self._check_usable()
            target = self._appended_seq
            if target and self._synced_seq < target:
                self._sync_wanted_seq = max(self._sync_wanted_seq, target)
                self._await(target, Durability.SYNC)

    def close(self) -> None:
        """Write and sync what is buffered, then close the file. Idempotent.

        A log that failed is closed without writing more: its buffer may follow a torn record.
        The timed flusher, if any, stops.
        """
        with self._lock:
            flusher = self._flusher
            if self._closed:
                return
            try:
                if self._failed is None:
                    target = self._appended_seq
                    if target and self._synced_seq < target:
                        self._sync_wanted_seq = max(self._sync_wanted_seq, target)
                        self._await(target, Durability.SYNC)
                else:
                    self._wait_idle()
            finally:
                self._closed = True
                self._pending = []
                self._none_pending_since = None
                self._cond.notify_all()
                self._flush_cond.notify_all()
                if not self._writing:
                    os.close(self._fd)
                # else: a leader stuck in I/O past the wait closes the file when it returns.
        if flusher is not None and flusher is not threading.current_thread():
            # It only needs the lock to see `_closed`; a flusher waiting on a write stuck in
            # I/O was woken above too. It is a daemon, so a bounded join is enough.
            flusher.join(timeout=10)

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WriteAheadLog({str(self._path)!r}, generation={self._generation})"

    # -- group commit (all called with self._lock held) ----------------------------------------

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise LogClosedError(
                f"write-ahead log {self._path} failed earlier: {self._failed!r}"
            ) from self._failed
        if self._closed:
            raise LogClosedError(f"write-ahead log {self._path} is closed")

    def _reached(self, seq: int, level: Durability) -> bool:
        if level == Durability.SYNC:
            return self._synced_seq >= seq
        return self._written_seq >= seq

    def _await(self, seq: int, level: Durability) -> None:
        """Return once `seq` is durable to `level`, leading a write when nobody else is."""
        deadline = time.monotonic() + self._wait_timeout_s
        while not self._reached(seq, level):
            if self._failed is not None or self._closed:
                self._check_usable()
            if not self._writing:
                self._lead()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LithifyError(
                    f"write-ahead log {self._path}: append {seq} not durable after "
                    f"{self._wait_timeout_s:.0f}s (the disk is stuck?)"
                )
            self._cond.wait(remaining)

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self._wait_timeout_s
        while self._writing and time.monotonic() < deadline:
            self._cond.wait(deadline - time.monotonic())

    def _lead(self) -> None:
        """Write everything pending (and fsync if a waiting appender needs it) as one batch.

        The lock is released during the I/O so that other appenders can queue the next batch.
        An I/O error fails the log for good: after a failed write or fsync the file's state is
        unknown, so nobody may be told that a later record is durable.
        """
        bufs, self._pending, self._pending_bytes = self._pending, [], 0
        self._none_pending_since = None
        last = self._appended_seq
        do_sync = self._sync_wanted_seq > self._synced_seq
        self._writing = True
        self._lock.release()
        calls = 0
        error: BaseException | None = None
        try:
            if bufs:
                calls = _write_all(self._fd, bufs)
            if do_sync:
                _fsync(self._fd)
        except BaseException as e:
            error = e
        finally:
            self._lock.acquire()
            self._writing = False
            self._cond.notify_all()
        if self._closed:
            os.close(self._fd)
            raise LogClosedError(f"write-ahead log {self._path} was closed during a write")
        if error is not None:
            self._failed = error
            log.error("write-ahead log %s failed: %r", self._path, error)
            raise LogClosedError(f"write-ahead log {self._path} failed: {error!r}") from error
        if bufs:
            self._written_seq = last
            self._write_batches += 1
            self._write_calls += calls
        if do_sync:
            self._synced_seq = self._written_seq
            self._sync_count += 1

    # -- the timed flush of `none` records ------------------------------------------------------

    def _start_flusher(self) -> None:
        """Start the thread that bounds how long `none` records stay buffered (lock held)."""
        self._flusher = threading.Thread(
            target=self._flush_loop, name=f"wal-flush-{self._generation}", daemon=True
        )
        self._flusher.start()

    def _flush_loop(self) -> None:
        """Write buffered `none` records out once the oldest is `flush_interval_s` old.

        It writes through `_await`, as `flush()` does, so it is one more appender to the group
        commit: it leads a write when nobody else is writing, or waits for the write in
        progress and then leads one for what is still pending. Sleeps while nothing is buffered;
        ends when the log is closed or fails.
        """
        interval = self._flush_interval_s
        with self._lock:
            while not self._closed and self._failed is None:
                since = self._none_pending_since
                if since is None:
                    self._flush_cond.wait()
                    continue
                remaining = since + interval - time.monotonic()
                if remaining > 0:
                    self._flush_cond.wait(remaining)
                    continue
                try:
                    self._await(self._appended_seq, Durability.FLUSH)
                except LogClosedError:
                    return
                except LithifyError as e:  # a write stuck past wait_timeout_s: try again
                    log.warning("write-ahead log %s: timed flush: %s", self._path, e)
                except Exception as e:  # not expected: _lead raises LogClosedError on failure
                    log.error("write-ahead log %s: timed flush failed: %r", self._path, e)
                    return
