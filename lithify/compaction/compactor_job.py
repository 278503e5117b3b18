"""One compaction: merge input files into one output file under a temporary name.

Internal executors and external compactors both call `run_compaction`; the caller commits by
renaming the temporary file. A large compaction is split into key-range subcompactions that run
in parallel threads (as RocksDB's subcompactions do): each merges its range of every input and
encodes its own part of the output, appending its row groups to the one output file as they are
encoded (see `PartitionedFileWriter`). Splits fall on row boundaries so that no column's versions
span two subcompactions. Each input is read ahead by its own thread so that decoding (which
releases the GIL) overlaps merging and encoding.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa

from lithify.compaction import allocator
from lithify.compaction.iterators import load_iterators
from lithify.compaction.merge import merge_sorted
from lithify.compaction.split_points import split_rows
from lithify.data.key import Key
from lithify.data.ranges import FileRef, RowRange
from lithify.errors import CompactionCancelledError
from lithify.files.naming import tmp_name
from lithify.files.partitioned_writer import PartitionedFileWriter
from lithify.files.reader import SortedFileReader
from lithify.files.storage import Storage
from lithify.files.writer import DEFAULT_COMPRESSION, DEFAULT_ROW_GROUP_SIZE

_POLL_S = 0.05
#: Batches each input is read ahead by its own thread, used only when the compaction has fewer
#: parts than cores. Measured on 2 cores with 2 parts: read-ahead threads cost 20-40% more CPU
#: (buffers allocated in one thread and freed in another defeat the allocator's thread caches)
#: and gained no wall time, since the parts already keep every core busy.
_READ_AHEAD_BATCHES = 1
#: Bytes of merge buffers a compaction aims for (all subcompactions together): each input holds
#: about five batches in flight (read-ahead, buffer, merge round, sort copies, writer). Smaller
#: is faster down to about this size: every page of the process's peak memory is faulted in
#: (and zeroed) once, and the benchmark compaction (10 inputs, 2 parts) at 384 MB peaked at
#: 820 MB RSS with 1.4-3.0 s of kernel time against 0.7 s at 128 MB (510 MB RSS); below 96 MB
#: the extra merge rounds cost more than the faults save.
_MEMORY_BUDGET = 128 << 20
_IN_FLIGHT_BATCHES = 5
_MIN_BATCH = 4096
_JOIN_TIMEOUT_S = 30.0


class RateLimiter(Protocol):
    def acquire(self, nbytes: int) -> None: ...


@dataclass
class CompactionRequest:
    """What to compact. `inputs` are newest first; only rows inside both a file's fence and
    `extent_range` are read."""

    inputs: list[FileRef]
    extent_range: RowRange
    output_path: str
    tmp_id: str
    propagate_deletes: bool
    versions: int | None = 1
    iterators: Sequence[tuple[str, Mapping[str, str]]] = ()
    compression: str = DEFAULT_COMPRESSION
    compression_level: int | None = None
    #: Threads this compaction may keep busy: at most this many key-range subcompactions, and
    #: inputs are read ahead by threads of their own only while there are fewer parts than
    #: this (and than the cores). A process that shares the host with other compactions (a
    #: compactor among several) gives its share of the cores here.
    subcompactions: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: A compaction smaller than this per subcompaction is not split further.
    min_subcompaction_entries: int = 250_000
    batch_size: int = 65536
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE


@dataclass(frozen=True, slots=True)
class CompactionResult:
    tmp_path: str
    final_path: str
    entries_read: int
    entries_written: int
    bytes_read: int
    bytes_written: int
    first_key: Key | None
    last_key: Key | None


class _Progress:
    """Entries read/written per subcompaction; summed when reported."""

    def __init__(self, parts: int) -> None:
        self.read = [0] * parts
        self.written = [0] * parts
        self.bytes_read = [0] * parts

    def totals(self) -> tuple[int, int]:
        return sum(self.read), sum(self.written)


_END = object()


class _ReadAhead(Iterator[pa.RecordBatch]):
    """Pulls batches from `source` in a thread, `depth` batches ahead of the consumer."""

    def __init__(
        self,
        source: Iterator[pa.RecordBatch],
        depth: int,
        stop: threading.Event,
        on_batch: Callable[[pa.RecordBatch], None],
    ) -> None:
        self._q: queue.Queue[object] = queue.Queue(depth)
        self._stop = stop
        self._closed = threading.Event()
        self._source = source
        self._on_batch = on_batch
        self._thread = threading.Thread(target=self._run, name="lithify-read-ahead", daemon=True)
        self._thread.start()

    def _halted(self) -> bool:
        return self._stop.is_set() or self._closed.is_set()

    def _put(self, item: object) -> bool:
        while not self._halted():
            try:
                self._q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for batch in self._source:
                if self._halted():
                    return
                self._on_batch(batch)
                if not self._put(batch):
                    return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            self._put(e)

    def __next__(self) -> pa.RecordBatch:
        while True:
            if self._stop.is_set():
                raise CompactionCancelledError("compaction cancelled")
            try:
                item = self._q.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._q.empty():
                    raise RuntimeError("read-ahead thread ended without a result") from None
                continue
            if item is _END:
                raise StopIteration
            if isinstance(item, BaseException):
                raise item
            return item  # type: ignore[return-value]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(_JOIN_TIMEOUT_S)


class _Counted(Iterator[pa.RecordBatch]):
    """Reads in the consumer's thread, reporting each batch (no read-ahead)."""

    def __init__(
        self, source: Iterator[pa.RecordBatch], on_batch: Callable[[pa.RecordBatch], None]
    ) -> None:
        self._source = source
        self._on_batch = on_batch

    def __next__(self) -> pa.RecordBatch:
        b = next(self._source)
        self._on_batch(b)
        return b

    def close(self) -> None:
        pass


def run_compaction(
    storage: Storage,
    request: CompactionRequest,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    rate_limiter: RateLimiter | None = None,
) -> CompactionResult:
    """Merge `request.inputs` into ONE file at `tmp_name(output_path, tmp_id)`.

    On error or cancellation (CompactionCancelledError) the temporary file is deleted. Progress
    is reported from the calling thread about every 50 ms and at the end.
    """
    req = request
    tmp = tmp_name(req.output_path, req.tmp_id)
    load_iterators(req.iterators)  # fail before any work if an iterator cannot be loaded
    allocator.keep_merge_buffers()
    readers: list[SortedFileReader] = []
    try:
        for f in req.inputs:
            readers.append(SortedFileReader.open(storage, f.path))
        clips = [f.fence.intersect(req.extent_range) for f in req.inputs]
        ranges = _split_ranges(readers, clips, req)
        batch_size = _batch_size(readers, len(ranges), req.batch_size)
    finally:
        for r in readers:
            r.close()

    stop = threading.Event()
    progress = _Progress(len(ranges))
    writer = PartitionedFileWriter(
        storage,
        tmp,
        len(ranges),
        compression=req.compression,
        compression_level=req.compression_level,
        row_group_size=req.row_group_size,
    )

    def run_part(k: int) -> None:
        _run_subcompaction(
            storage, req, clips, ranges[k], writer, k, stop, progress, rate_limiter, batch_size
        )

    try:
        with ThreadPoolExecutor(len(ranges), thread_name_prefix="lithify-subcompaction") as pool:
            futures: list[Future[None]] = [pool.submit(run_part, k) for k in range(len(ranges))]
            try:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=_POLL_S, return_when=FIRST_EXCEPTION)
                    if any(f.exception() is not None for f in done):
                        break
                    if is_cancelled is not None and is_cancelled():
                        stop.set()
                        raise CompactionCancelledError(f"compaction to {tmp} cancelled")
                    if on_progress is not None:
                        on_progress(*progress.totals())
            finally:
                if any(not f.done() or f.exception() is not None for f in futures):
                    stop.set()
            errors = [e for f in futures if (e := f.exception()) is not None]
            if errors:
                # Report the cause, not the cancellations it triggered in the other parts.
                causes = [e for e in errors if not isinstance(e, CompactionCancelledError)]
                raise (causes or errors)[0]
        info = writer.close()
    except BaseException:
        stop.set()
        writer.abort()
        raise
    read, written = progress.totals()
    if on_progress is not None:
        on_progress(read, written)
    return CompactionResult(
        tmp_path=tmp,
        final_path=req.output_path,
        entries_read=read,
        entries_written=written,
        bytes_read=sum(progress.bytes_read),
        bytes_written=info.size,
        first_key=info.first_key,
        last_key=info.last_key,
    )


def _run_subcompaction(
    storage: Storage,
    req: CompactionRequest,
    clips: list[RowRange],
    rng: RowRange,
    writer: PartitionedFileWriter,
    k: int,
    stop: threading.Event,
    progress: _Progress,
    rate_limiter: RateLimiter | None,
    batch_size: int,
) -> None:
    readers: list[SortedFileReader] = []
    feeds: list[_ReadAhead | _Counted] = []
    read_ahead = len(writer.parts) < min(req.subcompactions, os.cpu_count() or 1)
    try:
        for f, clip in zip(req.inputs, clips, strict=True):
            part = clip.intersect(rng)
            if part.is_empty():
                continue
            r = SortedFileReader.open(storage, f.path)
            readers.append(r)
            per_entry = r.size / max(1, r.entries)

            def count(batch: pa.RecordBatch, per_entry: float = per_entry) -> None:
                nbytes = int(batch.num_rows * per_entry)
                progress.bytes_read[k] += nbytes
                if rate_limiter is not None:
                    rate_limiter.acquire(nbytes)

            if read_ahead:
                feeds.append(
                    _ReadAhead(
                        r.batches(part, batch_size=batch_size), _READ_AHEAD_BATCHES, stop, count
                    )
                )
            else:
                feeds.append(_Counted(r.batches(part, batch_size=batch_size), count))

        def report(read: int, written: int) -> None:
            progress.read[k] = read
            progress.written[k] = written

        out = writer.part(k)
        for batch in merge_sorted(
            feeds,
            versions=req.versions,
            propagate_deletes=req.propagate_deletes,
            batch_size=batch_size,
            iterators=load_iterators(req.iterators),
            on_progress=report,
            is_cancelled=stop.is_set,
        ):
            before = out.bytes_written
            out.write(batch)
            if rate_limiter is not None and out.bytes_written > before:
                rate_limiter.acquire(out.bytes_written - before)
        out.close()
    finally:
        for feed in feeds:
            feed.close()
        for r in readers:
            r.close()


def _batch_size(readers: Sequence[SortedFileReader], parts: int, limit: int) -> int:
    """Entries per batch so that all parts' buffers fit `_MEMORY_BUDGET` (at most `limit`).

    Memory is bounded by inputs x parts x batch, not by input size; the batch shrinks when a
    compaction has many inputs or many subcompactions.
    """
    if not readers:
        return limit
    entry_bytes = max(r.uncompressed_entry_bytes() for r in readers)
    per_batch_entry = len(readers) * parts * _IN_FLIGHT_BATCHES * max(1.0, entry_bytes)
    return max(min(limit, _MIN_BATCH), min(limit, int(_MEMORY_BUDGET / per_batch_entry)))


def _split_ranges(
    readers: Sequence[SortedFileReader], clips: Sequence[RowRange], req: CompactionRequest
) -> list[RowRange]:
    """Key ranges (split on rows) holding roughly equal numbers of input entries, estimated from
    the `row` statistics of the inputs' row groups (see `split_points`); a compaction smaller
    than `min_subcompaction_entries` per part is not split further."""
    groups: list[tuple[bytes, bytes, int]] = []
    for r, clip in zip(readers, clips, strict=True):
        if clip.is_empty():
            continue
        for lo, hi, n in r.row_group_stats():
            if n and lo is not None and hi is not None and clip.overlaps(RowRange.rows(lo, hi)):
                groups.append((lo, hi, n))
    total = sum(n for _, _, n in groups)
    parts = max(1, min(req.subcompactions, total // max(1, req.min_subcompaction_entries)))
    bounds = split_rows(groups, parts)
    ranges = []
    prev: bytes | None = None
    for b in [*bounds, None]:
        ranges.append(RowRange(prev, b, start_inclusive=False, end_inclusive=True))
        prev = b
    return ranges
