"""The running set: external compactions in flight, and how the coordinator judges them.

A running compaction is durable as a record in its tablet's `compactions` map (written by the
reservation); `RunningCompaction` is the coordinator's memory of it: the job handed out, the
compactor's last status and a phi-accrual detector over its heartbeats. The memory is rebuilt
from the records after a failover (`records`, `RunningCompaction.from_record`).

Two judgements end a compaction without its compactor's word (docs/EXTERNAL_COMPACTIONS.md,
"Failure detection"):

* dead: its detector passed the phi threshold (`suspected`) and its compactor does not confirm
  that it still runs the ECID (`confirmed_by`);
* vanished: its record or tablet is gone, or its user selection ended (`vanished`, deciding
  with the pure `cancel_reason`).

Nothing here locks: `RunningSet` and `SeenCompactors` are plain bookkeeping that the
coordinator guards with its own lock; the functions that read metadata take no lock at all.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lithify.coordinator.phi import PhiAccrualDetector
from lithify.data.ranges import Extent
from lithify.errors import TableNotFoundError
from lithify.metadata.store import MetadataStore, TabletMeta
from lithify.rpc.wire import extent_to_json

log = logging.getLogger(__name__)

#: States of a running external compaction in the coordinator's memory.
RUNNING = "RUNNING"
CANCELLING = "CANCELLING"
COMMITTING = "COMMITTING"

#: ECIDs remembered after they ended (a late `failed` still deletes the temporary file, a
#: repeated report is recognised without scanning the metadata).
_GONE_MEMORY = 10000
#: A compactor counts as "seen" for the metrics if it called within this time.
SEEN_WINDOW_S = 300.0
_SEEN_MEMORY = 4096
#: Above this many running compactions of one table, the check reads the whole table once
#: instead of each tablet.
_CHECK_WHOLE_TABLE = 32

#: `ask_compactor(address) -> ecid | None`: which ECID a compactor runs now (`GET /v1/running`).
AskCompactor = Callable[[str], "str | None"]


@dataclass
class RunningCompaction:
    """An external compaction the coordinator knows to be running (its record is in metadata)."""

    ecid: str
    extent: Extent
    queue: str
    kind: str
    compactor: str
    address: str | None
    selection_id: str | None
    tmp_path: str
    output_path: str
    priority: int
    started: float
    detector: PhiAccrualDetector
    job: dict[str, Any] | None = None
    state: str = RUNNING
    cancel_reason: str | None = None
    status: str = "RESERVED"
    entries_read: int = 0
    entries_written: int = 0

    @classmethod
    def from_record(
        cls,
        extent: Extent,
        rec: Mapping[str, Any],
        detector: PhiAccrualDetector,
        job: dict[str, Any] | None = None,
    ) -> RunningCompaction:
        """From a tablet's `compactions` record (docs/EXTERNAL_COMPACTIONS.md): the same
        constructor serves a fresh reservation (with its `job`) and an adopted record (without,
        the compactor has its job already). Tolerant of missing optional fields, as records
        written by older versions may lack them."""
        return cls(
            ecid=str(rec["ecid"]),
            extent=extent,
            queue=str(rec.get("queue") or ""),
            kind=str(rec.get("kind", "SYSTEM")),
            compactor=str(rec.get("compactor") or ""),
            address=rec.get("address"),
            selection_id=rec.get("selection_id"),
            tmp_path=str(rec["tmp_path"]),
            output_path=str(rec["output_path"]),
            priority=int(rec.get("priority", 0)),
            started=float(rec.get("started", time.time())),
            detector=detector,
            job=job,
        )

    def to_json(self, now: float) -> dict[str, Any]:
        """The compaction as `/v1/status` lists it."""
        return {
            "ecid": self.ecid,
            "extent": extent_to_json(self.extent),
            "queue": self.queue,
            "kind": self.kind,
            "compactor": self.compactor,
            "address": self.address,
            "state": self.state,
            "status": self.status,
            "entries_read": self.entries_read,
            "entries_written": self.entries_written,
            "started": self.started,
            "phi": round(self.detector.phi(now), 3),
        }

    def request_cancel(self, reason: str) -> bool:
        """Mark a RUNNING compaction CANCELLING (its compactor learns it at its next status);
        False when it is already cancelling or committing."""
        if self.state != RUNNING:
            return False
        self.state = CANCELLING
        self.cancel_reason = reason
        return True


class RunningSet:
    """The running compactions by ECID, plus a bounded memory of the ECIDs that ended.

    The memory answers reports that come after the end (a repeated `finished`, a late `failed`)
    without a metadata scan, and keeps the temporary path of a failed compaction so that such a
    late report can still delete the file.
    """

    def __init__(self) -> None:
        self._runs: dict[str, RunningCompaction] = {}
        self._gone: OrderedDict[str, str | None] = OrderedDict()

    def get(self, ecid: str) -> RunningCompaction | None:
        return self._runs.get(ecid)

    def __contains__(self, ecid: str) -> bool:
        return ecid in self._runs

    def __len__(self) -> int:
        return len(self._runs)

    def values(self) -> list[RunningCompaction]:
        return list(self._runs.values())

    def ecids(self) -> set[str]:
        return set(self._runs)

    def add(self, run: RunningCompaction) -> RunningCompaction:
        """Add `run` unless its ECID is running already (adoption); returns the one in the set."""
        return self._runs.setdefault(run.ecid, run)

    def put(self, run: RunningCompaction) -> None:
        """Add `run`, replacing what was known of its ECID (it was just reserved: its record
        and job are the newest)."""
        self._runs[run.ecid] = run

    def end(self, ecid: str, tmp_path: str | None = None) -> None:
        """Forget a running compaction and remember that it ended (with its temporary file
        when that file is nobody's now and a late report should delete it)."""
        self._runs.pop(ecid, None)
        self._gone[ecid] = tmp_path
        self._gone.move_to_end(ecid)
        while len(self._gone) > _GONE_MEMORY:
            self._gone.popitem(last=False)

    def ended(self, ecid: str) -> bool:
        return ecid in self._gone

    def leftover_tmp(self, ecid: str) -> str | None:
        """The temporary file an ended compaction left behind, if any."""
        return self._gone.get(ecid)

    def by_queue(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self._runs.values():
            counts[r.queue] = counts.get(r.queue, 0) + 1
        return counts


class SeenCompactors:
    """When each compactor last called, for the "compactors seen" metric; bounded."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    def saw(self, compactor: str, now: float) -> None:
        """Note a call from `compactor`; forget long-silent ones past a bound."""
        self._seen[compactor] = now
        if len(self._seen) > _SEEN_MEMORY:
            cutoff = now - SEEN_WINDOW_S
            self._seen = {k: t for k, t in self._seen.items() if t >= cutoff}

    def count(self, now: float) -> int:
        return sum(1 for t in self._seen.values() if now - t <= SEEN_WINDOW_S)


# ---------------------------------------------------------------------- records in metadata


def records(meta: MetadataStore) -> Iterator[tuple[Extent, Mapping[str, Any]]]:
    """Every external compaction record of every tablet: (extent, record).

    Internal compactions of the tablet server share the map; theirs have no `ecid` equal to
    their key, so they are skipped. A table deleted during the scan is skipped too.
    """
    for table in meta.list_tables():
        try:
            tablets = meta.tablets(table.id)
        except TableNotFoundError:
            continue
        for m in tablets:
            for key, rec in m.compactions.items():
                if isinstance(rec, Mapping) and rec.get("ecid") == key:
                    yield m.extent, rec


def find_record(meta: MetadataStore, ecid: str) -> tuple[Extent, Mapping[str, Any]] | None:
    """The record of `ecid` and its tablet, or None (a full scan: rare, see
    `CompactionCoordinator._adopt_unknown`)."""
    for extent, rec in records(meta):
        if rec["ecid"] == ecid:
            return extent, rec
    return None


# ---------------------------------------------------------------------- judgements


def suspected(run: RunningCompaction, now: float, threshold: float) -> bool:
    """Whether `run`'s heartbeats stopped long enough to ask its compactor (not while it
    commits: then the coordinator itself is busy with it)."""
    return run.state != COMMITTING and run.detector.is_suspect(now, threshold)


def confirmed_by(ask: AskCompactor | None, run: RunningCompaction) -> bool:
    """Whether `run`'s compactor says it still runs that ECID; unreachable means no."""
    if ask is None or not run.address:
        return False
    try:
        return ask(run.address) == run.ecid
    except Exception as e:  # noqa: BLE001 - unreachable is an answer too
        log.debug("compactor %s at %s unreachable: %s", run.compactor, run.address, e)
        return False


def cancel_reason(run: RunningCompaction, m: TabletMeta | None) -> str | None:
    """Why `run` must be cancelled given its tablet's metadata `m` (None: tablet gone)."""
    if m is None:
        return "tablet gone"
    if run.ecid not in m.compactions:
        return "record gone"
    if run.kind == "USER" and (m.selection is None or m.selection.get("id") != run.selection_id):
        return "user compaction cancelled"
    return None


def vanished(
    meta: MetadataStore, runs: Sequence[RunningCompaction]
) -> list[tuple[RunningCompaction, str]]:
    """The RUNNING compactions of `runs` to cancel, with why (`cancel_reason`).

    Bounded I/O: per table one read of each tablet concerned, or of the whole table once when
    more than `_CHECK_WHOLE_TABLE` of its compactions run.
    """
    by_table: dict[str, list[RunningCompaction]] = {}
    for r in runs:
        if r.state == RUNNING:
            by_table.setdefault(r.extent.table_id, []).append(r)
    out: list[tuple[RunningCompaction, str]] = []
    for table_id, group in by_table.items():
        metas: dict[Extent, TabletMeta] = {}
        if len(group) > _CHECK_WHOLE_TABLE:
            with contextlib.suppress(TableNotFoundError):  # deleted: all vanished
                metas = {m.extent: m for m in meta.tablets(table_id)}
        else:
            for run in group:
                found = meta.get_tablet(run.extent)
                if found is not None:
                    metas[run.extent] = found
        for run in group:
            reason = cancel_reason(run, metas.get(run.extent))
            if reason is not None:
                out.append((run, reason))
    return out
