"""Compaction benchmark: lithify's full compaction vs the I/O floor vs RocksDB.

Data set: `--files` sorted runs of `--entries` entries (fixed seed). Rows are random 64-bit
numbers as 16 hex digits, family `fam`, qualifiers q00..q09, empty visibility, 50 random value
bytes. In every run after the first, about 20% of the entries are newer versions of keys of
earlier runs and about 1% delete keys of earlier runs; timestamps grow run by run, so "newest
wins" in lithify and "latest write wins" in RocksDB mean the same thing.

Each engine runs in a child process (one per repeat) so that peak RSS is per engine:
* lithify: `run_compaction(propagate_deletes=False, versions=1)` of all runs into one file;
* floor: read every input and write as many entries as the compaction outputs, same format
  and codec, no merge (the same number of threads);
* RocksDB: the same entries as the same number of flushed L0 files (a put per entry, deletes as
  deletes, keys = escaped row/family/qualifier/visibility so key order matches lithify's), then
  `compact_range` with `max_subcompactions` = cores.

Usage: .venv/bin/python benchmarks/compaction.py [--files 10] [--entries 1000000]
           [--dir bench-data/compaction] [--json out.json] [--repeats 3] [--skip-rocksdb]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lithify.compaction.compactor_job import CompactionRequest, run_compaction  # noqa: E402
from lithify.data.key import ENTRY_SCHEMA  # noqa: E402
from lithify.data.ranges import FileRef, RowRange  # noqa: E402
from lithify.files.reader import SortedFileReader  # noqa: E402
from lithify.files.storage import Storage  # noqa: E402
from lithify.files.writer import (  # noqa: E402
    DEFAULT_COMPRESSION,
    SortedFileWriter,
    WriterOptions,
)

SEED = 20240611
VALUE_BYTES = 50
HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
CORES = os.cpu_count() or 1


# -- data set ------------------------------------------------------------------------------


def _binary_fixed(mat: np.ndarray) -> pa.Array:
    """A binary array from an (n, width) uint8 matrix, without a Python loop."""
    n, width = mat.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.BinaryArray.from_buffers(
        pa.binary(), n, [None, offsets.buffers()[1], pa.py_buffer(mat.tobytes())]
    )


def _hex_rows(rows: np.ndarray) -> pa.Array:
    be = rows.astype(">u8").view(np.uint8).reshape(-1, 8)
    mat = np.empty((len(rows), 16), dtype=np.uint8)
    mat[:, 0::2] = HEX[be >> 4]
    mat[:, 1::2] = HEX[be & 0x0F]
    return _binary_fixed(mat)


def _run_table(
    rows: np.ndarray, quals: np.ndarray, ts: int, deleted: np.ndarray, rng: np.random.Generator
) -> pa.Table:
    order = np.lexsort((quals, rows))
    rows, quals, deleted = rows[order], quals[order], deleted[order]
    n = len(rows)
    qmat = np.empty((n, 3), dtype=np.uint8)
    qmat[:, 0] = ord("q")
    qmat[:, 1] = ord("0") + quals // 10
    qmat[:, 2] = ord("0") + quals % 10
    values = np.frombuffer(rng.bytes(n * VALUE_BYTES), dtype=np.uint8).reshape(n, VALUE_BYTES)
    value = _binary_fixed(values)
    if deleted.any():
        lens = np.where(deleted, 0, VALUE_BYTES).astype(np.int32)
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lens, out=offsets[1:])
        kept = values[~deleted]
        value = pa.BinaryArray.from_buffers(
            pa.binary(), n, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(kept.tobytes())]
        )
    return pa.table(
        [
            _hex_rows(rows),
            pa.array(np.full(n, b"fam", dtype="S3"), pa.binary()),
            _binary_fixed(qmat),
            pa.array(np.full(n, b"", dtype="S1"), pa.binary()),
            pa.array(np.full(n, ts, dtype=np.int64)),
            pa.array(deleted),
            value,
        ],
        schema=ENTRY_SCHEMA,
    )


def generate(storage: Storage, files: int, entries: int, compression: str) -> list[FileRef]:
    """Write the runs (oldest first) and return FileRefs newest first."""
    rng = np.random.default_rng(SEED)
    pool_rows = np.empty(0, dtype=np.uint64)
    pool_quals = np.empty(0, dtype=np.uint8)
    refs = []
    t0 = time.monotonic()
    for r in range(files):
        if r == 0:
            n_old = n_del = 0
        else:
            n_old, n_del = int(entries * 0.20), int(entries * 0.01)
        n_new = entries - n_old - n_del
        new_rows = rng.integers(0, 2**64 - 1, n_new, dtype=np.uint64, endpoint=True)
        new_quals = rng.integers(0, 10, n_new, dtype=np.uint8)
        if n_old + n_del:
            pick = rng.choice(len(pool_rows), n_old + n_del, replace=False)
            rows = np.concatenate([new_rows, pool_rows[pick]])
            quals = np.concatenate([new_quals, pool_quals[pick]])
        else:
            rows, quals = new_rows, new_quals
        deleted = np.zeros(len(rows), dtype=bool)
        deleted[n_new + n_old :] = True
        table = _run_table(rows, quals, 1_000_000 * (r + 1), deleted, rng)
        path = f"runs/F{r:03d}.parquet"
        w = SortedFileWriter(storage, path, compression=compression)
        for b in table.to_batches(max_chunksize=65536):
            w.write(b)
        info = w.close()
        refs.append(FileRef(info.path, info.size, info.entries))
        pool_rows = np.concatenate([pool_rows, new_rows])
        pool_quals = np.concatenate([pool_quals, new_quals])
        el = time.monotonic() - t0
        print(
            f"\rgenerating runs: {r + 1}/{files} ({(r + 1) * entries:,} entries, {el:.0f} s)",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    return refs[::-1]


# -- key encoding and content hash ---------------------------------------------------------


def encode_column_key(row: bytes, fam: bytes, qual: bytes, vis: bytes) -> bytes:
    """Order-preserving key: fields with 0x00 escaped as 0x00 0xFF, each ended by 0x00 0x01."""
    return b"".join(f.replace(b"\x00", b"\x00\xff") + b"\x00\x01" for f in (row, fam, qual, vis))


class ContentHash:
    """sha256 over the surviving (row, family, qualifier, visibility, value) in order."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.count = 0

    def add(self, column_key: bytes, value: bytes) -> None:
        self.h.update(column_key)
        self.h.update(len(value).to_bytes(4, "little"))
        self.h.update(value)
        self.count += 1

    def add_batch(self, batch: pa.RecordBatch) -> None:
        cols = [batch.column(i).to_pylist() for i in (0, 1, 2, 3, 6)]
        for r, f, q, v, val in zip(*cols, strict=True):
            self.add(encode_column_key(r, f, q, v), val)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


# -- engines (children) --------------------------------------------------------------------


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def child_lithify(args: argparse.Namespace) -> dict:
    storage = Storage(args.dir)
    refs = [FileRef.from_json(d) for d in json.loads(Path(args.dir, "refs.json").read_text())]
    storage.delete("out/A.parquet_tmp_bench")
    req = CompactionRequest(
        inputs=refs,
        extent_range=RowRange(),
        output_path="out/A.parquet",
        tmp_id="bench",
        propagate_deletes=False,
        versions=1,
        compression=args.compression,
        subcompactions=args.threads,
    )
    t0, c0 = time.perf_counter(), _cpu()
    res = run_compaction(storage, req)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    out = {
        "wall_s": wall,
        "cpu_s": cpu,
        "entries_in": res.entries_read,
        "entries_out": res.entries_written,
        "bytes_out": res.bytes_written,
    }
    if args.hash:
        h = ContentHash()
        with SortedFileReader.open(storage, res.tmp_path) as r:
            for b in r.batches():
                h.add_batch(b)
        out["hash"] = h.hexdigest()
    return out


def child_floor(args: argparse.Namespace) -> dict:
    """Read every input, write `--floor-out` entries in the same format: no merge."""
    storage = Storage(args.dir)
    refs = [FileRef.from_json(d) for d in json.loads(Path(args.dir, "refs.json").read_text())]
    threads = max(1, min(args.threads, len(refs)))
    quota = [
        args.floor_out // threads + (1 if k < args.floor_out % threads else 0)
        for k in range(threads)
    ]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            sink = storage.open_output(f"floor/part{k}.parquet")
            pw = WriterOptions(args.compression).parquet_writer(sink)
            left = quota[k]
            for ref in refs[k::threads]:
                with SortedFileReader.open(storage, ref.path) as r:
                    for b in r.batches():
                        if left > 0:
                            part = b if b.num_rows <= left else b.slice(0, left)
                            pw.write_table(pa.Table.from_batches([part]))
                            left -= part.num_rows
            pw.close()
            sink.close()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t0, c0 = time.perf_counter(), _cpu()
    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    if errors:
        raise errors[0]
    for k in range(threads):
        storage.delete(f"floor/part{k}.parquet")
    return {"wall_s": wall, "cpu_s": cpu}


def _rocks_options(args: argparse.Namespace, threads: int):  # type: ignore[no-untyped-def]
    import rocksdict as rd

    opts = rd.Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_disable_auto_compactions(True)
    opts.set_write_buffer_size(1 << 30)
    opts.set_max_write_buffer_number(4)
    opts.set_level_zero_slowdown_writes_trigger(1 << 20)
    opts.set_level_zero_stop_writes_trigger(1 << 20)
    opts.set_level_zero_file_num_compaction_trigger(1 << 20)
    opts.set_max_subcompactions(threads)
    opts.set_max_background_jobs(max(2, threads))
    opts.increase_parallelism(threads)
    codec = {
        "zstd": rd.DBCompressionType.zstd(),
        "snappy": rd.DBCompressionType.snappy(),
        "lz4": rd.DBCompressionType.lz4(),
        "none": rd.DBCompressionType.none(),
    }[args.compression]
    opts.set_compression_type(codec)
    opts.set_bottommost_compression_type(codec)
    return opts


def rocks_load(args: argparse.Namespace, dbdir: str) -> None:
    """Put every run's entries (oldest run first) and flush once per run: one L0 file each."""
    import rocksdict as rd

    storage = Storage(args.dir)
    refs = [FileRef.from_json(d) for d in json.loads(Path(args.dir, "refs.json").read_text())]
    db = rd.Rdict(dbdir, _rocks_options(args, args.threads))
    wo = rd.WriteOptions()
    wo.disable_wal = True
    t0 = time.monotonic()
    for i, ref in enumerate(refs[::-1]):
        with SortedFileReader.open(storage, ref.path) as r:
            for b in r.batches():
                wb = rd.WriteBatch(raw_mode=True)
                cols = [b.column(c).to_pylist() for c in (0, 1, 2, 3, 5, 6)]
                for row, fam, qual, vis, dele, val in zip(*cols, strict=True):
                    k = encode_column_key(row, fam, qual, vis)
                    if dele:
                        wb.delete(k)
                    else:
                        wb.put(k, val)
                db.write(wb, wo)
        db.flush(True)
        el = time.monotonic() - t0
        print(
            f"\rloading RocksDB: {i + 1}/{len(refs)} runs ({el:.0f} s)",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    files = db.live_files()
    db.close()
    if len(files) != len(refs):
        raise RuntimeError(f"RocksDB holds {len(files)} files, expected {len(refs)}")


def child_rocksdb(args: argparse.Namespace) -> dict:
    import rocksdict as rd

    db = rd.Rdict(args.rocks_db, _rocks_options(args, args.threads))
    n_before = len(db.live_files())
    co = rd.CompactOptions()
    co.set_bottommost_level_compaction(rd.BottommostLevelCompaction.force())
    t0, c0 = time.perf_counter(), _cpu()
    db.compact_range(None, None, co)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    out = {
        "wall_s": wall,
        "cpu_s": cpu,
        "files_before": n_before,
        "files_after": len(db.live_files()),
    }
    if args.hash:
        h = ContentHash()
        for k, v in db.items():
            h.add(k, v)
        out["hash"] = h.hexdigest()
        out["entries_out"] = h.count
    db.close()
    return out


def _peak_rss_mb() -> float:
    """This process's peak RSS. Not ru_maxrss: on Linux a child's ru_maxrss starts from its
    parent's RSS at fork time, which would charge the driver's memory to every engine."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(args: argparse.Namespace) -> None:
    fn = {"lithify": child_lithify, "floor": child_floor, "rocksdb": child_rocksdb}[args.child]
    out = fn(args)
    out["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(out))


def run_child(engine: str, args: argparse.Namespace, *extra: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        engine,
        "--dir",
        args.dir,
        "--compression",
        args.compression,
        "--threads",
        str(args.threads),
        *extra,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"{engine} child failed:\n{p.stderr[-4000:]}")
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[7:])


# -- driver --------------------------------------------------------------------------------


def _cpu_pressure() -> tuple[float, int] | None:
    """(time, total stalled microseconds) from Linux PSI, to report how busy the machine was."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None
    return time.monotonic(), int(line.rsplit("total=", 1)[1])


def _pressure_pct(a: tuple[float, int] | None, b: tuple[float, int] | None) -> float | None:
    """Share of the time some runnable task waited for a CPU (other users' load included)."""
    if a is None or b is None or b[0] <= a[0]:
        return None
    return round(100 * (b[1] - a[1]) / 1e6 / (b[0] - a[0]), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--entries", type=int, default=1_000_000, help="entries per run")
    ap.add_argument("--dir", default="bench-data/compaction")
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-rocksdb", action="store_true")
    ap.add_argument("--compression", default=DEFAULT_COMPRESSION)
    ap.add_argument("--threads", type=int, default=CORES, help="compaction threads (all engines)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--hash", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--floor-out", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rocks-db", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return

    args.dir = os.path.abspath(args.dir)
    shutil.rmtree(args.dir, ignore_errors=True)
    storage = Storage(args.dir)
    refs = generate(storage, args.files, args.entries, args.compression)
    Path(args.dir, "refs.json").write_text(json.dumps([r.to_json() for r in refs]))
    entries_in = sum(r.entries for r in refs)

    # Engines alternate within each repeat so that a noisy machine affects them alike.
    template = os.path.join(args.dir, "rocks-template")
    if not args.skip_rocksdb:
        rocks_load(args, template)
    lith: list[dict] = []
    floor: list[dict] = []
    rocks: list[dict] = []
    pressure0 = _cpu_pressure()
    for i in range(args.repeats):
        last = i == args.repeats - 1
        lith.append(run_child("lithify", args, *(["--hash"] if last else [])))
        storage.delete("out/A.parquet_tmp_bench")
        floor.append(run_child("floor", args, "--floor-out", str(lith[-1]["entries_out"])))
        line = (
            f"repeat {i + 1}: lithify {lith[-1]['wall_s']:.2f} s, floor {floor[-1]['wall_s']:.2f} s"
        )
        if not args.skip_rocksdb:
            db = os.path.join(args.dir, "rocks-run")
            shutil.rmtree(db, ignore_errors=True)
            shutil.copytree(template, db)
            rocks.append(
                run_child("rocksdb", args, "--rocks-db", db, *(["--hash"] if last else []))
            )
            shutil.rmtree(db, ignore_errors=True)
            line += f", rocksdb {rocks[-1]['wall_s']:.2f} s"
        print(line, file=sys.stderr)
    pressure1 = _cpu_pressure()
    entries_out = lith[-1]["entries_out"]

    def med(rs: list[dict], k: str) -> float:
        return statistics.median(r[k] for r in rs)

    res: dict = {
        "files": args.files,
        "entries_per_file": args.entries,
        "threads": args.threads,
        "compression": args.compression,
        "repeats": args.repeats,
        "entries_in": entries_in,
        "entries_out": entries_out,
        "input_mb": sum(r.size for r in refs) / 2**20,
        "output_mb": lith[-1]["bytes_out"] / 2**20,
        "lithify_wall_s": med(lith, "wall_s"),
        "lithify_cpu_s": med(lith, "cpu_s"),
        "lithify_peak_rss_mb": max(r["peak_rss_mb"] for r in lith),
        "floor_wall_s": med(floor, "wall_s"),
        "floor_cpu_s": med(floor, "cpu_s"),
        "floor_peak_rss_mb": max(r["peak_rss_mb"] for r in floor),
        "lithify_hash": lith[-1]["hash"],
        "lithify_wall_runs": [r["wall_s"] for r in lith],
        "cpu_pressure_some_pct": _pressure_pct(pressure0, pressure1),
    }
    rows = [
        ("lithify", res["lithify_wall_s"], res["lithify_cpu_s"], res["lithify_peak_rss_mb"]),
        ("floor", res["floor_wall_s"], res["floor_cpu_s"], res["floor_peak_rss_mb"]),
    ]
    if rocks:
        res |= {
            "rocksdb_wall_s": med(rocks, "wall_s"),
            "rocksdb_cpu_s": med(rocks, "cpu_s"),
            "rocksdb_peak_rss_mb": max(r["peak_rss_mb"] for r in rocks),
            "rocksdb_entries_out": rocks[-1]["entries_out"],
            "rocksdb_hash": rocks[-1]["hash"],
        }
        res["outputs_agree"] = (
            res["rocksdb_hash"] == res["lithify_hash"] and res["rocksdb_entries_out"] == entries_out
        )
        res["wall_vs_rocksdb"] = res["lithify_wall_s"] / res["rocksdb_wall_s"]
        res["cpu_vs_rocksdb"] = res["lithify_cpu_s"] / res["rocksdb_cpu_s"]
        rows.append(
            ("rocksdb", res["rocksdb_wall_s"], res["rocksdb_cpu_s"], res["rocksdb_peak_rss_mb"])
        )
    else:
        res["outputs_agree"] = None
    res["wall_vs_floor"] = res["lithify_wall_s"] / res["floor_wall_s"]

    print(
        f"\n{args.files} runs x {args.entries:,} entries = {entries_in:,} in, {entries_out:,} out; "
        f"{args.threads} threads, codec {args.compression}, median of {args.repeats}"
    )
    print(f"{'engine':<10}{'wall s':>10}{'CPU s':>10}{'peak RSS MB':>14}")
    for name, w, c, m in rows:
        print(f"{name:<10}{w:>10.2f}{c:>10.2f}{m:>14.0f}")
    print(f"lithify / floor wall: {res['wall_vs_floor']:.2f}")
    print(f"CPU pressure during the runs (PSI some): {res['cpu_pressure_some_pct']}%")
    if rocks:
        print(
            f"lithify / RocksDB wall: {res['wall_vs_rocksdb']:.2f}, "
            f"CPU: {res['cpu_vs_rocksdb']:.2f}"
        )
        print(f"outputs agree (count and sha256): {res['outputs_agree']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
