"""The consistency check every fault test ends with (issue 4).

* every file of every tablet exists and is readable (footer and every batch);
* no file is an input of two running compaction records;
* with `settled=True` (all compactions finished, garbage collected): no temporary file is left;
* where continuous ingest ran: verify has UNDEFINED = 0 and CORRUPT = 0.
"""

from __future__ import annotations

from collections import Counter

from lithify.continuous.verify import VerifyResult, verify_batches
from lithify.data.ranges import FileRef
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
