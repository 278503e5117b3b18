"""The embedded store: `lithify.open(path)` hosts every tablet of a store in this process.

It wires the pieces together: the metadata store (SQLite beside the data by default), the
filesystem layer, the shared write-ahead log, the hosted tablets, background flushes, table
operations (create, delete, properties, split, merge, offline/online, bulk import), scans,
full compactions and the garbage collector.
"""

from __future__ import annotations

import builtins
import fcntl
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from lithify.compaction.compactor_job import CompactionRequest, run_compaction
from lithify.compaction.merge import merge_sorted
from lithify.data.key import ENTRY_SCHEMA, Key
from lithify.data.mutation import Mutation, mutations_to_table, validate_entries
from lithify.data.ranges import FULL_RANGE, Extent, FileRef, RowRange
from lithify.errors import (
    InvalidMutationError,
    LithifyError,
    TableNotFoundError,
    TableOfflineError,
)
from lithify.files.bulk import validate_import_file
from lithify.files.in_use import FilesInUse
from lithify.files.naming import new_file_name, tmp_name
from lithify.files.storage import Storage
from lithify.gc import collect_garbage
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
from lithify.tablet import reservation
from lithify.tablet.log_manager import LogManager
from lithify.tablet.tablet import Tablet, TabletContext, newest_first
from lithify.tablet.wal import read_log

log = logging.getLogger(__name__)

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


class Store:
    """A lithify store hosted in this process. Thread-safe; close it when done."""

    def __init__(self, path: str | os.PathLike, *, metadata_url: str | None = None) -> None:
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
        url = metadata_url or f"sqlite:///{self.path / 'metadata.db'}"
        self.meta = MetadataStore.open(url)
        self.storage = Storage(str(self.path / "data"))
        self.in_use = FilesInUse()
        self._lock = threading.RLock()
        self._closed = False
        self._props_cache: dict[str, Properties] = {}
        self._sys_props = system_properties(self.meta.get_system_properties())
        self.logs = LogManager(
            self.meta, self.path / "wal", self._sys_props.get_size("tserver.wal.max.size")
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
        self._flusher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="minc")
        self._pending_flush: dict[Extent, Future] = {}
        self._memory_cv = threading.Condition(self._lock)
        self._load_all()

    # -- hosting ------------------------------------------------------------------------------

    def _load_all(self) -> None:
        """Host every online table's tablets, replaying logs of tablets that have unflushed data."""
        needing_recovery: list[Tablet] = []
        for t in self.meta.list_tables():
            if t.state != "online":
                continue
            tablets = self._host(t.id)
            needing_recovery += [tb for tb in tablets if tb.meta.logs]
        if needing_recovery:
            self._recover(needing_recovery)

    def _host(self, table_id: str) -> list[Tablet]:
        tablets = []
        for m in self.meta.tablets(table_id):
            if m.compactions:
                # Internal compactions die with the process that ran them.
                m = self.meta.mutate_tablet(m.extent, _drop_internal_compactions) or m
            tablets.append(Tablet(m, self._ctx))
        with self._lock:
            self._tablets[table_id] = tablets
        return tablets

    def _recover(self, tablets: list[Tablet]) -> None:
        paths = sorted({p for tb in tablets for p in tb.meta.logs})
        total = 0
        for path in paths:
            users = [tb for tb in tablets if path in tb.meta.logs]
            if not os.path.exists(path):
                log.warning("write-ahead log %s referenced by %d tablet(s) is missing", path, len(users))
                continue
            records = list(read_log(path))
            for tb in users:
                total += tb.recover(records)
        log.info("recovered %d entries from %d log(s)", total, len(paths))
        for tb in tablets:
            tb.flush()
            if tb.meta.logs:
                tb.mutate(lambda m: m.replace(logs=()) if m.logs else None)
        self._release_logs()

    def _release_logs(self) -> None:
        referenced = {p for tbs in self._all_tablet_lists() for tb in tbs for p in tb.meta.logs}
        referenced |= {
            p for t in self.meta.list_tables() for m in self.meta.tablets(t.id) for p in m.logs
        }
        self.logs.release_unreferenced(referenced)

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
        """Hook for planning after a flush, import or commit (the planner arrives in issue 3)."""

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

    def set_system_property(self, name: str, value: str) -> None:
        self.meta.set_system_properties({name: validate_system_property(name, value)})
        self._sys_props = system_properties(self.meta.get_system_properties())

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
        self.meta.delete_table(info.id)
        self._release_logs()

    def offline(self, name: str) -> None:
        """Flush and unload a table's tablets; it can be neither read nor written until online."""
        info = self.meta.get_table(name)
        if info.state == "offline":
            return
        for tb in self._hosted(info):
            tb.flush()
        with self._lock:
            self._tablets.pop(info.id, None)
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
        with self._lock:
            tablets = list(self._hosted(info))
            for tb in tablets:
                inner = [p for p in wanted if tb.extent.contains(p) and p != tb.extent.end_row]
                if not inner:
                    continue
                tb.flush()
                old = tb.refresh()
                self.meta.replace_tablets(info.id, [old], split_ops.split_tablet(old, inner))
            self._host(info.id)
        self._release_logs()

    def merge_tablets(
        self, name: str, start: bytes | str | None = None, end: bytes | str | None = None
    ) -> None:
        """Join the tablets that overlap rows [start, end] into one; no data is rewritten."""
        info = self.meta.get_table(name)
        rng = RowRange.rows(_b(start), _b(end))
        with self._lock:
            group = [tb for tb in self._hosted(info) if tb.extent.range.overlaps(rng)]
            if len(group) < 2:
                return
            for tb in group:
                tb.flush()
            old = [tb.refresh() for tb in group]
            self.meta.replace_tablets(info.id, old, [split_ops.merge_tablets(old)])
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
        tablets = self._hosted(info)
        if len(tablets) == 1:
            tablets[0].write(entries)
        else:
            for tb, part in _route(entries, tablets):
                tb.write(part)
        self._after_write()
        return entries.num_rows

    def _after_write(self) -> None:
        """Start flushes when memory passes `tserver.memory.maps.max`; wait when far past it."""
        limit = self._sys_props.get_size("tserver.memory.maps.max")
        for _ in range(10_000):
            live = [tb for tbs in self._all_tablet_lists() for tb in tbs]
            in_memory = sum(tb.memory_bytes for tb in live)
            flushing = sum(tb.flushing_bytes for tb in live)
            if in_memory > limit:
                largest = max(live, key=lambda tb: tb.memory_bytes)
                self._schedule_flush(largest)
            if in_memory + flushing <= 2 * limit:
                return
            with self._memory_cv:
                self._memory_cv.wait(timeout=0.05)

    def _schedule_flush(self, tb: Tablet) -> Future:
        with self._lock:
            fut = self._pending_flush.get(tb.extent)
            if fut is not None and not fut.done():
                return fut
            fut = self._flusher.submit(self._flush_task, tb)
            self._pending_flush[tb.extent] = fut
            return fut

    def _flush_task(self, tb: Tablet) -> FileRef | None:
        try:
            return tb.flush()
        except Exception:
            log.exception("flush of %s failed; its entries stay in memory and in the log", tb.extent)
            raise
        finally:
            with self._memory_cv:
                self._memory_cv.notify_all()

    def flush(self, table: str, *, wait: bool = True) -> None:
        """Flush every tablet of a table to files (a minor compaction)."""
        info = self.meta.get_table(table)
        futures = [self._schedule_flush(tb) for tb in self._hosted(info)]
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
        iterators: Sequence[tuple[str, dict[str, str]]] = (),
    ) -> CompactionSummary:
        """Compact every tablet overlapping [start, end] into one file each, now.

        A tablet with a single file is rewritten too (its deletes are dropped and the
        compaction iterators applied), as a user compaction must.
        """
        info = self.meta.get_table(table)
        rng = RowRange.rows(_b(start), _b(end))
        tablets = [tb for tb in self._hosted(info) if tb.extent.range.overlaps(rng)]
        if flush:
            for tb in tablets:
                tb.flush()
        totals = [0, 0, 0, 0, 0]
        for tb in tablets:
            result = self.compact_tablet(tb, tb.files, iterators=iterators)
            if result is not None:
                totals[0] += 1
                for i, v in enumerate(result, start=1):
                    totals[i] += v
        return CompactionSummary(*totals)

    def compact_tablet(
        self,
        tb: Tablet,
        files: Sequence[FileRef],
        *,
        iterators: Sequence[tuple[str, dict[str, str]]] = (),
        kind: str = "USER",
    ) -> tuple[int, int, int, int] | None:
        """Reserve `files`, merge them into one, commit; returns (files, read, written, bytes)."""
        if not files:
            return None
        cid = uuid.uuid4().hex[:16]
        props = self.table_properties(tb.extent.table_id)
        full = reservation.may_drop_deletes(tb.meta, files)
        output = new_file_name("A" if full else "C", tb.extent.table_id)
        record = {
            "kind": kind,
            "tmp_path": tmp_name(output, cid),
            "output_path": output,
            "propagate_deletes": not full,
            "executor": "direct",
        }
        tb.mutate(lambda m: reservation.reserve(m, cid, files, record))
        try:
            with self.in_use.using([*(f.path for f in files), output, record["tmp_path"]]):
                result = run_compaction(
                    self.storage,
                    CompactionRequest(
                        inputs=newest_first(files),
                        extent_range=tb.extent.range,
                        output_path=output,
                        tmp_id=cid,
                        propagate_deletes=not full,
                        versions=props.get_int("table.versions"),
                        iterators=[*iterator_specs(props, "majc"), *iterators],
                        compression=props["table.file.compress.type"],
                    ),
                )
                out_ref = None
                if result.entries_written:
                    self.storage.rename(result.tmp_path, output)
                    out_ref = FileRef(output, result.bytes_written, result.entries_written)
                else:
                    self.storage.delete(result.tmp_path)
                tb.mutate(lambda m: reservation.commit(m, cid, out_ref))
        except BaseException:
            tb.mutate(lambda m: reservation.release(m, cid))
            raise
        log.info(
            "Compacted %s for %s created %s from %s",
            tb.extent,
            kind,
            output if out_ref else "(empty)",
            [f.path.rsplit("/", 1)[-1] for f in files],
        )
        self._files_changed(tb.extent)
        return len(files), result.entries_read, result.entries_written, result.bytes_written

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
            with self.in_use.using([rel]):
                for tb in tablets:
                    fenced = split_ops.fence_to(ref, tb.extent.range)
                    if fenced is not None and tb.extent.range.overlaps(span):
                        tb.mutate(lambda m, f=fenced: m.replace(files=(*m.files, f)))
                        for _key in (meta.first_key, meta.last_key):
                            tb.clock.observe(_key.timestamp)
                        self._files_changed(tb.extent)
            added.append(ref)
        return added

    # -- garbage ------------------------------------------------------------------------------

    def gc(self) -> list[str]:
        """Delete data files that no tablet refers to and nothing in this process uses."""
        deleted = collect_garbage(self.storage, self.meta, self.in_use)
        self._release_logs()
        return deleted

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop background work and release the store; acknowledged writes stay in the log."""
        if self._closed:
            return
        self._closed = True
        self._flusher.shutdown(wait=True)
        self.logs.close()
        self.meta.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(path: str | os.PathLike, *, metadata_url: str | None = None) -> Store:  # noqa: A001
    """Open (creating if needed) the store at `path`; SQLite metadata beside the data by default."""
    return Store(path, metadata_url=metadata_url)


def _b(v: bytes | str | None) -> bytes | None:
    return v.encode() if isinstance(v, str) else v


def _drop_internal_compactions(m: TabletMeta) -> TabletMeta | None:
    keep = {k: v for k, v in m.compactions.items() if v.get("ecid")}
    return m.replace(compactions=keep) if len(keep) != len(m.compactions) else None


def _route(entries: pa.Table, tablets: list[Tablet]) -> Iterator[tuple[Tablet, pa.Table]]:
    """Split entries among tablets by row."""
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
                m = pc.and_(m, pc.equal(batch.column("qualifier"), pa.scalar(_b(qual), pa.binary())))
            mask = m if mask is None else pc.or_(mask, m)
    if min_ts is not None:
        m = pc.greater_equal(batch.column("timestamp"), min_ts)
        mask = m if mask is None else pc.and_(mask, m)
    if max_ts is not None:
        m = pc.less_equal(batch.column("timestamp"), max_ts)
        mask = m if mask is None else pc.and_(mask, m)
    return batch if mask is None else batch.filter(mask)


__all__ = ["Store", "open", "InvalidMutationError", "FULL_RANGE"]
