"""The end of an external compaction: the final state and the commit protocol, or the release.

docs/EXTERNAL_COMPACTIONS.md, "Commit": every step can be repeated after a crash, because a
new coordinator finishes whatever final state it finds (`Committer.recover`):

1. `put_final_state(ecid, FINISHED, result)`;
2. rename the temporary output to its final name (or delete it when nothing was written);
3. commit in the tablet's metadata (`reservation.commit` plus the user selection's update); if
   the record is gone, the output belongs to nobody and is deleted;
4. delete the final state and tell the tablet server to refresh the tablet.

A failed or cancelled compaction is released instead: its temporary file is deleted and its
record removed, so that its files become candidates again.

`Committer` does the I/O of these steps and nothing else: which compaction is running, and the
locking around a report, belong to the coordinator (`core.py`). The tablet mutations are plain
functions (`commit_mutation`) and so is the final state's content (`final_state_data`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

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
        user = rec.get("kind") == "USER"
        return reservation.commit(m, ecid, out_ref).replace(
            selection=selection_after_commit(m, inputs, out_ref, user)
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
                    "compaction %s of %s: output %s is missing; failing it", ecid, extent, tmp
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
            log.info("compaction %s of %s: record gone at commit (%s)", ecid, extent, outcome)
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
        tmp = fs.data.get("tmp_path")
        if isinstance(tmp, str):
            self.storage.delete(tmp)
        self.release_record(fs.extent, fs.ecid)
        self.delete_final_state(fs.ecid)
        return False

    def release(self, extent: Extent, ecid: str, tmp_path: str) -> None:
        """A failed or cancelled compaction: delete its temporary output, remove its record
        (its files become candidates again) and have the tablet planned again."""
        self.storage.delete(tmp_path)
        self.release_record(extent, ecid)
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
