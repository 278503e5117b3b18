"""User compactions started through the tablet server, followed through the tablets' metadata.

A user compaction marks every file of each tablet in range as selected (the tablet's
`selection`, with the compaction's id); each pass that commits shrinks the selection, and the
selection disappears when the tablet is down to one file written by the compaction. Passes may
run on internal executors or on compactors, committed by the coordinator in another process, so
the one place that always knows how far a user compaction got is the metadata: a user
compaction is finished when no tablet of its table still carries its selection id.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lithify.errors import LithifyError, TableNotFoundError
from lithify.store import Store

#: Requests remembered for status queries (oldest forgotten first).
_REMEMBERED = 1000
_POLL_S = 0.2


@dataclass
class _Request:
    id: str
    table_id: str
    table: str
    tablets: int
    files_in: int
    started: float = field(default_factory=time.time)
    cancelled: bool = False


class UserCompactions:
    """Starts user compactions on a store and answers how far each one got."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._requests: OrderedDict[str, _Request] = OrderedDict()

    def start(
        self,
        table: str,
        start: bytes | None,
        end: bytes | None,
        *,
        flush: bool = True,
        iterators: Sequence[tuple[str, Mapping[str, str]]] = (),
        hints: Mapping[str, str] | None = None,
        ucid: str | None = None,
    ) -> dict[str, Any]:
        """Select the files of every tablet in range and queue the work; returns its status.

        `ucid` names the selection (see `Store.compact`)."""
        info = self._store.table_info(table)
        summary = self._store.compact(
            table,
            start,
            end,
            flush=flush,
            wait=False,
            iterators=[(c, dict(o)) for c, o in iterators],
            hints=dict(hints or {}),
            ucid=ucid,
        )
        files_in = sum(
            len(m.selection.get("files", ()))
            for m in self._store.meta.tablets(info.id)
            if m.selection is not None and m.selection.get("id") == summary.id
        )
        req = _Request(summary.id, info.id, info.name, summary.tablets, files_in)
        with self._lock:
            self._requests[req.id] = req
            while len(self._requests) > _REMEMBERED:
                self._requests.popitem(last=False)
        return self.status(req.id)

    def status(self, ucid: str) -> dict[str, Any]:
        """`state`: RUNNING, FINISHED, CANCELLED, or UNKNOWN for an id this server never saw
        (it restarted since); `pending`: tablets still to finish."""
        with self._lock:
            req = self._requests.get(ucid)
        if req is None:
            return {"id": ucid, "state": "UNKNOWN", "pending": None, "tablets": None}
        try:
            metas = self._store.meta.tablets(req.table_id)
        except TableNotFoundError:
            metas, req.cancelled = [], True
        pending = sum(1 for m in metas if m.selection is not None and m.selection.get("id") == ucid)
        state = "CANCELLED" if req.cancelled else "RUNNING" if pending else "FINISHED"
        return {
            "id": ucid,
            "table": req.table,
            "state": state,
            "pending": pending,
            "tablets": req.tablets,
            "files_in": req.files_in,
            "started": req.started,
        }

    def wait(self, ucid: str, timeout_s: float | None) -> dict[str, Any]:
        """Wait (bounded by `timeout_s`, None: until done) while the compaction is RUNNING."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            st = self.status(ucid)
            if st["state"] != "RUNNING":
                return st
            if deadline is not None and time.monotonic() >= deadline:
                return st
            time.sleep(_POLL_S)

    def cancel(self, table: str) -> int:
        """Cancel the table's user compactions; returns how many the store cancelled.

        Only compactions still selecting files become CANCELLED; finished ones stay FINISHED.
        """
        info = self._store.table_info(table)
        running = {m.selection.get("id") for m in self._store.meta.tablets(info.id) if m.selection}
        # Flagged before the selections are dropped: a status query in between would otherwise
        # find no selection left and answer FINISHED.
        with self._lock:
            for req in self._requests.values():
                if req.id in running:
                    req.cancelled = True
        return self._store.cancel_compaction(table)

    def forget_table(self, table_id: str) -> None:
        """The table was deleted: its running compactions end CANCELLED."""
        with self._lock:
            for req in self._requests.values():
                if req.table_id == table_id:
                    req.cancelled = True


def check_iterators(raw: Any) -> list[tuple[str, dict[str, str]]]:
    """Iterator specs from JSON (`[[CLASS, {OPTS}], ...]`); LithifyError when malformed."""
    out: list[tuple[str, dict[str, str]]] = []
    for item in raw or ():
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], dict)
        ):
            raise LithifyError(f"iterator spec {item!r}: expected [module:Class, {{options}}]")
        out.append((item[0], {str(k): str(v) for k, v in item[1].items()}))
    return out
