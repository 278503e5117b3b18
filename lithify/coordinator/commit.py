"""The end of an external compaction: the final state and the commit protocol, or the release.

docs/EXTERNAL_COMPACTIONS.md, "Commit": every step can be repeated after a crash, because a
new coordinator finishes whatever final state it finds (`Committer.recover`):

1. `put_final_state(ecid, FINISHED, result)`;
2. rename the temporary output to its final name (or delete it when nothing was written);
3. commit in the tablet's metadata (`reservation.commit` plus the user selection's update); if
   the record is gone, the output belongs to nobody and is deleted;
4. delete the final state and tell the tablet server to refresh the tablet.

A failed or cancelled compaction is released instead: its record is removed, so that its files
become candidates again, and its temporary file deleted.

`Committer` does the I/O of these steps and nothing else: which compaction is running, and the
locking around a report, belong to the coordinator (`core.py`). The tablet mutations are plain
functions (`commit_mutation`) and so is the final state's content (`final_state_data`).

Step 1 is the durable decision (SYSTEM.md 5.5): once it is written the compaction commits, by
this coordinator or, after a crash, by the next one. So the coordinator answers the compactor
right after it, and `BackgroundCommits` runs steps 2-4 on a thread of its own.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from lithify.data.ranges import Extent, FileRef
from lithify.errors import TableNotFoundError
from lithify.files.storage import Storage
from lithify.metadata.store import FinalState, MetadataStore, TabletMeta
from lithify.tablet import reservation
from lithify.tablet.compactions import selection_after_commit

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Outcomes of a commit.
COMMITTED = "committed"
DROPPED = "dropped"

_RESULT_KEYS = ("entries_read", "entries_written", "bytes_read", "bytes_written")

#: A background commit that failed is tried again after this long, doubling up to the maximum.
RETRY_MIN_S = 0.2
RETRY_MAX_S = 10.0

#: Runs a fenced metadata write: deposes the coordinator when the write raised LeaseLostError.
Guard = Callable[[Callable[[], T]], T]
#: Tells the tablet server that these tablets' metadata changed (best effort).
Refresh = Callable[[Sequence[Extent]], None]


def final_state_data(
    result: Mapping[str, Any],
    *,
    tmp_path: str,
    output_path: str,
    kind: str,
    queue: str,
    compactor: str,
) -> dict[str, Any]:
    """The `data` of a FINISHED final state: the result counters and where the output is.

    The paths sit at the top level, where the garbage collector looks
    (`MetadataStore.referenced_files`), so neither file is collected before the commit.
    """
    data: dict[str, Any] = {k: int(result.get(k, 0)) for k in _RESULT_KEYS}
    data.update(
        tmp_path=tmp_path, output_path=output_path, kind=kind, queue=queue, compactor=compactor
    )
    return data


def commit_mutation(
    ecid: str, out_ref: FileRef | None
) -> Callable[[TabletMeta], TabletMeta | None]:
    """Commit step 3 as a tablet mutation: replace the record's inputs by `out_ref` (None: the
    compaction wrote nothing) and update the user selection; None when the record is gone."""

    def commit(m: TabletMeta) -> TabletMeta | None:
        rec = m.compactions.get(ecid)
        if rec is None:
            return None
        inputs = {FileRef.from_json(x) for x in rec["inputs"]}
        return reservation.commit(m, ecid, out_ref).replace(
            selection=selection_after_commit(m, inputs, out_ref, rec.get("selection_id"))
        )

    return commit


class Committer:
    """The commit protocol's and the release's writes, fenced with the coordinator's lease.

    `guard` runs each fenced write (so a lost lease deposes the coordinator); `refresh`, when
    given, is told about every tablet whose files changed.
    """

    def __init__(
        self,
        meta: MetadataStore,
        storage: Storage,
        fence: tuple[str, int],
        guard: Guard[Any],
        refresh: Refresh | None = None,
    ) -> None:
        self.meta = meta
        self.storage = storage
        self.fence = fence
        self._guard = guard
        self._refresh = refresh

    def put_final_state(self, ecid: str, extent: Extent, data: Mapping[str, Any]) -> None:
        """Commit step 1 (`data` from `final_state_data`)."""
        self._guard(
            lambda: self.meta.put_final_state(
                ecid, extent.table_id, extent, "FINISHED", dict(data), fence=self.fence
            )
        )

    def commit(self, ecid: str, extent: Extent, data: Mapping[str, Any]) -> str:
        """Steps 2-4 of the commit, each repeatable: rename, commit, delete the final state.

        Returns COMMITTED, or DROPPED when the record had vanished (the output is deleted
        unless a tablet already references it, i.e. this is a repeat after the commit).
        """
        tmp, output = str(data["tmp_path"]), str(data["output_path"])
        written = int(data.get("entries_written", 0))
        out_ref: FileRef | None = None
        if written > 0:
            if self.storage.exists(tmp):
                self.storage.rename(tmp, output)
            elif not self.storage.exists(output):
                # Neither file: the result is lost (deleted by hand?). Fail it: the inputs
                # are intact and become candidates again.
                log.error(
                    "compaction %s of %s: temporary %s and output %s are missing; failing it",
                    ecid,
                    extent,
                    tmp,
                    output,
                )
                self.release_record(extent, ecid)
                self.delete_final_state(ecid)
                self.notify([extent])
                return DROPPED
            out_ref = FileRef(output, int(data.get("bytes_written", 0)), written)
        else:
            self.storage.delete(tmp)
        new = self._guard(
            lambda: self.meta.mutate_tablet(
                extent, commit_mutation(ecid, out_ref), fence=self.fence
            )
        )
        outcome = COMMITTED
        if new is None:
            if out_ref is not None and self._output_referenced(extent.table_id, output):
                pass  # committed before a crash, the final state outlived it: a repeat
            else:
                # Cancelled, split, merged or deleted meanwhile: nothing may reference it.
                outcome = DROPPED
                if out_ref is not None:
                    self.storage.delete(output)
            log.info(
                "compaction %s of %s: record gone at commit (%s)%s",
                ecid,
                extent,
                outcome,
                f"; output {output} deleted" if outcome == DROPPED and out_ref else "",
            )
        else:
            log.info(
                "Compacted %s created %s (ecid %s)",
                extent,
                output.rsplit("/", 1)[-1] if out_ref else "(nothing)",
                ecid,
            )
        self.delete_final_state(ecid)
        self.notify([extent])
        return outcome

    def recover(self, fs: FinalState) -> bool:
        """Finish a final state left over by a crashed coordinator: commit a FINISHED one (True),
        or clean up after any other (False): delete its temporary file, release its record."""
        if fs.state == "FINISHED":
            self.commit(fs.ecid, fs.extent, fs.data)
            return True
        self.release_record(fs.extent, fs.ecid)  # fenced first: see `release`
        tmp = fs.data.get("tmp_path")
        if isinstance(tmp, str):
            self.storage.delete(tmp)
        self.delete_final_state(fs.ecid)
        return False

    def release(self, extent: Extent, ecid: str, tmp_path: str) -> None:
        """A failed or cancelled compaction: remove its record (its files become candidates
        again), delete its temporary output and have the tablet planned again.

        The fenced write comes first: a deposed coordinator must not delete an output that its
        successor may be committing. A crash between the two leaves an unreferenced temporary
        file, which the garbage collector deletes (`lithify.gc`).
        """
        self.release_record(extent, ecid)
        self.storage.delete(tmp_path)
        self.notify([extent])

    def release_record(self, extent: Extent, ecid: str) -> None:
        """Remove `ecid`'s record from the tablet (a no-op when it is gone)."""
        self._guard(
            lambda: self.meta.mutate_tablet(
                extent, lambda m: reservation.release(m, ecid), fence=self.fence
            )
        )

    def delete_final_state(self, ecid: str) -> None:
        self._guard(lambda: self.meta.delete_final_state(ecid, fence=self.fence))

    def notify(self, extents: Sequence[Extent]) -> None:
        """Tell the tablet server to refresh `extents` (best effort, contract: refresh)."""
        if self._refresh is None:
            return
        try:
            self._refresh(list(extents))
        except Exception as e:  # noqa: BLE001 - best effort (contract: refresh)
            log.debug("refresh of %s failed: %s", extents, e)

    def _output_referenced(self, table_id: str, path: str) -> bool:
        try:
            tablets = self.meta.tablets(table_id)
        except TableNotFoundError:
            return False
        return any(f.path == path for m in tablets for f in m.files)


class BackgroundCommits(Generic[T]):
    """Commits that run after the compactor got its answer: one worker thread, a bounded queue.

    Why: steps 2-4 of a commit (rename, the tablet's update, forgetting the final state, the
    refresh) took a few milliseconds during which the compactor waited for its answer before it
    asked for its next job. They are repeatable and a successor finishes them from the final
    state, so nothing needs them done before the answer.

    `commit(item)` does one; it returns True when the item is done (committed, or given up for
    a successor to finish), False to have it tried again after a backoff (a passing database or
    storage error). A retried item waits in the queue without holding up the others. `submit`
    blocks while `maxsize` items wait, which slows reports down instead of growing memory.
    """

    def __init__(self, commit: Callable[[T], bool], *, maxsize: int = 1024) -> None:
        self._commit = commit
        self._maxsize = maxsize
        self._cv = threading.Condition()
        #: (due time, sequence, item, delay of the next retry): the first one due runs next.
        self._heap: list[tuple[float, int, T, float]] = []
        self._seq = itertools.count()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, item: T) -> bool:
        """Queue `item`; False (dropped) once closed: its final state waits for a successor."""
        with self._cv:
            while len(self._heap) >= self._maxsize and not self._closed:
                self._cv.wait()
            if self._closed:
                return False
            if self._thread is None:  # started by the first commit: most cores never commit
                self._thread = threading.Thread(target=self._run, name="committer", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (time.monotonic(), next(self._seq), item, RETRY_MIN_S))
            self._cv.notify_all()
        return True

    def pending(self) -> int:
        """Items queued or running."""
        with self._cv:
            return len(self._heap) + self._busy

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted item is done; False when `timeout` passed first."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._heap and not self._busy, timeout)

    def close(self, timeout: float) -> bool:
        """Let the queued items run for up to `timeout`, then stop (what is left stays for a
        successor); returns whether everything was done."""
        drained = self.drain(timeout)
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._cv.notify_all()
        return drained

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cv.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._closed:
                    return
                _, _, item, delay = heapq.heappop(self._heap)
                self._busy = True
                self._cv.notify_all()  # room in the queue
            done = False
            try:
                done = self._commit(item)
            except BaseException:  # noqa: BLE001 - the worker must live on; `commit` logs
                log.exception("background commit failed")
            with self._cv:
                self._busy = False
                if not done and not self._closed:
                    due = time.monotonic() + delay
                    heapq.heappush(
                        self._heap, (due, next(self._seq), item, min(RETRY_MAX_S, delay * 2))
                    )
                self._cv.notify_all()
