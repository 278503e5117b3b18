"""Ingest benchmark: lithify's public batch write API against RocksDB WriteBatch writes.

Data set: the compaction benchmark's (benchmarks/compaction.py `generate`, same seed): `--files`
sorted runs of `--entries` entries, 16-hex-digit rows, family `fam`, qualifiers q00..q09, 50-byte
values, about 20% newer versions of earlier keys and 1% deletes in every run after the first,
explicit timestamps. The runs are generated once (untimed) and held in memory, oldest run first.

* lithify: `lithify.open(dir)`, one table with `table.durability=flush`, then
  `store.write(table, arrow_batch)` for consecutive slices of `--batch` entries; background
  flushes and compactions run as they would in service.
* RocksDB (rocksdict, default options, WAL on, `sync=False`: the same guarantee as `flush`, the
  write survives the death of the process): one `WriteBatch` per slice of the same entries, a put
  per entry and a delete per delete, keys = the escaped row/family/qualifier/visibility of the
  compaction benchmark. The Python lists of keys and values are built before the clock starts,
  as the Arrow tables are for lithify.

Each engine runs in a child process of its own that loads the runs (untimed) and writes them
into an empty directory: a process holding the other engine's 20 million Python key and value
objects made every garbage collection pass, and so lithify's background flushes, 2-3x slower.
The timed part is the loop of writes (entries/s = entries / that time); the time including a
final flush of the memory buffers to files is reported too. With `--repeats N` each engine runs N
times (alternating) and the median is reported.

    .venv/bin/python benchmarks/ingest.py [--files 10] [--entries 1000000] [--batch 100000]
        [--dir DIR] [--json out.json] [--repeats 1] [--profile out.prof]

`--profile` writes a cProfile of the lithify write loop (main thread only: background flushes
and compactions run in other threads) from an extra lithify run after the timed repeats: the
profiler slows the loop down, so a profiled run is never one of the runs the medians use.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compaction import generate  # noqa: E402  (the compaction benchmark's data set)

import lithify  # noqa: E402
from lithify.files.reader import SortedFileReader  # noqa: E402
from lithify.files.storage import Storage  # noqa: E402

TABLE = "ingest"


def write_runs(directory: Path, files: int, entries: int) -> list[str]:
    """Write the compaction benchmark's runs (uncompressed); their paths, oldest first."""
    storage = Storage(str(directory / "runs"))
    refs = generate(storage, files, entries, "none")
    return [ref.path for ref in refs[::-1]]


def load_runs(directory: Path, paths: list[str]) -> list[pa.Table]:
    """The runs as in-memory tables, in the order given (untimed)."""
    storage = Storage(str(directory / "runs"))
    tables = []
    for path in paths:
        with SortedFileReader.open(storage, path) as r:
            tables.append(pa.Table.from_batches(list(r.batches())).combine_chunks())
    return tables


def slices(runs: list[pa.Table], batch: int) -> list[pa.Table]:
    return [run.slice(i, batch) for run in runs for i in range(0, run.num_rows, batch)]


def _escape(col: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.replace_substring(col, b"\x00", b"\x00\xff")


def rocks_batches(batches: list[pa.Table]) -> list[tuple[list[bytes], list[bytes], list[bool]]]:
    """Keys, values and delete flags per batch, built with Arrow kernels (untimed).

    Keys are compaction.py's `encode_column_key`: every field with 0x00 escaped as 0x00 0xFF
    and ended by 0x00 0x01.
    """
    out = []
    for b in batches:
        end = pa.scalar(b"\x00\x01", pa.binary())
        parts = []
        for name in ("row", "family", "qualifier", "visibility"):
            parts += [_escape(b.column(name)), end]
        keys = pc.binary_join_element_wise(*parts, pa.scalar(b"", pa.binary()))
        out.append(
            (keys.to_pylist(), b.column("value").to_pylist(), b.column("deleted").to_pylist())
        )
    return out


def bench_lithify(
    directory: Path, batches: list[pa.Table], profile: str | None = None
) -> dict[str, float]:
    path = directory / "lithify"
    shutil.rmtree(path, ignore_errors=True)
    store = lithify.open(path)
    try:
        store.create_table(TABLE, properties={"table.durability": "flush"})
        entries = sum(b.num_rows for b in batches)
        prof = cProfile.Profile() if profile else None
        start = time.perf_counter()
        if prof:
            prof.enable()
        for b in batches:
            store.write(TABLE, b)
        writes_s = time.perf_counter() - start
        if prof:
            prof.disable()
            prof.dump_stats(profile)
        store.flush(TABLE)
        flushed_s = time.perf_counter() - start
        files = sum(len(t.files) for t in store.tablets(TABLE))
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)
    return {
        "seconds": writes_s,
        "entries_per_s": entries / writes_s,
        "with_flush_s": flushed_s,
        "with_flush_entries_per_s": entries / flushed_s,
        "files": files,
    }


def bench_rocksdb(
    directory: Path, prepared: list[tuple[list[bytes], list[bytes], list[bool]]]
) -> dict[str, float]:
    from rocksdict import Options, Rdict, WriteBatch, WriteOptions

    path = directory / "rocksdb"
    shutil.rmtree(path, ignore_errors=True)
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    db = Rdict(str(path), opts)
    try:
        wopts = WriteOptions()
        wopts.sync = False
        wopts.disable_wal = False
        entries = sum(len(k) for k, _, _ in prepared)
        start = time.perf_counter()
        for keys, values, deleted in prepared:
            wb = WriteBatch(raw_mode=True)
            put, delete = wb.put, wb.delete
            for k, v, d in zip(keys, values, deleted, strict=True):
                if d:
                    delete(k)
                else:
                    put(k, v)
            db.write(wb, wopts)
        writes_s = time.perf_counter() - start
        db.flush(True)
        flushed_s = time.perf_counter() - start
    finally:
        db.close()
        shutil.rmtree(path, ignore_errors=True)
    return {
        "seconds": writes_s,
        "entries_per_s": entries / writes_s,
        "with_flush_s": flushed_s,
        "with_flush_entries_per_s": entries / flushed_s,
    }


def child(args: argparse.Namespace) -> None:
    """Run one engine once over the runs named in `--runs`; print its result as JSON."""
    base = Path(args.dir)
    batches = slices(load_runs(base, json.loads(args.runs)), args.batch)
    work = Path(tempfile.mkdtemp(prefix=f"{args.child}-", dir=base))
    try:
        if args.child == "lithify":
            result = bench_lithify(work, batches, args.profile)
        else:
            prepared = rocks_batches(batches)
            del batches
            result = bench_rocksdb(work, prepared)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


def run_child(engine: str, args: argparse.Namespace, base: Path, runs: list[str], profile: bool):
    cmd = [
        sys.executable,
        __file__,
        "--child",
        engine,
        "--dir",
        str(base),
        "--runs",
        json.dumps(runs),
        "--batch",
        str(args.batch),
    ]
    if profile and args.profile:
        cmd += ["--profile", args.profile]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{engine} child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=10, help="sorted runs")
    ap.add_argument("--entries", type=int, default=1_000_000, help="entries per run")
    ap.add_argument("--batch", type=int, default=100_000, help="entries per write")
    ap.add_argument("--dir", default=None, help="working directory (default: a temp dir)")
    ap.add_argument("--json", dest="json_path", help="write the results as JSON here")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--profile", help="cProfile an extra lithify run's write loop to here")
    ap.add_argument("--child", choices=["lithify", "rocksdb"], help=argparse.SUPPRESS)
    ap.add_argument("--runs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    base = Path(tempfile.mkdtemp(prefix="lithify-ingest-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        runs = write_runs(base, args.files, args.entries)
        entries = args.files * args.entries
        print(
            f"{entries:,} entries in {len(runs)} runs ({time.perf_counter() - t0:.1f} s)",
            file=sys.stderr,
        )
        lith: list[dict[str, float]] = []
        rocks: list[dict[str, float]] = []
        for i in range(args.repeats):
            lith.append(run_child("lithify", args, base, runs, profile=False))
            rocks.append(run_child("rocksdb", args, base, runs, profile=False))
            print(
                f"repeat {i + 1}: lithify {lith[-1]['entries_per_s']:,.0f}/s, "
                f"rocksdb {rocks[-1]['entries_per_s']:,.0f}/s",
                file=sys.stderr,
            )
        if args.profile:
            profiled = run_child("lithify", args, base, runs, profile=True)
            print(
                f"profiled run (not in the medians): lithify {profiled['entries_per_s']:,.0f}/s, "
                f"profile in {args.profile}",
                file=sys.stderr,
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def med(rs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rs)

    result = {
        "benchmark": "ingest",
        "entries": entries,
        "batch": args.batch,
        "files": args.files,
        "entries_per_run": args.entries,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "lithify_entries_per_s": round(med(lith, "entries_per_s")),
        "rocksdb_entries_per_s": round(med(rocks, "entries_per_s")),
        "lithify_seconds": round(med(lith, "seconds"), 3),
        "rocksdb_seconds": round(med(rocks, "seconds"), 3),
        "lithify_with_flush_entries_per_s": round(med(lith, "with_flush_entries_per_s")),
        "rocksdb_with_flush_entries_per_s": round(med(rocks, "with_flush_entries_per_s")),
        "lithify_runs": lith,
        "rocksdb_runs": rocks,
    }
    result["ratio"] = round(result["lithify_entries_per_s"] / result["rocksdb_entries_per_s"], 3)
    result["ratio_with_flush"] = round(
        result["lithify_with_flush_entries_per_s"] / result["rocksdb_with_flush_entries_per_s"], 3
    )
    print(f"{'engine':10s} {'entries/s':>14s} {'seconds':>9s} {'with flush/s':>14s}")
    for name in ("lithify", "rocksdb"):
        print(
            f"{name:10s} {result[f'{name}_entries_per_s']:>14,d} "
            f"{result[f'{name}_seconds']:>9.2f} {result[f'{name}_with_flush_entries_per_s']:>14,d}"
        )
    print(f"{'ratio':10s} {result['ratio']:>14.2f} {'':>9s} {result['ratio_with_flush']:>14.2f}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
