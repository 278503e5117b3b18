"""The tablet server's side of compactions: describing tablets to the planner and running jobs.

`CompactionDriver` is the host of the `CompactionManager`: it turns a tablet's metadata into a
`TabletView`, and runs a queued job through the one implementation of a compaction: reserve the
files (conditional update), merge them (`run_compaction`), rename the output and commit (one
conditional update that swaps the files and drops the reservation). It also keeps the state of
user compactions: which files each tablet selected, which of them are still to be compacted,
and who waits for the result.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lithify.compaction.compactor_job import CompactionRequest, CompactionResult, run_compaction
from lithify.compaction.executor import QueuedJob
from lithify.compaction.manager import CompactionManager, TabletView
from lithify.compaction.rate_limit import TokenBucket
from lithify.compaction.spi import CompactableFile, CompactionKind, RunningCompaction
from lithify.data.ranges import Extent, FileRef
from lithify.errors import CompactionCancelledError, LithifyError
from lithify.files.in_use import FilesInUse
from lithify.files.naming import new_file_name, tmp_name
from lithify.files.storage import Storage
from lithify.metadata.store import TabletMeta
from lithify.table.properties import Properties, iterator_specs
from lithify.tablet import reservation
from lithify.tablet.reservation import ReservationError
from lithify.tablet.tablet import Tablet, newest_first
from lithify.units import format_size

log = logging.getLogger(__name__)

IteratorSpecs = Sequence[tuple[str, Mapping[str, str]]]


@dataclass
class CompactionTotals:
    """Work done by compactions, by executor id (fed to the metrics)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    by_executor: dict[str, dict[str, int]] = field(default_factory=dict)

    def record(self, executor: str, outcome: str, result: CompactionResult | None) -> None:
        with self.lock:
            c = self.by_executor.setdefault(
                executor,
                dict.fromkeys(
                    (
                        "completed",
                        "failed",
                        "cancelled",
                        "entries_read",
                        "entries_written",
                        "bytes_read",
                        "bytes_written",
                    ),
                    0,
                ),
            )
            c[outcome] += 1
            if result is not None:
                c["entries_read"] += result.entries_read
                c["entries_written"] += result.entries_written
                c["bytes_read"] += result.bytes_read
                c["bytes_written"] += result.bytes_written

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self.lock:
            return {k: dict(v) for k, v in self.by_executor.items()}


@dataclass
class UserCompaction:
    """A pending user compaction and its waiters."""

    id: str
    table_id: str
    pending: set[Extent]
    total: int
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    files_in: int = 0
    entries_read: int = 0
    entries_written: int = 0
    bytes_written: int = 0

    def finish(self, extent: Extent) -> None:
        self.pending.discard(extent)
        if not self.pending:
            self.done.set()


def view_of(meta: TabletMeta, props: Mapping[str, str]) -> TabletView:
    """A tablet's metadata as the planner sees it."""
    files = tuple(CompactableFile(f.uri, f.size, f.entries) for f in meta.files)
    running = tuple(
        RunningCompaction(
            CompactionKind(rec.get("kind", "SYSTEM")),
            tuple(
                CompactableFile(r.uri, r.size, r.entries)
                for r in (FileRef.from_json(x) for x in rec["inputs"])
            ),
        )
        for rec in meta.compactions.values()
    )
    selected = None
    hints: dict[str, str] = {}
    blocked = False
    if meta.selection is not None:
        selected = frozenset(FileRef.from_json(x).uri for x in meta.selection["files"])
        hints = dict(meta.selection.get("hints", {}))
        # A system compaction that was already running over selected files when the user
        # compaction started: its output joins the selection when it commits. Until then the
        # user compaction waits, or it would keep rewriting its own single output.
        blocked = any(
            rc.kind == CompactionKind.SYSTEM and any(f.uri in selected for f in rc.files)
            for rc in running
        )
    return TabletView(
        extent=meta.extent,
        table_id=meta.extent.table_id,
        all_files=files,
        reserved=frozenset(f.uri for f in reservation.reserved_files(meta)),
        running=running,
        table_properties=props,
        selected=selected,
        user_hints=hints,
        user_blocked=blocked,
    )


def selection_after_commit(
    meta: TabletMeta, inputs: set[FileRef], output: FileRef | None, selection_id: str | None
) -> dict[str, Any] | None:
    """The user-compaction selection once a compaction of `inputs` committed.

    `selection_id` is the selection the compaction was reserved for (None unless it was a user
    compaction). Selected inputs are replaced by the output, which counts as the selection's
    own only when that is the current selection: one cancelled meanwhile may have been replaced
    by a newer one of the same files, and a stale output, written without the newer one's
    iterators, must be rewritten. The selection ends (None) when a single file produced by the
    user compaction remains, or nothing remains.
    """
    sel = meta.selection
    if sel is None:
        return None
    user = selection_id is not None and sel.get("id") == selection_id
    files = [FileRef.from_json(x) for x in sel["files"]]
    if not inputs & set(files):
        return sel
    rest = [f for f in files if f not in inputs]
    outputs = list(sel.get("outputs", []))
    if output is not None:
        rest.append(output)
        if user:
            outputs.append(output.path)
    if not rest or (len(rest) == 1 and rest[0].path in outputs):
        return None
    return {**sel, "files": [f.to_json() for f in rest], "outputs": outputs}


class CompactionDriver:
    """Implements `CompactionHost` for the tablets hosted in this process."""

    def __init__(
        self,
        *,
        storage: Storage,
        in_use: FilesInUse,
        table_props: Callable[[str], Properties],
        tablet: Callable[[Hashable], Tablet | None],
        extents: Callable[[], list[Extent]],
        on_committed: Callable[[Extent], None],
    ) -> None:
        self._storage = storage
        self._in_use = in_use
        self._table_props = table_props
        self._tablet = tablet
        self._extents = extents
        self._on_committed = on_committed
        self._lock = threading.Lock()
        self._users: dict[str, UserCompaction] = {}
        self.totals = CompactionTotals()
        self.manager: CompactionManager | None = None
        #: Cancels queued and running compactions: (table_id, extents, kind) -> count.
        self.cancel_hook: Callable[[str, list[Extent], CompactionKind], int] | None = None

    # -- CompactionHost -----------------------------------------------------------------------

    def extents(self) -> list[Hashable]:
        return list(self._extents())

    def tablet_view(self, extent: Hashable) -> TabletView | None:
        tb = self._tablet(extent)
        if tb is None:
            return None
        return view_of(tb.meta, self._table_props(tb.extent.table_id))

    def execute(
        self, extent: Hashable, qjob: QueuedJob, service: str, bucket: TokenBucket | None
    ) -> None:
        tb = self._tablet(extent)
        if tb is None:
            return
        by_uri = {f.uri: f for f in tb.meta.files}
        files = [by_uri.get(f.uri) for f in qjob.job.files]
        if any(f is None for f in files):
            log.debug("dropping stale job for %s: its files changed", extent)
            return
        executor = qjob.job.executor
        iters: IteratorSpecs = ()
        if qjob.job.kind == CompactionKind.USER and tb.meta.selection is not None:
            iters = [tuple(x) for x in tb.meta.selection.get("iterators", [])]
        self.compact(
            tb,
            [f for f in files if f is not None],
            kind=qjob.job.kind,
            executor=executor,
            bucket=bucket,
            is_cancelled=qjob.cancelled.is_set,
            iterators=iters,
        )

    # -- the compaction -----------------------------------------------------------------------

    def compact(
        self,
        tb: Tablet,
        files: Sequence[FileRef],
        *,
        kind: CompactionKind,
        executor: str,
        bucket: TokenBucket | None = None,
        is_cancelled: Callable[[], bool] = lambda: False,
        iterators: IteratorSpecs = (),
    ) -> CompactionResult | None:
        """Reserve `files`, merge them into one, commit. None if they could not be reserved."""
        cid = uuid.uuid4().hex[:16]
        props = self._table_props(tb.extent.table_id)
        record: dict[str, Any] = {"kind": str(kind), "executor": executor}

        def reserve(m: TabletMeta) -> TabletMeta:
            # Decided on the metadata the reservation is made against, not an older copy.
            full = reservation.may_drop_deletes(m, files)
            output = new_file_name("A" if full else "C", tb.extent.table_id)
            user_sel = m.selection if kind == CompactionKind.USER else None
            record.update(
                tmp_path=tmp_name(output, cid),
                output_path=output,
                propagate_deletes=not full,
                selection_id=None if user_sel is None else user_sel.get("id"),
            )
            return _reserve_checked(m, cid, files, record)

        try:
            if tb.mutate(reserve) is None:
                log.debug("not compacting %s: the tablet no longer exists", tb.extent)
                return None
        except ReservationError as e:
            log.debug("not compacting %s: %s", tb.extent, e)
            # The plan that queued this job was made on older metadata (files since reserved,
            # selected or replaced); plan again on fresh metadata, or work the newer state
            # needs could wait for the periodic planner.
            tb.refresh()
            self._on_committed(tb.extent)
            return None
        output, full = record["output_path"], not record["propagate_deletes"]
        names = [f.path.rsplit("/", 1)[-1] for f in files]
        where = executor[2:] if executor.startswith("i.") else executor
        log.info(
            "Compacting %s on %s for %s from %s size %s",
            tb.extent,
            where,
            kind,
            names,
            format_size(sum(f.size for f in files)),
        )
        result: CompactionResult | None = None
        try:
            with self._in_use.using([*(f.path for f in files), output, record["tmp_path"]]):
                result = run_compaction(
                    self._storage,
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
                    is_cancelled=is_cancelled,
                    rate_limiter=bucket if bucket is not None and bucket.rate > 0 else None,
                )
                out_ref = None
                if result.entries_written:
                    self._storage.rename(result.tmp_path, output)
                    out_ref = FileRef(output, result.bytes_written, result.entries_written)
                else:
                    self._storage.delete(result.tmp_path)
                inputs = set(files)
                sel_id = record.get("selection_id")
                try:
                    committed = tb.mutate(
                        lambda m: reservation.commit(m, cid, out_ref).replace(
                            selection=selection_after_commit(m, inputs, out_ref, sel_id)
                        )
                    )
                except ReservationError:
                    committed = None
                if committed is None:
                    # The reservation vanished under us (tablet split, merged or deleted):
                    # the result belongs to no tablet any more.
                    if out_ref is not None:
                        self._storage.delete(output)
                    raise CompactionCancelledError(
                        f"compaction of {tb.extent} lost its reservation; output discarded"
                    )
        except CompactionCancelledError:
            self.totals.record(executor, "cancelled", None)
            tb.mutate(lambda m: reservation.release(m, cid))
            log.info("Cancelled compaction of %s on %s", tb.extent, where)
            # Its files are free again: a plan made while they were reserved (for example for
            # a user compaction started after this one was cancelled) may have left them out.
            self._on_committed(tb.extent)
            raise
        except BaseException:
            self.totals.record(executor, "failed", None)
            try:
                self._storage.delete(record["tmp_path"])
            finally:
                tb.mutate(lambda m: reservation.release(m, cid))
            raise
        self.totals.record(executor, "completed", result)
        log.info(
            "Compacted %s for %s created %s from %s",
            tb.extent,
            kind,
            output.rsplit("/", 1)[-1] if out_ref else "(nothing)",
            names,
        )
        self._user_progress(tb, result, len(files))
        self._on_committed(tb.extent)
        return result

    # -- user compactions ---------------------------------------------------------------------

    def start_user(
        self,
        table_id: str,
        tablets: Sequence[Tablet],
        *,
        iterators: IteratorSpecs = (),
        hints: Mapping[str, str] | None = None,
        ucid: str | None = None,
    ) -> UserCompaction:
        """Select every file of each tablet (even a single one) for a user compaction.

        With `ucid` given, a tablet whose pending selection already has that id (the same
        request made again, after a coordinator failover) counts as selected as it is.
        """
        ucid = ucid or uuid.uuid4().hex[:16]
        uc = UserCompaction(ucid, table_id, set(), len(tablets))
        with self._lock:
            self._users[ucid] = uc
        made: list[Tablet] = []
        for tb in tablets:

            def select(m: TabletMeta) -> TabletMeta | None:
                if m.selection is not None and m.selection.get("id") == ucid:
                    return None  # selected by this very request before: keep it as it is
                if m.selection is not None:
                    raise LithifyError(
                        f"user compaction {m.selection['id']} is still pending on {m.extent}; "
                        f"wait for it or cancel it first"
                    )
                if not m.files:
                    return None
                return m.replace(
                    selection={
                        "id": ucid,
                        "files": [f.to_json() for f in m.files],
                        "outputs": [],
                        "hints": dict(hints or {}),
                        "iterators": [[c, dict(o)] for c, o in iterators],
                    }
                )

            try:
                meta = tb.mutate(select)
            except LithifyError:
                # All or nothing: undo the selections this call made (not those it found).
                self._unselect(made, ucid)
                with self._lock:
                    self._users.pop(ucid, None)
                raise
            if meta is not None:
                made.append(tb)
            else:
                meta = tb.meta  # unchanged: refreshed by `mutate`
            if meta.selection is not None and meta.selection["id"] == ucid:
                uc.pending.add(tb.extent)
        if not uc.pending:
            uc.done.set()
        for extent in list(uc.pending):
            if self.manager is not None:
                self.manager.plan(extent)
        return uc

    @staticmethod
    def _unselect(tablets: Sequence[Tablet], ucid: str) -> None:
        for tb in tablets:
            tb.mutate(
                lambda m: (
                    m.replace(selection=None)
                    if m.selection is not None and m.selection["id"] == ucid
                    else None
                )
            )

    def cancel_user(self, tablets: Sequence[Tablet]) -> int:
        """Cancel the pending user compactions of `tablets`: queued jobs dropped, running ones
        interrupted; the tablets keep valid files (committed passes stay)."""
        ids: set[str] = set()
        extents = {tb.extent for tb in tablets}
        for tb in tablets:
            sel = tb.meta.selection
            if sel is not None:
                ids.add(sel["id"])
                tb.mutate(lambda m: m.replace(selection=None) if m.selection else None)
        if self.cancel_hook is not None:
            by_table: dict[str, list[Extent]] = {}
            for ext in extents:
                by_table.setdefault(ext.table_id, []).append(ext)
            for table_id, exts in by_table.items():
                self.cancel_hook(table_id, exts, CompactionKind.USER)
        with self._lock:
            for ucid in ids:
                uc = self._users.get(ucid)
                if uc is not None:
                    uc.cancelled = True
                    uc.done.set()
                    del self._users[ucid]
        return len(ids)

    def _user_progress(self, tb: Tablet, result: CompactionResult, nfiles: int) -> None:
        sel_before = None
        with self._lock:
            users = list(self._users.values())
        for uc in users:
            if tb.extent not in uc.pending:
                continue
            sel_before = tb.meta.selection
            uc.files_in += nfiles
            uc.entries_read += result.entries_read
            uc.entries_written += result.entries_written
            uc.bytes_written += result.bytes_written
            if sel_before is None or sel_before.get("id") != uc.id:
                uc.finish(tb.extent)
            if uc.done.is_set():
                with self._lock:
                    self._users.pop(uc.id, None)

    def wait_user(
        self, uc: UserCompaction, timeout: float | None, progress: Callable[[int, int], None] | None
    ) -> bool:
        """Wait (bounded) for a user compaction; returns True when it finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not uc.done.wait(0.2):
            if progress is not None:
                progress(uc.total - len(uc.pending), uc.total)
            if deadline is not None and time.monotonic() > deadline:
                return False
        if progress is not None:
            progress(uc.total - len(uc.pending), uc.total)
        with self._lock:
            self._users.pop(uc.id, None)
        return not uc.cancelled


def _reserve_checked(
    m: TabletMeta, cid: str, files: Sequence[FileRef], record: dict[str, Any]
) -> TabletMeta:
    """Reserve, refusing SYSTEM compactions of files a user compaction has selected."""
    if record["kind"] == str(CompactionKind.SYSTEM) and m.selection is not None:
        selected = {FileRef.from_json(x) for x in m.selection["files"]}
        if selected & set(files):
            raise ReservationError(f"files of {m.extent} are selected by a user compaction")
    return reservation.reserve(m, cid, files, record)
