"""A writer process for the crash tests: writes tagged batches and says which were acknowledged.

Run as ``python tests/crash_child.py STORE_DIR MODE SEED [START [COUNT]]``. The parent
(tests/test_crash.py, tests/test_bad_input.py) creates the table and sets the properties first,
then starts this program, reads its stdout and kills it with SIGKILL at a moment it chooses.

Protocol on stdout, one line per event, flushed at once so that the parent sees an ACK no later
than the moment the write returned:

* ``READY`` once the store is open (recovery done);
* ``ACK <batch>`` after ``Store.write`` of batch ``<batch>`` returned (the batch is acknowledged);
* ``BEGIN <op> <batch>`` / ``END <op> <batch>`` around a flush or compaction (modes ``flush`` and
  ``compact``), so the parent can aim a kill at the operation and tell afterwards whether it
  landed inside it (a BEGIN without its END);
* ``DONE`` (mode ``hold``) after COUNT batches; the child then sleeps until it is killed.

Batch ``b`` consists of MUTATIONS mutations with rows ``m{i:03d}b{b:07d}``, each putting COLUMNS
columns ``f:q{j}`` with value ``expected_value(b, i, j)``, so the parent can check every
acknowledged batch completely and every mutation for all-or-nothing without being told what the
child wrote. The table is split by mutation index, so every batch spans all tablets and is
written as one log record per tablet: a kill can land between them, leaving some mutations of the
batch applied and others not. Timestamps are left to the server.

Modes: ``write`` (writes only; a small `tserver.memory.maps.max` set by the parent makes
background flushes frequent), ``flush`` (a flush after every batch), ``compact`` (a full
compaction every third batch, alternating with a row-range compaction), ``hold``.
Every loop is bounded by a batch count and by time, so a child the parent forgets still ends.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TABLE = "crash"
MUTATIONS = 12
COLUMNS = 4
#: Split points of the crash table: every batch spreads over all its tablets.
SPLITS = ("m003", "m006", "m009")
#: The metadata database to use (default: SQLite beside the data), so the parent can run the
#: crash tests on every metadata backend.
METADATA_URL_ENV = "LITHIFY_CRASH_METADATA_URL"
MAX_BATCHES = 20_000
MAX_SECONDS = 120.0


def row_of(batch: int, i: int) -> bytes:
    return f"m{i:03d}b{batch:07d}".encode()


def parse_row(row: bytes) -> tuple[int, int]:
    """(batch, mutation index) of a row written by this program; ValueError otherwise."""
    text = row.decode()
    if len(text) != 12 or text[0] != "m" or text[4] != "b":
        raise ValueError(f"not a crash-test row: {row!r}")
    return int(text[5:12]), int(text[1:4])


def expected_value(batch: int, i: int, j: int) -> bytes:
    """A value the parent can recompute; padded so that the in-memory map fills quickly."""
    return f"{batch}:{i}:{j}:".encode() + bytes([97 + (batch + i + j) % 26]) * 120


def make_batch(batch: int) -> list:
    from lithify import Mutation

    muts = []
    for i in range(MUTATIONS):
        m = Mutation(row_of(batch, i))
        for j in range(COLUMNS):
            m.put(b"f", f"q{j}".encode(), expected_value(batch, i, j))
        muts.append(m)
    return muts


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    import lithify

    store_dir, mode, seed = argv[1], argv[2], int(argv[3])
    start = int(argv[4]) if len(argv) > 4 else 0
    count = int(argv[5]) if len(argv) > 5 else MAX_BATCHES
    if mode not in ("write", "flush", "compact", "hold"):
        say(f"ERROR unknown mode {mode}")
        return 2
    rng = random.Random(seed)
    store = lithify.open(store_dir, metadata_url=os.environ.get(METADATA_URL_ENV) or None)
    say("READY")
    deadline = time.monotonic() + MAX_SECONDS
    for batch in range(start, start + min(count, MAX_BATCHES)):
        if time.monotonic() > deadline:
            break
        store.write(TABLE, make_batch(batch))
        say(f"ACK {batch}")
        if mode == "flush":
            say(f"BEGIN flush {batch}")
            store.flush(TABLE)
            say(f"END flush {batch}")
        elif mode == "compact" and batch % 3 == 2:
            say(f"BEGIN compact {batch}")
            if rng.random() < 0.5:
                store.compact(TABLE)
            else:
                # A row-range compaction: the tablets of some mutation indexes only.
                first = rng.randrange(MUTATIONS)
                store.compact(TABLE, row_of(0, first), row_of(batch, min(first + 4, MUTATIONS - 1)))
            say(f"END compact {batch}")
    if mode == "hold":
        say("DONE")
        # Wait to be killed (never closing the store, so the log is not synced on close).
        end = time.monotonic() + MAX_SECONDS
        while time.monotonic() < end:
            time.sleep(0.05)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
