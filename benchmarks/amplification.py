"""Write amplification and files per tablet under continuous ingest, per compaction ratio.

For each ratio in `--ratios`, a fresh store gets `--entries` continuous-ingest entries (the
linked lists of SYSTEM.md 7) into `--tablets` tablets, with `tserver.memory.maps.max` =
`--memory`, so flushes and system compactions run all through the ingest. A background thread
samples the files of every tablet about every `--sample` seconds. After the ingest the store
flushes and waits for compactions to settle (sampling goes on).

Reported per ratio:
* write amplification = (bytes written by flushes + bytes written by compactions) / bytes
  flushed (`Store.flush_totals()` and `store.compactions.totals`);
* files per tablet over time: time-weighted mean, the largest mean and max of any sample, and the
  longest time any tablet stayed above `table.file.max`;
* the theoretical bound for the ratio: about ratio x log_ratio(data per tablet / flush size)
  files per tablet (each "level" of similar-size files holds fewer than about `ratio` files
  before they qualify to be merged), and the matching write amplification, about
  1 + log_ratio(data per tablet / flush size) (each entry is rewritten once per level);
* whether the targets hold: time-weighted mean files per tablet at or under the bound, and no
  tablet above `table.file.max` for more than `--above-limit` seconds.

Usage: .venv/bin/python benchmarks/amplification.py [--entries 5000000] [--tablets 8]
           [--ratios 2,3] [--memory 16M] [--json out.json] [--dir bench-data/amplification]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lithify  # noqa: E402
from lithify.cli.ci import split_points  # noqa: E402
from lithify.continuous.ingest import ContinuousIngest  # noqa: E402
from lithify.continuous.verify import verify_batches  # noqa: E402

TABLE = "ci"
MiB = 1 << 20


@dataclass
class Sample:
    t: float
    mean: float
    max: int


class FileSampler:
    """Samples files per tablet every `interval` seconds in a thread until stopped.

    Besides the samples it tracks, per tablet, how long the tablet has been above `file_max`
    without a break, and keeps the longest such stretch: a tablet that stays above the limit is
    what the over-`table.file.max` priority band of the planner is meant to prevent.
    """

    def __init__(self, store: lithify.Store, interval: float, file_max: int) -> None:
        self._store = store
        self._interval = interval
        self._file_max = file_max
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self.samples: list[Sample] = []
        self._above_since: dict[int, float] = {}
        self.longest_above = 0.0
        self._thread = threading.Thread(target=self._run, name="file-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _take(self) -> None:
        now = time.monotonic()
        counts = self._store.files_per_tablet()
        if not counts:
            return
        self.samples.append(Sample(now - self._t0, sum(counts) / len(counts), max(counts)))
        for i, n in enumerate(counts):
            if n > self._file_max:
                self._above_since.setdefault(i, now)
            elif i in self._above_since:
                self.longest_above = max(self.longest_above, now - self._above_since.pop(i))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._take()
            except Exception as e:  # noqa: BLE001 - a sampling hiccup must not end the run
                print(f"sampler: {e!r}", file=sys.stderr)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._take()
        now = time.monotonic()
        for since in self._above_since.values():
            self.longest_above = max(self.longest_above, now - since)
        self._above_since.clear()

    def time_weighted_mean(self) -> float:
        """Mean files per tablet weighted by how long each sample's value held."""
        s = self.samples
        if len(s) < 2:
            return s[0].mean if s else 0.0
        total = sum((b.t - a.t) * a.mean for a, b in zip(s, s[1:], strict=False))
        return total / (s[-1].t - s[0].t)


@dataclass
class RatioResult:
    ratio: float
    entries: int
    tablets: int
    memory: str
    file_max: int
    ingest_s: float
    settle_s: float
    settled: bool
    flush_files: int
    flush_bytes: int
    compactions: int
    compaction_bytes_read: int
    compaction_bytes_written: int
    write_amplification: float
    data_bytes_per_tablet: float
    flush_bytes_avg: float
    levels: float
    bound_files_per_tablet: float
    bound_write_amplification: float
    files_mean_time_weighted: float
    files_mean_max_sample: float
    files_max: int
    files_final: list[int]
    longest_above_file_max_s: float
    meets_files_bound: bool
    meets_file_max: bool
    verify: dict | None = None
    samples: list[dict] = field(default_factory=list)


def run_ratio(args: argparse.Namespace, ratio: float) -> RatioResult:
    where = Path(args.dir) / f"ratio-{ratio:g}"
    if where.exists():
        shutil.rmtree(where)
    store = lithify.open(where)
    try:
        store.set_system_property("tserver.memory.maps.max", args.memory)
        store.create_table(
            TABLE,
            splits=split_points(args.tablets),
            properties={"table.compaction.major.ratio": str(ratio)},
        )
        file_max = int(store.get_properties(TABLE)["table.file.max"])
        sampler = FileSampler(store, args.sample, file_max)
        ingest = ContinuousIngest(
            lambda t: store.write(TABLE, t),
            batch_size=args.batch_size,
            value_bytes=args.value_bytes,
            seed=args.seed,
        )
        done = [0]
        next_report = [time.monotonic() + 10]

        def progress(n: int) -> None:
            done[0] += n
            if time.monotonic() >= next_report[0]:
                next_report[0] += 10
                counts = store.files_per_tablet()
                print(
                    f"  ratio {ratio:g}: {done[0]:,} entries, files/tablet "
                    f"mean {sum(counts) / len(counts):.1f} max {max(counts)}",
                    flush=True,
                )

        sampler.start()
        t0 = time.monotonic()
        ingest.run(args.entries, progress)
        ingest_s = time.monotonic() - t0
        store.flush(TABLE)
        t1 = time.monotonic()
        settled = store.wait_for_compactions(args.settle_timeout)
        settle_s = time.monotonic() - t1
        sampler.stop()

        flushes = store.flush_totals()
        totals = store.compactions.totals.snapshot()
        comp_written = sum(v["bytes_written"] for v in totals.values())
        comp_read = sum(v["bytes_read"] for v in totals.values())
        n_comp = sum(v["completed"] for v in totals.values())
        flush_bytes = max(1, flushes["bytes"])
        wa = (flushes["bytes"] + comp_written) / flush_bytes
        data_per_tablet = flushes["bytes"] / args.tablets
        flush_avg = flushes["bytes"] / max(1, flushes["files"])
        levels = max(1.0, math.log(max(ratio, data_per_tablet / max(1.0, flush_avg)), ratio))
        bound_files = ratio * levels
        verify = None
        if args.verify:
            r = verify_batches(store.scan(TABLE))
            verify = {
                "referenced": r.referenced,
                "unreferenced": r.unreferenced,
                "undefined": r.undefined,
                "corrupt": r.corrupt,
                "entries": r.entries,
            }
        tw_mean = sampler.time_weighted_mean()
        return RatioResult(
            ratio=ratio,
            entries=ingest.stats.written,
            tablets=args.tablets,
            memory=args.memory,
            file_max=file_max,
            ingest_s=round(ingest_s, 2),
            settle_s=round(settle_s, 2),
            settled=settled,
            flush_files=flushes["files"],
            flush_bytes=flushes["bytes"],
            compactions=n_comp,
            compaction_bytes_read=comp_read,
            compaction_bytes_written=comp_written,
            write_amplification=round(wa, 3),
            data_bytes_per_tablet=round(data_per_tablet),
            flush_bytes_avg=round(flush_avg),
            levels=round(levels, 2),
            bound_files_per_tablet=round(bound_files, 2),
            bound_write_amplification=round(1 + levels, 2),
            files_mean_time_weighted=round(tw_mean, 2),
            files_mean_max_sample=round(max((s.mean for s in sampler.samples), default=0.0), 2),
            files_max=max((s.max for s in sampler.samples), default=0),
            files_final=store.files_per_tablet(),
            longest_above_file_max_s=round(sampler.longest_above, 2),
            meets_files_bound=tw_mean <= bound_files,
            meets_file_max=sampler.longest_above <= args.above_limit,
            verify=verify,
            samples=[asdict(s) for s in sampler.samples],
        )
    finally:
        store.close()
        if not args.keep:
            shutil.rmtree(where, ignore_errors=True)


def print_table(results: list[RatioResult]) -> None:
    rows = [
        ("entries", lambda r: f"{r.entries:,}"),
        ("ingest s (entries/s)", lambda r: f"{r.ingest_s} ({r.entries / r.ingest_s:,.0f})"),
        ("settle s", lambda r: f"{r.settle_s}{'' if r.settled else ' (not settled)'}"),
        ("flushes: files / MiB", lambda r: f"{r.flush_files} / {r.flush_bytes / MiB:,.1f}"),
        ("flush file avg MiB", lambda r: f"{r.flush_bytes_avg / MiB:.2f}"),
        ("compactions", lambda r: f"{r.compactions}"),
        ("compaction MiB written", lambda r: f"{r.compaction_bytes_written / MiB:,.1f}"),
        ("write amplification", lambda r: f"{r.write_amplification:.2f}"),
        ("  reference 1+levels", lambda r: f"{r.bound_write_amplification:.2f}"),
        ("data per tablet MiB", lambda r: f"{r.data_bytes_per_tablet / MiB:,.1f}"),
        ("levels log_r(data/flush)", lambda r: f"{r.levels:.2f}"),
        ("bound files/tablet r*lv", lambda r: f"{r.bound_files_per_tablet:.1f}"),
        ("files/tablet mean (time)", lambda r: f"{r.files_mean_time_weighted:.2f}"),
        ("files/tablet mean (peak)", lambda r: f"{r.files_mean_max_sample:.2f}"),
        ("files/tablet max", lambda r: f"{r.files_max} (table.file.max {r.file_max})"),
        ("final files/tablet", lambda r: ",".join(map(str, r.files_final))),
        ("longest above file.max s", lambda r: f"{r.longest_above_file_max_s}"),
        ("mean <= bound", lambda r: "yes" if r.meets_files_bound else "NO"),
        ("above file.max briefly", lambda r: "yes" if r.meets_file_max else "NO"),
    ]
    if any(r.verify for r in results):
        rows.append(
            (
                "verify UNDEF/CORRUPT",
                lambda r: f"{r.verify['undefined']}/{r.verify['corrupt']}" if r.verify else "-",
            )
        )
    width = max(len(name) for name, _ in rows)
    print(f"\n{'ratio':<{width}}  " + "  ".join(f"{r.ratio:>18g}" for r in results))
    for name, fmt in rows:
        print(f"{name:<{width}}  " + "  ".join(f"{fmt(r):>18}" for r in results))
    for r in results:
        step = max(1, len(r.samples) // 12)
        line = " ".join(f"{s['t']:.1f}s:{s['mean']:.1f}/{s['max']}" for s in r.samples[::step])
        print(f"\nratio {r.ratio:g} files per tablet over time (t:mean/max): {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--entries", type=int, default=5_000_000)
    ap.add_argument("--tablets", type=int, default=8)
    ap.add_argument("--ratios", default="2,3", help="comma-separated compaction ratios")
    ap.add_argument("--memory", default="16M", help="tserver.memory.maps.max")
    ap.add_argument("--batch-size", type=int, default=10_000, help="ingest batch size")
    ap.add_argument("--value-bytes", type=int, default=0, help="random payload per value")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sample", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("--above-limit", type=float, default=5.0, help="allowed s above file.max")
    ap.add_argument("--settle-timeout", type=float, default=600.0)
    ap.add_argument("--verify", action="store_true", help="run continuous-ingest verify too")
    ap.add_argument("--keep", action="store_true", help="keep the stores afterwards")
    ap.add_argument("--dir", default="bench-data/amplification")
    ap.add_argument("--json", default=None, help="write the results (with samples) here")
    args = ap.parse_args()
    ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    if not ratios or any(r < 1 for r in ratios):
        ap.error("--ratios: one or more numbers >= 1")
    os.makedirs(args.dir, exist_ok=True)
    print(
        f"amplification: {args.entries:,} entries, {args.tablets} tablets, memory {args.memory}, "
        f"ratios {', '.join(f'{r:g}' for r in ratios)}, {os.cpu_count()} cores",
        flush=True,
    )
    results = []
    for ratio in ratios:
        results.append(run_ratio(args, ratio))
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    if not all(r.meets_files_bound and r.meets_file_max for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
