"""Continuous ingest: writes linked lists whose integrity `verify` can check (SYSTEM.md 7).

Modelled on accumulo-testing. Each entry's row is a random 64-bit number as 16 hex digits, its
family and qualifier random 4-hex-digit numbers, and its value
`<client uuid>:<16-hex count>:<16-hex previous row or empty>:<random bytes>:<8-hex CRC32>`.
Entries are written in flushed batches of N; an entry of batch d points to an entry of batch
d-1; after `depth` batches the lists are stitched into one (every first-batch row is written
again pointing at a last-batch row) or, with probability `delete_probability`, deleted.
A lost write shows up in verify as a row that is referenced but not defined.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

DEPTH = 25


def checksum(row: bytes, family: bytes, qualifier: bytes, value_prefix: bytes) -> str:
    """The CRC32 that ends each value: over the key and the value up to the last colon."""
    crc = zlib.crc32(row)
    crc = zlib.crc32(family, crc)
    crc = zlib.crc32(qualifier, crc)
    return f"{zlib.crc32(value_prefix, crc):08x}"


def make_value(
    client: str, count: int, prev: bytes | None, payload: bytes, row: bytes, fam: bytes, qual: bytes
) -> bytes:
    prefix = f"{client}:{count:016x}:".encode() + (prev or b"") + b":" + payload + b":"
    return prefix + checksum(row, fam, qual, prefix).encode()


@dataclass
class IngestStats:
    written: int = 0
    deleted: int = 0
    batches: int = 0


class ContinuousIngest:
    """Generates the linked-list batches; `write(table)` sends each one to the store."""

    def __init__(
        self,
        write: Callable[[pa.Table], None],
        *,
        batch_size: int = 10_000,
        delete_probability: float = 0.0,
        value_bytes: int = 0,
        seed: int | None = None,
    ) -> None:
        if batch_size < 2:
            raise ValueError(f"batch size must be >= 2, got {batch_size}")
        if not 0.0 <= delete_probability <= 1.0:
            raise ValueError(f"delete probability must be in [0, 1], got {delete_probability}")
        self._write = write
        self._n = batch_size
        self._p_delete = delete_probability
        self._value_bytes = value_bytes
        self._rng = np.random.default_rng(seed)
        self.client = (
            str(uuid.UUID(int=int(self._rng.integers(0, 2**63)) << 64 | 1))
            if seed is not None
            else str(uuid.uuid4())
        )
        self._count = 0
        self.stats = IngestStats()

    def _random_rows(self, n: int) -> list[bytes]:
        keys = self._rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
        return [f"{k:016x}".encode() for k in keys.tolist()]

    def _random_cols(self, n: int) -> list[bytes]:
        return [f"{k:04x}".encode() for k in self._rng.integers(0, 0x10000, size=n).tolist()]

    def _entries(
        self, rows: list[bytes], fams: list[bytes], quals: list[bytes], prevs: list[bytes | None]
    ) -> pa.Table:
        values = []
        for row, fam, qual, prev in zip(rows, fams, quals, prevs, strict=True):
            payload = (
                self._rng.bytes(self._value_bytes).hex().encode() if self._value_bytes else b""
            )
            values.append(make_value(self.client, self._count, prev, payload, row, fam, qual))
            self._count += 1
        return pa.table(
            {
                "row": pa.array(rows, pa.binary()),
                "family": pa.array(fams, pa.binary()),
                "qualifier": pa.array(quals, pa.binary()),
                "value": pa.array(values, pa.binary()),
            }
        )

    def _send(self, table: pa.Table) -> None:
        self._write(table)
        self.stats.batches += 1

    def run_cycle(self, budget: int) -> int:
        """Write one set of linked lists (DEPTH batches, then stitch or delete); <= budget entries.

        Returns the number of entries (puts and deletes) written.
        """
        n = max(2, min(self._n, budget // (DEPTH + 1) or 2))
        written = 0
        batches: list[tuple[list[bytes], list[bytes], list[bytes]]] = []
        prev_rows: list[bytes | None] = [None] * n
        for _ in range(DEPTH):
            rows, fams, quals = self._random_rows(n), self._random_cols(n), self._random_cols(n)
            self._send(self._entries(rows, fams, quals, prev_rows))
            batches.append((rows, fams, quals))
            prev_rows = list(rows)
            written += n
        if self._rng.random() < self._p_delete:
            for rows, fams, quals in reversed(batches):
                self._send(
                    pa.table(
                        {
                            "row": pa.array(rows, pa.binary()),
                            "family": pa.array(fams, pa.binary()),
                            "qualifier": pa.array(quals, pa.binary()),
                            "deleted": pa.array([True] * len(rows)),
                        }
                    )
                )
                written += len(rows)
                self.stats.deleted += len(rows)
        else:
            first_rows, first_fams, first_quals = batches[0]
            last_rows = batches[-1][0]
            stitched = self._entries(
                first_rows[1:], first_fams[1:], first_quals[1:], list(last_rows[:-1])
            )
            self._send(stitched)
            written += stitched.num_rows
        self.stats.written += written
        return written

    def run(self, entries: int, on_progress: Callable[[int], None] | None = None) -> IngestStats:
        """Write about `entries` entries in whole cycles (the last one may be smaller)."""
        done = 0
        for _ in range(1_000_000):
            if done >= entries:
                break
            w = self.run_cycle(entries - done)
            done += w
            if on_progress is not None:
                on_progress(w)
        return self.stats
