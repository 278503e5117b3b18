"""The embedded store: `lithify.open(path)` hosts every tablet of a store in this process.

It wires the pieces together: the metadata store (SQLite beside the data by default), the
filesystem layer, the shared write-ahead log, the hosted tablets, background flushes, table
operations (create, delete, properties, split, merge, offline/online, bulk import), scans,
full compactions and the garbage collector.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from lithify.compaction.executor import QueuedJob
from lithify.compaction.iterators import load_iterators
from lithify.compaction.manager import CompactionManager, ExternalSink
from lithify.compaction.merge import merge_sorted
from lithify.compaction.spi import CompactionKind
from lithify.data.key import ENTRY_SCHEMA, Key
from lithify.data.mutation import Mutation, mutations_to_table, validate_entries
from lithify.data.ranges import FULL_RANGE, Extent, FileRef, RowRange
from lithify.errors import (
    CompactionCancelledError,
    ConditionalUpdateError,
    InvalidMutationError,
    LithifyError,
    TableOfflineError,
)
from lithify.files.bulk import validate_import_file
from lithify.files.in_use import FilesInUse
from lithify.files.naming import new_file_name
from lithify.files.storage import Storage
from lithify.gc import collect_garbage, find_garbage
from lithify.metadata.store import MetadataStore, TableInfo, TabletMeta
from lithify.table import splits as split_ops
from lithify.table.properties import (
    Properties,
    iterator_specs,
    system_properties,
    table_properties,
    validate_system_property,
    validate_table_property,
)
from lithify.tablet.compactions import CompactionDriver
from lithify.tablet.log_manager import LogManager
from lithify.tablet.tablet import Tablet, TabletContext, TabletRetiredError
from lithify.tablet.wal_reader import read_log

log = logging.getLogger(__name__)

#: Conditional replacements of tablets (split, merge) tried before giving up.
_REPLACE_ATTEMPTS = 20

#: Times a write is routed again after the tablets it was routed to were split or merged.
_ROUTE_ATTEMPTS = 1000
#: Longest pause between two looks for in-memory maps past `tserver.memory.maps.max.age`.
_AGE_CHECK_MAX_S = 10.0

#: Extra passes a flush task makes over maps frozen while it ran (each pass writes them all).
_FLUSH_PASSES = 100

#: Rows of a scan batch handed to the caller.
SCAN_BATCH = 65536


@dataclass(frozen=True)
class TabletInfo:
    """What `Store.tablets()` reports about one tablet."""

    extent: Extent
    files: tuple[FileRef, ...]
    memory_bytes: int


@dataclass(frozen=True)
class CompactionSummary:
    tablets: int
    files_in: int
    entries_read: int
    entries_written: int
    bytes_written: int
    #: The user compaction's id (the `selection` id in the tablets' metadata).
    id: str = ""


class Store:
    """A lithify store hosted in this process. Thread-safe; close it when done."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        metadata_url: str | None = None,
        external_sink: ExternalSink | None = None,
    ) -> None:
        self.path = Path(path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file = builtins.open(self.path / "LOCK", "a+")  # noqa: SIM115 (held for the lifetime)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise LithifyError(
                f"store {self.path} is already open in another process (lock {self.path / 'LOCK'})"
            ) from None
        try:
            self._start(metadata_url, external_sink)
        except BaseException:
            self._abandon()
            raise

    def _start(self, metadata_url: str | None, external_sink: ExternalSink | None) -> None:
        """Everything `__init__` does once the store's lock is held (undone by `_abandon`)."""
        self.meta = MetadataStore.open_in(self.path, metadata_url)
        self.storage = Storage(str(self.path / "data"))
        self.in_use = FilesInUse()
        self._lock = threading.RLock()
        # Serialises the changes of which tablets exist (split, merge, offline). Never held by
        # a flush: those flush tablets, and a background flush takes `_lock` while it holds
        # its tablet's flush lock, so `_lock` must not be held across a flush either.
        self._layout_lock = threading.RLock()
        self._closed = False
        self._props_cache: dict[str, Properties] = {}
        self._sys_props = system_properties(self.meta.get_system_properties())
        self.logs = LogManager(
            self.meta,
            self.path / "wal",
            self._sys_props.get_size("tserver.wal.max.size"),
            flush_interval_s=self._sys_props.get_duration("tserver.wal.flush.interval"),
        )
        self._ctx = TabletContext(
            storage=self.storage,
            meta=self.meta,
            logs=self.logs,
            table_props=self.table_properties,
            on_files_changed=self._files_changed,
            in_use=self.in_use,
        )
        self._tablets: dict[str, list[Tablet]] = {}
        #: Per table, the latest server timestamp of tablets no longer hosted (see `_host`).
        self._clock_floor: dict[str, int] = {}
        self._flusher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="minc")
        #: Per tablet, the latest flush task and whether it flushes the live map too.
        self._pending_flush: dict[Extent, tuple[Future, bool]] = {}
        self._memory_cv = threading.Condition(self._lock)
        #: Called as on_cancel(table_id, extents or None, kind or None) after local cancels.
        self.on_cancel: Callable[[str, list[Extent] | None, CompactionKind | None], None] | None = (
            None
        )
        self.compactions = CompactionDriver(
            storage=self.storage,
            in_use=self.in_use,
            table_props=self.table_properties,
            tablet=self._tablet_at,
            extents=self._all_extents,
            on_committed=self._files_changed,
        )
        self._load_all()
        self.manager = CompactionManager(
            self.compactions,
            self._sys_props.explicit(),
            scan_files_open_max=self._sys_props.get_int("tserver.scan.files.open.max"),
            external_sink=external_sink,
        )
        self.compactions.manager = self.manager
        self.compactions.cancel_hook = self.cancel_compactions
        self.manager.start_periodic(
            lambda: self._sys_props.get_duration("tserver.compaction.major.delay")
        )
        self.manager.plan_all()
        self._stop_age_flush = threading.Event()
        self._age_flusher = threading.Thread(
            target=self._age_flush_loop, name="minc-age", daemon=True
        )
        self._age_flusher.start()

    # -- hosting ------------------------------------------------------------------------------

    def _load_all(self) -> None:
        """Host every online table's tablets, replaying logs of tablets that have unflushed data."""
        needing_recovery: list[Tablet] = []
        for t in self.meta.list_tables():
            if t.state != "online":
                continue
            tablets = self._host(t.id, after_restart=True)
            needing_recovery += [tb for tb in tablets if tb.meta.logs]
        if needing_recovery:
            self._recover(needing_recovery)

    def _host(self, table_id: str, *, after_restart: bool = False) -> list[Tablet]:
        """Host a table's tablets as the metadata lists them.

        A tablet already hosted with the same extent is kept as it is: its in-memory map, clock
        and running compactions are live state that a fresh object would lose (a split or merge
        re-hosts the whole table). A new tablet's clock starts past every timestamp the table's
        tablets handed out in this process, so server time never goes backwards across a split,
        merge or offline/online.
        """
        with self._lock:
            current = {tb.extent: tb for tb in self._tablets.get(table_id, ())}
            floor = max(
                [self._clock_floor.get(table_id, 0), *(tb.clock.last for tb in current.values())]
            )
        tablets = []
        for m in self.meta.tablets(table_id):
            kept = current.get(m.extent)
            if kept is not None:
                tablets.append(kept)
                continue
            if after_restart and m.compactions:
                # Internal compactions die with the process that ran them; external ones (with
                # an ECID) live on in their compactors. Only at start-up: a table brought back
                # online may still have internal compactions running in this process.
                m = self.meta.mutate_tablet(m.extent, _drop_internal_compactions) or m
            tb = Tablet(m, self._ctx)
            tb.clock.observe(max(floor, m.time))
            tablets.append(tb)
        with self._lock:
            self._tablets[table_id] = tablets
            self._clock_floor[table_id] = floor
        return tablets

    def _recover(self, tablets: list[Tablet]) -> None:
        paths = sorted({p for tb in tablets for p in tb.meta.logs})
        total = 0
        for path in paths:
            users = [tb for tb in tablets if path in tb.meta.logs]
            if not os.path.exists(path):
                log.warning(
                    "write-ahead log %s referenced by %d tablet(s) is missing", path, len(users)
                )
                continue
            # A damaged record with intact ones after it raises CorruptFileError (the store
            # does not open) unless tserver.wal.recovery=point-in-time; a torn tail is a warning.
            records = list(read_log(path, recovery=self._sys_props["tserver.wal.recovery"]))
            for tb in users:
                total += tb.recover(records)
        log.info("recovered %d entries from %d log(s)", total, len(paths))
        for tb in tablets:
            tb.flush()
            if tb.meta.logs:
                tb.mutate(lambda m: m.replace(logs=()) if m.logs else None)
        self._release_logs()

    def _release_logs(self) -> None:
        self.logs.release_unreferenced(self._referenced_logs)

    def _referenced_logs(self) -> set[str]:
        referenced = {p for tbs in self._all_tablet_lists() for tb in tbs for p in tb.meta.logs}
        referenced |= {
            p for t in self.meta.list_tables() for m in self.meta.tablets(t.id) for p in m.logs
        }
        return referenced

    def _all_tablet_lists(self) -> list[list[Tablet]]:
        with self._lock:
            return list(self._tablets.values())

    def _hosted(self, table: TableInfo) -> list[Tablet]:
        with self._lock:
            tablets = self._tablets.get(table.id)
        if tablets is None:
            raise TableOfflineError(f"table {table.name!r} is offline")
        return tablets

    def _files_changed(self, extent: Extent) -> None:
        """Plan the tablet again after a flush, bulk import or compaction commit.

        The hosted tablet re-reads its metadata first: a compaction that started before the
        table went offline and online again commits through the tablet object it started with,
        and the one hosted now would go on listing the replaced files (which the garbage
        collector may then delete under its scans).
        """
        with self._memory_cv:
            self._memory_cv.notify_all()  # a flush freed memory: waiting writers may go on
        tb = self._tablet_at(extent)
        if tb is not None:
            tb.refresh()
        manager = getattr(self, "manager", None)
        if manager is not None and not self._closed:
            manager.plan(extent)

    def _tablet_at(self, extent: object) -> Tablet | None:
        if not isinstance(extent, Extent):
            return None
        with self._lock:
            for tb in self._tablets.get(extent.table_id, ()):
                if tb.extent == extent:
                    return tb
        return None

    def _all_extents(self) -> list[Extent]:
        return [tb.extent for tbs in self._all_tablet_lists() for tb in tbs]

    # -- properties ---------------------------------------------------------------------------

    def table_properties(self, table_id: str) -> Properties:
        with self._lock:
            props = self._props_cache.get(table_id)
        if props is None:
            props = table_properties(self.meta.get_table(table_id).properties)
            with self._lock:
                self._props_cache[table_id] = props
        return props

    def set_property(self, table: str, name: str, value: str) -> None:
        """Set a table property; rejected with a message naming it when the value is bad."""
        info = self.meta.get_table(table)
        self.meta.set_table_properties(info.id, {name: validate_table_property(name, value)})
        with self._lock:
            self._props_cache.pop(info.id, None)

    def unset_property(self, table: str, name: str) -> None:
        info = self.meta.get_table(table)
        self.meta.set_table_properties(info.id, {name: None})
        with self._lock:
            self._props_cache.pop(info.id, None)

    def get_properties(self, table: str) -> dict[str, str]:
        info = self.meta.get_table(table)
        return dict(self.table_properties(info.id))

    def set_system_property(self, name: str, value: str | None) -> None:
        """Set (or with None unset) a system property; compaction services change at once.

        The whole resulting configuration is validated first, so a bad value is rejected with
        a message naming the property and nothing is applied.
        """
        write_system_property(self.meta, name, value)
        self._sys_props = system_properties(self.meta.get_system_properties())
        self.manager.reconfigure(self._sys_props.explicit())
        self.manager.plan_all()

    def system_properties(self) -> Properties:
        return self._sys_props

    # -- tables -------------------------------------------------------------------------------

    def create_table(
        self,
        name: str,
        *,
        splits: Iterable[bytes | str] = (),
        properties: dict[str, str] | None = None,
    ) -> TableInfo:
        props = {k: validate_table_property(k, v) for k, v in (properties or {}).items()}
        points = [s.encode() if isinstance(s, str) else bytes(s) for s in splits]
        info = self.meta.create_table(name, props, points)
        self._host(info.id)
        return info

    def list_tables(self) -> list[TableInfo]:
        return self.meta.list_tables()

    def table_info(self, name: str) -> TableInfo:
        return self.meta.get_table(name)

    def delete_table(self, name: str) -> None:
        """Delete a table; its files become garbage for the collector."""
        info = self.meta.get_table(name)
        with self._lock:
            self._tablets.pop(info.id, None)
            self._props_cache.pop(info.id, None)
            self._clock_floor.pop(info.id, None)
        self.meta.delete_table(info.id)
        self.cancel_compactions(info.id, None)
        self._release_logs()

    def cancel_compactions(
        self, table_id: str, extents: Sequence[Extent] | None, kind: CompactionKind | None = None
    ) -> int:
        """Stop queued and running compactions of these tablets (all of the table's if None).

        Used when a table is deleted or tablets are split or merged (their reservations are
        gone, so a result could not commit anyway) and when a user compaction is cancelled.
        `on_cancel` (set by a tablet server) passes the same request on to the coordinator.
        """
        wanted = None if extents is None else set(extents)

        def match(q: QueuedJob) -> bool:
            ext = q.tablet
            return (
                isinstance(ext, Extent)
                and ext.table_id == table_id
                and (wanted is None or ext in wanted)
                and (kind is None or q.job.kind == kind)
            )

        n = self.manager.cancel(match)
        if self.on_cancel is not None:
            try:
                self.on_cancel(table_id, None if wanted is None else list(wanted), kind)
            except Exception:
                log.warning("could not pass the cancellation on", exc_info=True)
        return n

    def offline(self, name: str) -> None:
        """Flush and unload a table's tablets; it can be neither read nor written until online."""
        info = self.meta.get_table(name)
        if info.state == "offline":
            return
        with self._layout_lock:
            hosted = self._hosted(info)
            with _writes_held(hosted):
                for tb in hosted:
                    tb.flush()
                with self._lock:
                    gone = self._tablets.pop(info.id, [])
                    self._clock_floor[info.id] = max(
                        [self._clock_floor.get(info.id, 0), *(tb.clock.last for tb in gone)]
                    )
            self.meta.set_table_state(info.id, "offline")
        self._release_logs()

    def online(self, name: str) -> None:
        info = self.meta.get_table(name)
        if info.state == "online":
            return
        self.meta.set_table_state(info.id, "online")
        self._host(info.id)

    def tablets(self, name: str) -> list[TabletInfo]:
        info = self.meta.get_table(name)
        return [TabletInfo(tb.extent, tb.files, tb.memory_bytes) for tb in self._hosted(info)]

    def add_splits(self, name: str, points: Iterable[bytes | str]) -> None:
        """Split tablets at the given rows; no data is rewritten (files are fenced)."""
        info = self.meta.get_table(name)
        wanted = sorted({p.encode() if isinstance(p, str) else bytes(p) for p in points})
        with self._layout_lock:
            for tb in self._hosted(info):
                inner = [p for p in wanted if tb.extent.contains(p) and p != tb.extent.end_row]
                if not inner:
                    continue
                with _writes_held([tb]):
                    tb.flush()
                    self._replace_tablets(
                        info.id,
                        [tb],
                        lambda old, inner=inner: split_ops.split_tablet(old[0], inner),
                    )
                self.cancel_compactions(info.id, [tb.extent])
                self._host(info.id)  # at once: writes held by the split wait for the children
        self._release_logs()

    def _replace_tablets(
        self,
        table_id: str,
        tablets: Sequence[Tablet],
        make: Callable[[list[TabletMeta]], list[TabletMeta]],
    ) -> None:
        """Replace `tablets` by `make(their metadata)`, re-reading them after a conflict.

        A background compaction may commit on one of them between the read and the conditional
        update; the split or merge is then derived again from the new metadata instead of
        failing the caller.
        """
        for attempt in range(_REPLACE_ATTEMPTS):
            old = [tb.refresh() for tb in tablets]
            try:
                self.meta.replace_tablets(table_id, old, make(old))
                return
            except ConditionalUpdateError:
                if attempt + 1 == _REPLACE_ATTEMPTS:
                    raise
                time.sleep(min(0.05, 0.002 * 2**attempt))

    def merge_tablets(
        self, name: str, start: bytes | str | None = None, end: bytes | str | None = None
    ) -> None:
        """Join the tablets that overlap rows [start, end] into one; no data is rewritten."""
        info = self.meta.get_table(name)
        rng = RowRange.rows(_b(start), _b(end))
        with self._layout_lock:
            group = [tb for tb in self._hosted(info) if tb.extent.range.overlaps(rng)]
            if len(group) < 2:
                return
            with _writes_held(group):
                for tb in group:
                    tb.flush()
                self._replace_tablets(info.id, group, lambda old: [split_ops.merge_tablets(old)])
            self.cancel_compactions(info.id, [tb.extent for tb in group])
            self._host(info.id)
        self._release_logs()

    # -- writes -------------------------------------------------------------------------------

    def write(self, table: str, data: pa.Table | pa.RecordBatch | Iterable[Mutation]) -> int:
        """Write mutations or an Arrow table of entries; returns entries written.

        Each mutation is applied atomically; when this returns, every entry is acknowledged
        with the table's durability (`table.durability`).
        """
        info = self.meta.get_table(table)
        if isinstance(data, pa.Table | pa.RecordBatch):
            entries = validate_entries(data)
        else:
            entries = mutations_to_table(list(data))
        if entries.num_rows == 0:
            return 0
        pending = entries
        for _ in range(_ROUTE_ATTEMPTS):
            retry: list[pa.Table] = []
            for tb, part in _route(pending, self._hosted(info)):
                try:
                    tb.write(part)
                except TabletRetiredError:
                    retry.append(part)  # split or merged meanwhile: route it again
            if not retry:
                break
            pending = pa.concat_tables(retry)
            time.sleep(0.01)
        else:
            raise LithifyError(f"table {table!r}: tablets kept changing while writing")
        self._after_write()
        return entries.num_rows

    def _after_write(self) -> None:
        """Freeze and flush maps when memory passes `tserver.memory.maps.max`; wait when full.

        The largest live map is frozen (queued for a flush) as soon as the live maps pass the
        limit, and a fresh map takes the writes while it is flushed; writers wait only while the
        live and frozen maps together exceed twice the limit, that is while flushes have fallen
        a whole memory's worth behind.
        """
        limit = self._sys_props.get_size("tserver.memory.maps.max")
        for _ in range(10_000):
            live = [tb for tbs in self._all_tablet_lists() for tb in tbs]
            if sum(tb.memory_bytes for tb in live) > limit:
                max(live, key=lambda tb: tb.memory_bytes).freeze()
            in_memory = flushing = 0
            for tb in live:
                in_memory += tb.memory_bytes
                if tb.frozen_maps:
                    flushing += tb.flushing_bytes
                    self._schedule_flush(tb, live=False)
            if in_memory + flushing <= 2 * limit:
                return
            with self._memory_cv:
                self._memory_cv.wait(timeout=0.05)

    def _age_flush_loop(self) -> None:
        """Flush maps holding entries older than `tserver.memory.maps.max.age`.

        Flushes by size alone leave a tablet written now and then with a small map that lists
        every log it was written to: those logs could never be deleted, and all of them would
        be replayed after a crash.
        """
        while True:
            age = self._sys_props.get_duration("tserver.memory.maps.max.age")
            pause = min(max(age / 4, 0.05), _AGE_CHECK_MAX_S) if age else _AGE_CHECK_MAX_S
            if self._stop_age_flush.wait(pause):
                return
            if not age:
                continue
            try:
                for tbs in self._all_tablet_lists():
                    for tb in tbs:
                        if tb.freeze_if_older(age):
                            self._schedule_flush(tb, live=False)
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("flushing in-memory maps by age failed")

    def _schedule_flush(self, tb: Tablet, *, live: bool) -> Future:
        """A flush task for the tablet; an unfinished one already queued is reused when it
        covers what is asked (a live flush that has not started covers everything written
        before it runs; any unfinished task covers the maps already frozen).

        The task completes its future itself, under this lock, when it finds no frozen map
        left (see `_flush_task`), so reusing an unfinished task is safe: it has not looked at
        the frozen queue for the last time yet, and will see the map frozen before this call.
        """
        with self._lock:
            fut, fut_live = self._pending_flush.get(tb.extent, (None, False))
            if (
                fut is not None
                and not fut.done()
                and (not live or (fut_live and not fut.running()))
            ):
                return fut
            fut = Future()
            self._flusher.submit(self._flush_task, tb, live, fut)
            self._pending_flush[tb.extent] = (fut, live)
            return fut

    def _flush_task(self, tb: Tablet, live: bool, done: Future) -> None:
        """Flush a tablet, then the maps frozen while that flush was finishing (a writer that
        froze one then found this task still unfinished and relied on it); complete `done`.

        The last look at the frozen queue and the completion of `done` happen together under
        the store lock, the lock `_schedule_flush` decides under: were the task's future
        completed only after it returned, a map frozen in between would find the task
        unfinished, rely on it, and wait in memory for the next write or explicit flush.
        """
        if not done.set_running_or_notify_cancel():
            return
        try:
            ref = tb.flush(live=live)
            for _ in range(_FLUSH_PASSES):
                with self._lock:
                    if not tb.frozen_maps or self._closed:
                        done.set_result(ref)
                        return
                ref = tb.flush(live=False) or ref
            with self._lock:
                # Writers keep freezing maps: end this task and queue a fresh one behind the
                # other tablets' flushes (`done` first, so that it is not reused).
                done.set_result(ref)
                if tb.frozen_maps and not self._closed:
                    self._schedule_flush(tb, live=False)
        except BaseException as e:
            log.exception(
                "flush of %s failed; its entries stay in memory and in the log", tb.extent
            )
            if not done.done():
                done.set_exception(e)
        finally:
            with self._memory_cv:
                self._memory_cv.notify_all()

    def flush(self, table: str, *, wait: bool = True) -> None:
        """Flush every tablet of a table to files (a minor compaction)."""
        info = self.meta.get_table(table)
        futures = [self._schedule_flush(tb, live=True) for tb in self._hosted(info)]
        if wait:
            for f in futures:
                f.result()
            self._release_logs()

    # -- scans --------------------------------------------------------------------------------

    def scan(
        self,
        table: str,
        start: bytes | str | None = None,
        end: bytes | str | None = None,
        *,
        columns: Sequence[tuple[bytes | str, bytes | str | None]] | None = None,
        min_timestamp: int | None = None,
        max_timestamp: int | None = None,
        batch_size: int = SCAN_BATCH,
    ) -> Iterator[pa.RecordBatch]:
        """Record batches (ENTRY_SCHEMA) of rows in [start, end], newest versions, no deletes.

        `columns` keeps (family, qualifier) pairs, qualifier None meaning the whole family;
        `min_timestamp`/`max_timestamp` keep entries with timestamps inside the bounds.
        """
        info = self.meta.get_table(table)
        rng = RowRange.rows(_b(start), _b(end))
        props = self.table_properties(info.id)
        versions = props.get_int("table.versions")
        iters = iterator_specs(props, "scan")
        for tb in self._hosted(info):
            clip = tb.extent.range.intersect(rng)
            if clip.is_empty():
                continue
            sources, files = tb.scan_sources(clip)
            with self.in_use.using(f.path for f in files):
                for batch in merge_sorted(
                    sources,
                    versions=versions,
                    propagate_deletes=False,
                    batch_size=batch_size,
                    iterators=iters,
                ):
                    out = _filter(batch, columns, min_timestamp, max_timestamp)
                    if out.num_rows:
                        yield out

    def scan_entries(
        self, table: str, start: bytes | str | None = None, end: bytes | str | None = None, **kw
    ) -> Iterator[tuple[Key, bytes]]:
        """The same as `scan`, one (Key, value) pair at a time."""
        for batch in self.scan(table, start, end, **kw):
            cols = [batch.column(n).to_pylist() for n in ENTRY_SCHEMA.names]
            for r, f, q, v, ts, d, val in zip(*cols, strict=True):
                yield Key(r, f, q, v, ts, d), val

    def count(self, table: str) -> int:
        return sum(b.num_rows for b in self.scan(table))

    # -- compactions --------------------------------------------------------------------------

    def compact(
        self,
        table: str,
        start: bytes | str | None = None,
        end: bytes | str | None = None,
        *,
        flush: bool = True,
        wait: bool = True,
        timeout: float | None = None,
        iterators: Sequence[tuple[str, dict[str, str]]] = (),
        hints: dict[str, str] | None = None,
        progress: Callable[[int, int], None] | None = None,
        ucid: str | None = None,
    ) -> CompactionSummary:
        """A user compaction: every tablet overlapping [start, end] ends as one file.

        A tablet with a single file is rewritten too (its deletes dropped and the compaction
        iterators applied). The work runs on the service the table's dispatcher chooses for
        USER compactions (`hints`, e.g. `{"compaction_type": "big"}`, guide it). With
        `wait=False` it returns at once; `cancel_compaction` stops it. `ucid` names the
        selection (default: a fresh id); a tablet already selected under that id is taken as
        it is, so a request repeated after a coordinator failover follows its own compaction.
        """
        info = self.meta.get_table(table)
        # An iterator that cannot load would fail every pass and leave the selection pending
        # for ever, so it is rejected (ConfigError naming it) before anything is selected.
        load_iterators(iterators)
        rng = RowRange.rows(_b(start), _b(end))
        tablets = [tb for tb in self._hosted(info) if tb.extent.range.overlaps(rng)]
        if flush:
            for tb in tablets:
                tb.flush()
        uc = self.compactions.start_user(
            info.id, tablets, iterators=iterators, hints=hints, ucid=ucid
        )
        if wait and not self.compactions.wait_user(uc, timeout, progress):
            if uc.cancelled:
                raise CompactionCancelledError(f"user compaction {uc.id} of {table} was cancelled")
            raise LithifyError(f"user compaction {uc.id} of {table} did not finish in {timeout}s")
        return CompactionSummary(
            uc.total, uc.files_in, uc.entries_read, uc.entries_written, uc.bytes_written, uc.id
        )

    def cancel_compaction(self, table: str) -> int:
        """Cancel the table's pending user compaction; returns how many were cancelled."""
        info = self.meta.get_table(table)
        return self.compactions.cancel_user(self._hosted(info))

    def compact_files(self, table: str, extent: Extent, files: Sequence[FileRef]) -> None:
        """Compact chosen files of one tablet now, in this thread (tests and tools)."""
        tb = self._tablet_at(extent)
        if tb is None:
            raise LithifyError(f"tablet {extent} is not hosted")
        self.compactions.compact(tb, files, kind=CompactionKind.SYSTEM, executor="direct")

    # -- bulk import --------------------------------------------------------------------------

    def import_files(self, table: str, paths: Iterable[str | os.PathLike]) -> list[FileRef]:
        """Add externally written sorted Parquet files to the tablets their rows fall in.

        Each file is validated (schema, order, no nulls), copied into the store as an `I` file
        and referenced by every tablet it overlaps, fenced to that tablet.
        """
        info = self.meta.get_table(table)
        tablets = self._hosted(info)
        added: list[FileRef] = []
        for src in paths:
            rel = new_file_name("I", info.id)
            # In use from before its first byte: a garbage collection pass must not take the
            # copy for garbage before a tablet refers to it.
            with self.in_use.using([rel]):
                with builtins.open(src, "rb") as fin, self.storage.open_output(rel) as fout:
                    while chunk := fin.read(1 << 20):
                        fout.write(chunk)
                try:
                    meta = validate_import_file(self.storage, rel)
                except BaseException:
                    self.storage.delete(rel)
                    raise
                span = RowRange.rows(meta.first_key.row, meta.last_key.row)
                ref = FileRef(rel, meta.size, meta.entries)
                for tb in tablets:
                    fenced = split_ops.fence_to(ref, tb.extent.range)
                    if fenced is not None and tb.extent.range.overlaps(span):
                        # Flush first: an imported delete may hide puts still in memory, and a
                        # compaction of all the tablet's files would drop the delete but not
                        # those puts, which would then reappear.
                        tb.flush()
                        tb.clock.follow((meta.first_key.timestamp, meta.last_key.timestamp))
                        tb.mutate(
                            lambda m, f=fenced, tb=tb: m.replace(
                                files=(*m.files, f), time=max(m.time, tb.clock.last)
                            )
                        )
                        self._files_changed(tb.extent)
            added.append(ref)
        return added

    def refresh_tablet(self, extent: Extent) -> bool | None:
        """Re-read a hosted tablet's metadata after another process changed it (an external
        compaction committed); None when the tablet is not hosted, else whether it changed."""
        tb = self._tablet_at(extent)
        if tb is None:
            return None
        before = tb.meta.version
        return tb.refresh().version != before

    # -- observation --------------------------------------------------------------------------

    def files_per_tablet(self) -> list[int]:
        return [len(tb.files) for tbs in self._all_tablet_lists() for tb in tbs]

    def memory_bytes(self) -> int:
        """Bytes held in in-memory maps: live ones and frozen ones waiting for a flush."""
        return sum(
            tb.memory_bytes + tb.flushing_bytes for tbs in self._all_tablet_lists() for tb in tbs
        )

    def flush_totals(self) -> dict[str, int]:
        """Files, entries and bytes written by flushes since the store opened (the denominator
        of write amplification; `compactions.totals` has the compaction side)."""
        return self._ctx.flushes.snapshot()

    def flush_stats(self) -> tuple[int, int]:
        """(queued, running) flushes."""
        with self._lock:
            futures = [fut for fut, _ in self._pending_flush.values()]
        running = sum(1 for f in futures if f.running())
        queued = sum(1 for f in futures if not f.done() and not f.running())
        return queued, running

    def wait_for_compactions(self, timeout: float = 60.0) -> bool:
        """Wait (bounded) until no compaction is queued or running; True if that happened."""
        return self.manager.wait_idle(timeout)

    # -- garbage ------------------------------------------------------------------------------

    def gc(self, *, only: Collection[str] | None = None) -> list[str]:
        """Delete data files that no tablet refers to and nothing in this process uses (with
        `only`: just those of them in `only`, see `collect_garbage`)."""
        deleted = collect_garbage(self.storage, self.meta, self.in_use, only=only)
        self._release_logs()
        return deleted

    def find_garbage(self) -> set[str]:
        """The files `gc` would delete now."""
        return find_garbage(self.storage, self.meta, self.in_use)

    # -- lifecycle ----------------------------------------------------------------------------

    def _stop_age_flusher(self) -> None:
        self._stop_age_flush.set()
        self._age_flusher.join(10)

    def _abandon(self) -> None:
        """Undo a start that failed part way (a log that cannot be recovered, a metadata store
        that cannot be reached): stop what was started and release the lock at once, so that
        the operator can fix the cause and open the store again in this process or another."""
        self._closed = True
        for name, stop in (
            ("_age_flusher", self._stop_age_flusher),
            ("manager", lambda: self.manager.shutdown(wait=True)),
            ("_flusher", lambda: self._flusher.shutdown(wait=True)),
            ("logs", lambda: self.logs.close()),
            ("meta", lambda: self.meta.close()),
        ):
            if name in self.__dict__:
                try:
                    stop()
                except Exception:  # noqa: BLE001 - the original error is the one to report
                    log.exception("cleaning up after a failed start: %s", name)
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def close(self) -> None:
        """Stop background work and release the store; acknowledged writes stay in the log."""
        if self._closed:
            return
        self._closed = True
        self._stop_age_flusher()
        self.manager.shutdown(wait=True)
        self._flusher.shutdown(wait=True)
        self.logs.close()
        self.meta.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_system_property(meta: MetadataStore, name: str, value: str | None) -> None:
    """Validate and write (None: unset) a system property in the metadata store.

    The whole resulting configuration is validated first (compaction services included), so a
    bad value is rejected with a message naming the property and nothing is written.
    """
    changes = {name: None if value is None else validate_system_property(name, value)}
    current = meta.get_system_properties()
    proposed = {k: v for k, v in {**current, **changes}.items() if v is not None}
    CompactionManager.validate(proposed)
    meta.set_system_properties(changes)


def open(  # noqa: A001
    path: str | os.PathLike,
    *,
    metadata_url: str | None = None,
    external_sink: ExternalSink | None = None,
) -> Store:
    """Open (creating if needed) the store at `path`; SQLite metadata beside the data by default.

    `external_sink` receives the jobs that plans assign to external queues (the tablet server
    passes one that forwards them to the compaction coordinator).
    """
    return Store(path, metadata_url=metadata_url, external_sink=external_sink)


def _b(v: bytes | str | None) -> bytes | None:
    return v.encode() if isinstance(v, str) else v


@contextlib.contextmanager
def _writes_held(tablets: Sequence[Tablet]) -> Iterator[None]:
    """Hold writes to `tablets` while they are flushed and replaced; on success retire them
    (held writers then re-route to the new tablets), on failure let the writes through."""
    for tb in tablets:
        tb.block_writes()
    try:
        yield
    except BaseException:
        for tb in tablets:
            tb.unblock_writes()
        raise
    for tb in tablets:
        tb.retire()


def _drop_internal_compactions(m: TabletMeta) -> TabletMeta | None:
    keep = {k: v for k, v in m.compactions.items() if v.get("ecid")}
    return m.replace(compactions=keep) if len(keep) != len(m.compactions) else None


def _route(entries: pa.Table, tablets: list[Tablet]) -> Iterator[tuple[Tablet, pa.Table]]:
    """Split entries among tablets by row."""
    if len(tablets) == 1:
        yield tablets[0], entries
        return
    rows = entries.column("row")
    for tb in tablets:
        mask = tb.extent.range.mask(rows)
        part = entries if mask is None else entries.filter(mask)
        if part.num_rows:
            yield tb, part


def _filter(
    batch: pa.RecordBatch,
    columns: Sequence[tuple[bytes | str, bytes | str | None]] | None,
    min_ts: int | None,
    max_ts: int | None,
) -> pa.RecordBatch:
    mask = None
    if columns:
        for fam, qual in columns:
            m = pc.equal(batch.column("family"), pa.scalar(_b(fam), pa.binary()))
            if qual is not None:
                m = pc.and_(
                    m, pc.equal(batch.column("qualifier"), pa.scalar(_b(qual), pa.binary()))
                )
            mask = m if mask is None else pc.or_(mask, m)
    if min_ts is not None:
        m = pc.greater_equal(batch.column("timestamp"), min_ts)
        mask = m if mask is None else pc.and_(mask, m)
    if max_ts is not None:
        m = pc.less_equal(batch.column("timestamp"), max_ts)
        mask = m if mask is None else pc.and_(mask, m)
    return batch if mask is None else batch.filter(mask)


__all__ = ["Store", "open", "InvalidMutationError", "FULL_RANGE"]
