"""The consistency check every fault test ends with (issue 4).

* every file of every tablet exists and is readable (footer and every batch);
* no file is an input of two running compaction records;
* with `settled=True` (all compactions finished, garbage collected): no temporary file is left;
* where continuous ingest ran: verify has UNDEFINED = 0 and CORRUPT = 0.

And the recoverability invariant raced by writes and flushes (`race_writes_and_flushes`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from lithify.continuous.verify import VerifyResult, verify_batches
from lithify.data.ranges import Extent, FileRef
from lithify.files.naming import is_tmp
from lithify.files.reader import SortedFileReader
from lithify.files.storage import Storage
from lithify.metadata.store import MetadataStore


def check_files(meta: MetadataStore, storage: Storage, *, settled: bool = False) -> int:
    """Assert the file-level invariants; returns the number of file references checked."""
    checked = 0
    for table in meta.list_tables():
        for tablet in meta.tablets(table.id):
            for f in tablet.files:
                with SortedFileReader.open(storage, f.path) as reader:
                    n = sum(b.num_rows for b in reader.batches(f.fence))
                    assert n <= reader.entries, f"{f.path}: read {n} of {reader.entries}"
                checked += 1
            inputs = Counter(
                FileRef.from_json(x).path
                for rec in tablet.compactions.values()
                for x in rec["inputs"]
            )
            twice = [p for p, c in inputs.items() if c > 1]
            assert not twice, f"{tablet.extent}: files in two running compactions: {twice}"
            present = {f.path for f in tablet.files}
            for cid, rec in tablet.compactions.items():
                for x in rec["inputs"]:
                    path = FileRef.from_json(x).path
                    assert path in present, f"{tablet.extent}: {cid} reserves missing {path}"
    if settled:
        leftovers = [p for p in storage.list_files("tables") if is_tmp(p)]
        assert not leftovers, f"temporary files left after cleanup: {leftovers}"
    return checked


def check_verify(batches) -> VerifyResult:  # type: ignore[no-untyped-def]
    """Continuous-ingest verify over scan batches; asserts UNDEFINED = 0 and CORRUPT = 0."""
    result = verify_batches(batches)
    assert result.undefined == 0, f"UNDEFINED={result.undefined}: {result.undefined_examples}"
    assert result.corrupt == 0, f"CORRUPT={result.corrupt}"
    assert result.referenced > 0
    return result


def race_writes_and_flushes(
    meta: MetadataStore,
    extent: Extent,
    write: Callable[[int], int],
    flush: Callable[[], object],
    seconds: float = 2.0,
) -> None:
    """Run `write(i)` (returns the write's sequence number) and `flush()` in two threads for
    `seconds`, asserting after every write that it is recoverable at that moment: in a committed
    file (the tablet's flushed_seq >= its sequence number) or in a log the metadata lists."""
    deadline = time.monotonic() + seconds
    errors: list[str] = []
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(1_000_000):
                if time.monotonic() > deadline:
                    return
                seq = write(i)
                m = meta.get_tablet(extent)
                if m is not None and m.flushed_seq < seq and not m.logs:
                    errors.append(f"seq {seq}: flushed_seq {m.flushed_seq}, no logs")
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            failures.append(e)

    def flusher() -> None:
        try:
            for _ in range(1_000_000):
                if time.monotonic() > deadline:
                    return
                flush()
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            failures.append(e)

    threads = [threading.Thread(target=writer), threading.Thread(target=flusher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60 + seconds)
    assert not any(t.is_alive() for t in threads), "writer or flusher did not stop"
    assert not failures, failures
    assert not errors, errors[:5]
