"""A hosted tablet: its in-memory map, its files, and the operations that change them.

Writes go to the shared write-ahead log, then to the in-memory map. A flush (minor compaction)
freezes the map, writes it to an `F` file and records the file in the metadata together with the
sequence number it covers, so recovery replays only newer log records. Scans merge the map, the
frozen maps not yet flushed, and the files, each file read through its fence and the tablet's
extent.

Freezing and flushing are separate steps so that writes need not wait for a flush: `freeze()`
(cheap, no I/O) moves the live map to a queue of frozen maps and a fresh map takes the writes;
`flush()` writes the queued maps to files oldest first. The server freezes a map as soon as
memory passes its limit, so every flushed map has about the limit's size however late the flush
thread gets to it, and writers block only when live and frozen maps together fill the memory.
Maps are committed strictly in freezing order: a map's entries all have higher sequence numbers
than an older map's, so each commit's `flushed_seq` covers exactly the flushed maps, and the
logs that a queued map still needs stay listed in the metadata until it is flushed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from lithify.compaction.merge import merge_sorted
from lithify.data.ranges import Extent, FileRef, RowRange
from lithify.errors import LithifyError
from lithify.files.in_use import FilesInUse
from lithify.files.naming import new_file_name
from lithify.files.reader import SortedFileReader
from lithify.files.storage import Storage
from lithify.files.writer import SortedFileWriter
from lithify.metadata.store import MetadataStore, TabletMeta
from lithify.table.properties import Properties
from lithify.tablet.clock import TabletClock
from lithify.tablet.log_manager import LogManager
from lithify.tablet.memtable import InMemoryMap
from lithify.tablet.wal_format import LogRecord

log = logging.getLogger(__name__)

#: A write waits at most this many tenths of a second for a split or merge of its tablet.
WRITE_BLOCK_WAITS = 600


class TabletRetiredError(LithifyError):
    """The tablet was split or merged away; the write must be routed again."""


@dataclass
class FlushTotals:
    """Files, entries and bytes written by the flushes of a server's tablets.

    Write amplification is (bytes flushed + bytes compacted) / bytes flushed; the compaction
    side is counted by the compaction driver, the flush side only here.
    """

    files: int = 0
    entries: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, ref: FileRef) -> None:
        with self.lock:
            self.files += 1
            self.entries += ref.entries
            self.bytes += ref.size

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {"files": self.files, "entries": self.entries, "bytes": self.bytes}


@dataclass
class TabletContext:
    """What a tablet needs from the server that hosts it."""

    storage: Storage
    meta: MetadataStore
    logs: LogManager
    table_props: Callable[[str], Properties]
    on_files_changed: Callable[[Extent], None]
    in_use: FilesInUse
    flushes: FlushTotals = field(default_factory=FlushTotals)


@dataclass
class _Frozen:
    """A frozen map waiting for (or in) a flush, with the logs that hold its entries."""

    map: InMemoryMap
    logs: set[str]


def tablet_key(extent: Extent) -> str:
    """The name of a tablet in write-ahead log records."""
    end = "~" if extent.end_row is None else extent.end_row.hex()
    return f"{extent.table_id};{end}"


def newest_first(files: Iterable[FileRef]) -> list[FileRef]:
    """Files in the order a merge wants them: names carry a time-sortable id, newest first."""
    return sorted(files, key=lambda f: f.path.rsplit("/", 1)[-1][1:], reverse=True)


class Tablet:
    def __init__(self, meta: TabletMeta, ctx: TabletContext) -> None:
        self.extent = meta.extent
        self.key = tablet_key(meta.extent)
        self._ctx = ctx
        self._meta = meta
        self._lock = threading.RLock()
        self._flush_lock = threading.Lock()
        #: Writes wait while a split or merge replaces this tablet, then fail once it is gone.
        self._writes_cv = threading.Condition(self._lock)
        self._writes_blocked = False
        self._retired = False
        self._memtable = InMemoryMap()
        self._memtable_logs: set[str] = set()
        #: When the live map got its first entry (time.monotonic()), None while it is empty.
        self._live_since: float | None = None
        #: Frozen maps not yet committed to a file, oldest first.
        self._frozen: list[_Frozen] = []
        self.clock = TabletClock()

    # -- metadata ---------------------------------------------------------------------------

    @property
    def meta(self) -> TabletMeta:
        return self._meta

    @property
    def files(self) -> tuple[FileRef, ...]:
        return self._meta.files

    def refresh(self) -> TabletMeta:
        """Re-read this tablet's metadata (after a commit made elsewhere).

        A read that raced with this process's own update (which keeps its result) may be older
        than what is held; versions only grow, so the older one is ignored.
        """
        fresh = self._ctx.meta.get_tablet(self.extent)
        with self._lock:
            if fresh is not None and fresh.version >= self._meta.version:
                self._meta = fresh
            return self._meta

    def mutate(self, fn: Callable[[TabletMeta], TabletMeta | None]) -> TabletMeta | None:
        """Conditionally update this tablet's metadata and keep the result.

        Returns the new metadata, or None when nothing was written: `fn` wanted no change, or
        the tablet no longer exists (deleted, split or merged away).
        """
        result = self._ctx.meta.mutate_tablet(self.extent, fn)
        with self._lock:
            if result is not None:
                # Another thread may have committed a newer version meanwhile (this thread
                # waited for the lock): keep the newer one. A stale copy would list logs the
                # metadata no longer holds, and a write trusting it would add no reference.
                if result.version >= self._meta.version:
                    self._meta = result
            else:
                self.refresh()
        return result

    # -- writes -------------------------------------------------------------------------------

    def write(self, entries: pa.Table) -> int:
        """Log and apply entries (all inside this extent); returns the log sequence number."""
        durability = self._ctx.table_props(self.extent.table_id)["table.durability"]
        with self._lock:
            for _ in range(WRITE_BLOCK_WAITS):
                if self._retired:
                    raise TabletRetiredError(f"tablet {self.extent} was split or merged away")
                if not self._writes_blocked:
                    break
                self._writes_cv.wait(0.1)
            else:
                raise LithifyError(f"tablet {self.extent}: writes blocked for too long")
            stamped = self.clock.assign(entries)
            with self._ctx.logs.writing() as wal:
                seq = wal.append(self.key, stamped, durability=durability)
                log_path = str(wal.path)
                if log_path not in self._meta.logs:
                    self._add_log_ref(log_path)
            self._memtable.add(stamped, seq)
            self._memtable_logs.add(log_path)
            if self._live_since is None:
                self._live_since = time.monotonic()
            return seq

    def block_writes(self) -> None:
        """Hold new writes (in-flight ones finish first) while a split or merge replaces it."""
        with self._lock:
            self._writes_blocked = True

    def unblock_writes(self) -> None:
        with self._writes_cv:
            self._writes_blocked = False
            self._writes_cv.notify_all()

    def retire(self) -> None:
        """The tablet was replaced: held and later writes fail with TabletRetiredError, so the
        store routes them to the tablets that replaced it."""
        with self._writes_cv:
            self._retired = True
            self._writes_cv.notify_all()

    def _add_log_ref(self, log_path: str) -> None:
        def add(m: TabletMeta) -> TabletMeta | None:
            if log_path in m.logs:
                return None
            return m.replace(logs=(*m.logs, log_path))

        self.mutate(add)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the live map (the one taking writes)."""
        return self._memtable.size_bytes

    @property
    def flushing_bytes(self) -> int:
        """Bytes of the frozen maps waiting for or in a flush."""
        with self._lock:
            return sum(f.map.size_bytes for f in self._frozen)

    @property
    def frozen_maps(self) -> int:
        """Frozen maps waiting for or in a flush."""
        return len(self._frozen)

    # -- flush (minor compaction) -----------------------------------------------------------

    def freeze(self) -> bool:
        """Queue the live map for a flush and start a fresh one; False if it was empty.

        No I/O: the server calls this from the writing thread as soon as memory passes its
        limit, and a flush (now or later, in another thread) writes the frozen map.
        """
        with self._lock:
            return self._freeze_locked()

    def freeze_if_older(self, age_s: float) -> bool:
        """`freeze` the live map if its first entry was written `age_s` or more ago."""
        with self._lock:
            since = self._live_since
            if since is None or time.monotonic() - since < age_s:
                return False
            return self._freeze_locked()

    def _freeze_locked(self) -> bool:
        if self._memtable.entries == 0:
            return False
        self._frozen.append(_Frozen(self._memtable, self._memtable_logs))
        self._memtable = InMemoryMap()
        self._memtable_logs = set()
        self._live_since = None
        return True

    def flush(self, *, live: bool = True) -> FileRef | None:
        """Write the frozen maps to F files, oldest first; returns the last file (None if none).

        With `live` the live map is frozen first, so everything written before the call ends up
        in files (what an explicit flush, split or merge needs); without it only maps already
        frozen are written (a background flush, which must not make tiny files of the maps
        written meanwhile). If writing or committing a map fails, it stays queued (still read
        by scans, its logs still listed) for the next flush, so a failed flush loses nothing.
        """
        ref = None
        with self._flush_lock:
            if live:
                self.freeze()
            # The maps frozen by now, and no more: a split or merge (writes held) needs them
            # all, and a background flush must not chase writers that keep freezing new ones.
            with self._lock:
                queued = len(self._frozen)
            for _ in range(queued):
                with self._lock:
                    oldest = self._frozen[0]
                ref = self._flush_frozen(oldest)
        return ref

    def _flush_frozen(self, frozen: _Frozen) -> FileRef:
        """Write one frozen map (the oldest) to an F file and commit it."""
        path = new_file_name("F", self.extent.table_id)
        with self._ctx.in_use.using([path]):
            ref = self._write_flush_file(frozen.map, path)
            # Writes wait while the commit replaces the log references: a write that found its
            # log listed in the old metadata (so added no reference) must not land in memory
            # between `_commit_flush` reading the maps' logs and the new metadata taking effect,
            # or its log would be unreferenced and a crash would lose an acknowledged write.
            with self._lock:
                self.mutate(lambda m: self._commit_flush(m, ref, frozen))
                # After the commit, so that a scan always sees the entries in the map or the file.
                self._frozen.remove(frozen)
        log.info(
            "Flushed %s created %s entries %d size %d", self.extent, ref.path, ref.entries, ref.size
        )
        self._ctx.flushes.add(ref)
        self._ctx.on_files_changed(self.extent)
        return ref

    def _commit_flush(self, m: TabletMeta, ref: FileRef, frozen: _Frozen) -> TabletMeta:
        """The metadata with the flushed map's file added: its entries no longer need a log,
        but the live map's and the other frozen maps' entries still do. The tablet's time is
        recorded too: after a restart no log may be left to replay, and the clock must still
        start past every timestamp handed out."""
        with self._lock:
            needed = set(self._memtable_logs)
            for other in self._frozen:
                if other is not frozen:
                    needed |= other.logs
        assert frozen.map.max_seq is not None  # only non-empty maps are frozen
        return m.replace(
            files=(*m.files, ref),
            flushed_seq=max(m.flushed_seq, frozen.map.max_seq),
            logs=tuple(sorted(needed)),
            time=max(m.time, self.clock.last),
        )

    def _write_flush_file(self, frozen: InMemoryMap, path: str) -> FileRef:
        props = self._ctx.table_props(self.extent.table_id)
        # Flush files have a codec of their own (`table.minc.compress.type`): a flush must keep
        # up with ingest, and its file is soon rewritten by a compaction with the table's codec.
        writer = SortedFileWriter(
            self._ctx.storage, path, compression=props["table.minc.compress.type"]
        )
        try:
            batches = merge_sorted(
                [frozen.sorted_table().to_batches()],
                versions=props.get_int("table.versions"),
                propagate_deletes=True,
            )
            for batch in batches:
                writer.write(batch)
            info = writer.close()
        except BaseException:
            writer.abort()
            raise
        return FileRef(path, info.size, info.entries)

    # -- recovery ---------------------------------------------------------------------------

    def recover(self, records: Iterable[LogRecord]) -> int:
        """Replay this tablet's log records newer than its last flush; returns entries replayed."""
        replayed = 0
        with self._lock:
            for rec in records:
                if rec.tablet != self.key or rec.seq <= self._meta.flushed_seq:
                    continue
                inside = _inside(rec.table, self.extent.range)
                if inside.num_rows:
                    self._memtable.add(inside, rec.seq)
                    if self._live_since is None:
                        self._live_since = time.monotonic()
                    self.clock.observe_table(inside)
                    replayed += inside.num_rows
            self._memtable_logs = set(self._meta.logs)
        return replayed

    # -- scans ------------------------------------------------------------------------------

    def scan_sources(self, rng: RowRange) -> tuple[list[Iterable[pa.RecordBatch]], list[FileRef]]:
        """Newest-first sources for a merge over `rng` (already clipped to the extent).

        Returns the sources and the files they read, so the caller can mark them in use.
        """
        with self._lock:
            maps = [self._memtable, *(f.map for f in reversed(self._frozen))]
            files = newest_first(self._meta.files)
        sources: list[Iterable[pa.RecordBatch]] = [m.sorted_table(rng).to_batches() for m in maps]
        sources += [self._file_batches(f, rng) for f in files]
        return sources, files

    def _file_batches(self, f: FileRef, rng: RowRange) -> Iterator[pa.RecordBatch]:
        """Batches of `f` inside its fence and `rng`; the file is open only while iterated."""
        clip = f.fence.intersect(rng)
        if clip.is_empty():
            return
        with SortedFileReader.open(self._ctx.storage, f.path) as reader:
            yield from reader.batches(clip)


def _inside(table: pa.Table, rng: RowRange) -> pa.Table:
    mask = rng.mask(table.column("row"))
    return table if mask is None else table.filter(mask)
