"""Write-ahead log throughput: appends of entry batches per durability mode.

Each append is one batch of `--entries` entries (ENTRY_SCHEMA, 16-byte rows, 50-byte values),
the shape of a client's flushed batch. Reports entries/s and MB/s of log written per mode.
`--threads N` appends from N threads to show group commit (writes and fsyncs per append).
`--rocksdb` also times RocksDB WriteBatch writes with its WAL on (sync off for none/flush, on for
sync) over the same entries, the baseline the ingest path has to beat.

    .venv/bin/python benchmarks/wal.py [--batches 100] [--entries 10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lithify.data.key import ENTRY_SCHEMA  # noqa: E402
from lithify.tablet.wal import WriteAheadLog  # noqa: E402

MODES = ("none", "flush", "sync")


def make_batch(rng: np.random.Generator, n: int, ts: int) -> pa.Table:
    """`n` entries with random 16-hex-digit rows and random 50-byte values."""
    rows = np.char.encode(np.char.mod("%016x", rng.integers(0, 2**63, n)))
    fam = np.char.encode(np.char.mod("%04x", rng.integers(0, 2**16, n)))
    qual = np.char.encode(np.char.mod("%04x", rng.integers(0, 2**16, n)))
    values = rng.integers(0, 256, (n, 50), dtype=np.uint8)
    return pa.table(
        {
            "row": pa.array(rows.tolist(), pa.binary()),
            "family": pa.array(fam.tolist(), pa.binary()),
            "qualifier": pa.array(qual.tolist(), pa.binary()),
            "visibility": pa.array([b""] * n, pa.binary()),
            "timestamp": pa.array(np.full(n, ts, np.int64)),
            "deleted": pa.array(np.zeros(n, bool)),
            "value": pa.array([v.tobytes() for v in values], pa.binary()),
        },
        schema=ENTRY_SCHEMA,
    )


def bench_wal(
    directory: Path, mode: str, batches: list[pa.Table], count: int, threads: int
) -> dict:
    path = directory / f"{mode}-{threads}.wal"
    wal = WriteAheadLog.create(path, 1, mode)
    per_thread = count // threads

    def work(offset: int) -> None:
        for i in range(per_thread):
            wal.append("1;~", batches[(offset + i) % len(batches)])

    start = time.perf_counter()
    if threads == 1:
        work(0)
    else:
        pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    wal.flush()  # `none` may still hold its last records in the buffer
    elapsed = time.perf_counter() - start
    appends = per_thread * threads
    entries = appends * batches[0].num_rows
    result = {
        "mode": mode,
        "threads": threads,
        "appends": appends,
        "entries": entries,
        "seconds": round(elapsed, 4),
        "entries_per_s": round(entries / elapsed),
        "mb_per_s": round(wal.size_bytes / elapsed / 1e6, 1),
        "log_bytes": wal.size_bytes,
        "writes": wal.write_count,
        "syncs": wal.sync_count,
    }
    wal.close()
    path.unlink()
    return result


def bench_rocksdb(directory: Path, mode: str, batches: list[pa.Table], count: int) -> dict:
    """RocksDB with its WAL on: one WriteBatch per client batch, key = row/family/qualifier."""
    from rocksdict import Options, Rdict, WriteBatch, WriteOptions

    keyed = []
    for b in batches:
        d = b.to_pydict()
        cols = (d["row"], d["family"], d["qualifier"], d["value"])
        keyed.append([(r + b"\0" + f + b"\0" + q, v) for r, f, q, v in zip(*cols, strict=True)])
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    db_path = directory / f"rocks-{mode}"
    db = Rdict(str(db_path), opts)
    wopts = WriteOptions()
    wopts.sync = mode == "sync"
    start = time.perf_counter()
    for i in range(count):
        wb = WriteBatch(raw_mode=True)
        for k, v in keyed[i % len(keyed)]:
            wb.put(k, v)
        db.write(wb, wopts)
    elapsed = time.perf_counter() - start
    db.close()
    shutil.rmtree(db_path, ignore_errors=True)
    entries = count * batches[0].num_rows
    return {
        "mode": f"rocksdb-{mode}",
        "threads": 1,
        "appends": count,
        "entries": entries,
        "seconds": round(elapsed, 4),
        "entries_per_s": round(entries / elapsed),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=100, help="appends per mode")
    ap.add_argument("--entries", type=int, default=10_000, help="entries per append")
    ap.add_argument("--threads", type=int, default=1, help="appending threads")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    ap.add_argument("--dir", default=None, help="directory for the logs (default: a temp dir)")
    ap.add_argument("--rocksdb", action="store_true", help="also time RocksDB WriteBatch writes")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    rng = np.random.default_rng(42)
    batches = [make_batch(rng, args.entries, 1_700_000_000_000 + i) for i in range(8)]
    directory = Path(tempfile.mkdtemp(prefix="lithify-wal-bench-", dir=args.dir))
    results = []
    try:
        for mode in args.modes.split(","):
            # Untimed: warms the allocator and the page cache for this mode.
            bench_wal(directory, mode, batches, min(args.batches, 20), args.threads)
            results.append(bench_wal(directory, mode, batches, args.batches, args.threads))
            if args.rocksdb:
                results.append(bench_rocksdb(directory, mode, batches, args.batches))
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "wal",
                    "entries_per_append": args.entries,
                    "value_bytes": 50,
                    "cpus": os.cpu_count(),
                    "results": results,
                }
            )
        )
        return
    print(f"{args.batches} appends of {args.entries} entries, {args.threads} thread(s)")
    for r in results:
        extra = (
            f"  {r['mb_per_s']:8.1f} MB/s  writes {r['writes']}  syncs {r['syncs']}"
            if "mb_per_s" in r
            else ""
        )
        print(f"  {r['mode']:14s} {r['entries_per_s']:>12,d} entries/s{extra}")


if __name__ == "__main__":
    main()
