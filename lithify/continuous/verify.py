"""Continuous-ingest verify: reads the whole table and counts what the linked lists say.

REFERENCED: defined rows some entry points to. UNREFERENCED: defined rows nothing points to
(list heads). UNDEFINED: rows pointed to but not present: data loss. CORRUPT: entries whose
CRC does not match. A healthy run has UNDEFINED = 0 and CORRUPT = 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from lithify.continuous.ingest import checksum


@dataclass
class VerifyResult:
    referenced: int
    unreferenced: int
    undefined: int
    corrupt: int
    entries: int
    undefined_examples: list[bytes]

    @property
    def ok(self) -> bool:
        return self.undefined == 0 and self.corrupt == 0


def verify_batches(batches: Iterable[pa.RecordBatch]) -> VerifyResult:
    defined: set[bytes] = set()
    referenced: set[bytes] = set()
    corrupt = entries = 0
    for batch in batches:
        rows = batch.column("row").to_pylist()
        fams = batch.column("family").to_pylist()
        quals = batch.column("qualifier").to_pylist()
        values = batch.column("value").to_pylist()
        for row, fam, qual, value in zip(rows, fams, quals, values, strict=True):
            entries += 1
            prefix, sep, crc = value.rpartition(b":")
            parts = prefix.split(b":")
            if (
                not sep
                or len(parts) != 4
                or checksum(row, fam, qual, prefix + b":") != crc.decode("ascii", "replace")
            ):
                corrupt += 1
                continue
            defined.add(row)
            if parts[2]:
                referenced.add(parts[2])
    undefined = referenced - defined
    return VerifyResult(
        referenced=len(referenced & defined),
        unreferenced=len(defined - referenced),
        undefined=len(undefined),
        corrupt=corrupt,
        entries=entries,
        undefined_examples=sorted(undefined)[:10],
    )
