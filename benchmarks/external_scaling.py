"""External compactions: does throughput scale with the number of compactor processes?

The same compaction work is run by 1, 2, 4 (and, when `--compactors` asks, 8, 16) compactor
processes of a local cluster (tablet server, coordinator, compactors: real processes, as
`lithify cluster` starts them), and the entries compacted per second are compared with the
baseline of one compactor measured in the same run:

    efficiency(N) = throughput(N) / (N x throughput(1))

The work: a table of `--tablets` tablets, each with `--files-per-tablet` sorted files of
`--entries-per-file` random entries. It is built once with an embedded store (with a
compaction ratio so high that nothing compacts while building), and every run starts from a
copy of that instance directory, so every run does exactly the same work. A run starts the
cluster on its copy with every compaction of the default service on the external queue DCQ1,
then starts one user compaction of the whole table (one job per tablet, each job merging all
of its tablet's files) and measures from the request until no tablet carries the selection any
more (the metadata, polled every 20 ms during the last wave of jobs, every 100 ms before, so
that the polling takes little CPU from the compactors). Throughput = input entries / that time.

One job is kept below `CompactionRequest.min_subcompaction_entries` (250,000 entries by
default: 4 files x 50,000), and every compactor is started with `--threads 1` (change it with
`--compactor-threads`), so each compactor is one thread of work, at every count alike, and N
compactors are N-way parallelism. (With more threads a lone compactor reads its inputs ahead
on the idle cores, which makes the baseline use more than one core while several compactors
only contend for them: on 2 cores `--compactor-threads 2` measured 1.81M entries/s for one
compactor and 2.61M for two, `--compactor-threads 1` 1.62M and 2.80M.)

Scaling cannot go past the machine's cores: with N above the core count
the compactors (and the tablet server and coordinator) share them, and efficiency falls as
cores / N at best; the table says where N exceeds the cores.

    .venv/bin/python benchmarks/external_scaling.py --compactors 1,2,4 --json /tmp/scaling.json

Target: >= 85% efficiency for every N up to the number of cores. Every process started is
killed (its whole process group) in a `finally`, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import lithify  # noqa: E402
from tests.cluster_util import LocalCluster  # noqa: E402

TABLE = "bench"
TARGET_EFFICIENCY = 0.85
#: Long enough for 16 compactors to start on a small machine, and for the slowest run.
RUN_TIMEOUT_S = 1800.0
#: Polling the metadata for the end of the run: each poll reads and decodes every tablet (about
#: 1.4 ms of CPU for 32 tablets), which at 20 ms would take 6% of a core away from the
#: compactors it measures, and with two compactors on two cores that shows as lost efficiency.
#: So it polls slowly until only the last wave of jobs is left, then finely.
POLL_S = 0.02
POLL_SLOW_S = 0.1


@dataclass
class RunResult:
    compactors: int
    seconds: float
    entries: int
    entries_per_s: float
    efficiency: float = 0.0
    jobs: int = 0
    #: CPU seconds during the measured interval, per role, and the 1-minute load average when
    #: the run started (other work on a shared machine shows up there).
    cpu_s: dict[str, float] | None = None
    load_before: float = 0.0
    #: Seconds of every run of this count (with --repeat), the fastest one reported.
    tries: list[float] | None = None


def split_rows(tablets: int) -> list[bytes]:
    return [f"{t:04d}".encode() for t in range(1, tablets)]


def build_template(
    path: Path, tablets: int, files: int, entries_per_file: int, value_bytes: int, seed: int
) -> int:
    """The instance every run copies: `tablets` tablets with `files` flushed files each.
    Returns the number of entries in all files together."""
    rng = np.random.default_rng(seed)
    with lithify.open(path) as store:
        store.create_table(
            TABLE,
            splits=split_rows(tablets),
            # Nothing compacts while building: every file stays as flushed.
            properties={"table.compaction.major.ratio": "1000"},
        )
        for f in range(files):
            for t in range(tablets):
                keys = rng.integers(0, 2**63, size=entries_per_file, dtype=np.int64)
                rows = [f"{t:04d}-{k:016x}".encode() for k in keys.tolist()]
                payload = rng.bytes(entries_per_file * value_bytes)
                values = [
                    payload[i * value_bytes : (i + 1) * value_bytes]
                    for i in range(entries_per_file)
                ]
                store.write(
                    TABLE,
                    pa.table(
                        {
                            "row": pa.array(rows, pa.binary()),
                            "family": pa.array([b"f"] * entries_per_file, pa.binary()),
                            "qualifier": pa.array([f"q{f}".encode()] * entries_per_file),
                            "value": pa.array(values, pa.binary()),
                        }
                    ),
                )
            store.flush(TABLE)
        counts = [len(t.files) for t in store.tablets(TABLE)]
        if counts != [files] * tablets:
            raise RuntimeError(f"expected {files} files per tablet, built {counts}")
        return sum(f.entries for t in store.tablets(TABLE) for f in t.files)


def cpu_seconds(cluster: LocalCluster) -> dict[str, float]:
    """CPU time (user + system) used so far by each role's processes."""
    out: dict[str, float] = {}
    for name in cluster.names():
        role = name.split("-")[0]
        try:
            t = psutil.Process(cluster.pid(name)).cpu_times()
        except psutil.Error:
            continue
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def run_once(
    template: Path, workdir: Path, n: int, entries: int, timeout_s: float, threads: int
) -> RunResult:
    """Copy the template, start a cluster with `n` compactors, compact everything, measure."""
    inst = workdir / f"run-{n}"
    if inst.exists():
        shutil.rmtree(inst)
    shutil.copytree(template, inst, ignore=shutil.ignore_patterns("LOCK"))
    cluster = LocalCluster(inst)
    try:
        cluster.start(coordinators=1, compactors=n, external_only=True, compactor_threads=threads)
        c = cluster.client()
        info = c.table_info(TABLE)
        load = os.getloadavg()[0]
        cpu0 = cpu_seconds(cluster)
        t0 = time.perf_counter()
        c.compact(TABLE, flush=False, wait=False)
        deadline = time.monotonic() + timeout_s
        while pending := sum(m.selection is not None for m in cluster.meta.tablets(info.id)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} compactor(s): not done after {timeout_s:g}s")
            time.sleep(POLL_S if pending <= n else POLL_SLOW_S)
        seconds = time.perf_counter() - t0
        cpu1 = cpu_seconds(cluster)
        cpu = {k: round(cpu1.get(k, 0.0) - cpu0.get(k, 0.0), 2) for k in cpu1}
        # The metadata, not the tablet server: its view follows commits by refresh calls,
        # which may still be on their way.
        metas = cluster.meta.tablets(info.id)
        if any(len(m.files) != 1 or m.compactions for m in metas):
            raise RuntimeError(f"{n} compactor(s): tablets not compacted to one file each")
        if sum(f.entries for m in metas for f in m.files) != entries:
            raise RuntimeError(f"{n} compactor(s): entries lost or gained")
        jobs = sum(cluster.log(name).count("Compacted ") for name in cluster.names("compactor"))
        return RunResult(
            n, seconds, entries, entries / seconds, jobs=jobs, cpu_s=cpu, load_before=load
        )
    finally:
        cluster.close()
        shutil.rmtree(inst, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compactors", default="1,2,4", help="compactor counts, comma separated")
    ap.add_argument("--tablets", type=int, default=32)
    ap.add_argument("--entries-per-file", type=int, default=50_000)
    ap.add_argument("--files-per-tablet", type=int, default=4)
    ap.add_argument("--value-bytes", type=int, default=32)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=RUN_TIMEOUT_S, help="seconds per run")
    ap.add_argument(
        "--compactor-threads",
        type=int,
        default=1,
        help="threads one compaction may use in each compactor (its --threads), the same at "
        "every count",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per count, the fastest kept (other load on a shared machine only slows); "
        "the efficiency of the median runs is printed too",
    )
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    args = ap.parse_args(argv)

    counts = sorted({int(x) for x in args.compactors.split(",") if x.strip()})
    if not counts or counts[0] < 1:
        ap.error("--compactors needs positive counts")
    if 1 not in counts:
        counts.insert(0, 1)  # the baseline is always measured in the same run
    cores = os.cpu_count() or 1
    per_job = args.files_per_tablet * args.entries_per_file
    if per_job >= 250_000:
        print(
            f"note: {per_job} entries per job reach the subcompaction threshold (250,000): "
            "each compactor then uses several threads, and scaling is no longer per process"
        )

    own_dir = args.dir is None
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="lithify-scaling-"))
    workdir.mkdir(parents=True, exist_ok=True)
    template = workdir / "template"
    results: list[RunResult] = []
    try:
        if template.exists():
            shutil.rmtree(template)
        t0 = time.perf_counter()
        entries = build_template(
            template,
            args.tablets,
            args.files_per_tablet,
            args.entries_per_file,
            args.value_bytes,
            args.seed,
        )
        size = sum(p.stat().st_size for p in (template / "data").rglob("*") if p.is_file())
        print(
            f"built {args.tablets} tablets x {args.files_per_tablet} files x "
            f"{args.entries_per_file} entries = {entries} entries, {size / 2**20:.0f} MiB, "
            f"in {time.perf_counter() - t0:.1f}s; {cores} cores; each compactor runs with "
            f"--threads {args.compactor_threads}"
        )
        # Rounds of every count (not every repeat of one count in a row), so that a burst of
        # other load on a shared machine hits all counts alike.
        tries: dict[int, list[RunResult]] = {n: [] for n in counts}
        for rep in range(max(1, args.repeat)):
            for n in counts:
                t = run_once(template, workdir, n, entries, args.timeout, args.compactor_threads)
                tries[n].append(t)
                print(f"  round {rep + 1}: {n:>2} compactor(s) {t.seconds:7.2f}s", flush=True)
        for n in counts:
            r = min(tries[n], key=lambda x: x.seconds)
            r.tries = [round(x.seconds, 3) for x in tries[n]]
            results.append(r)
            cpu = r.cpu_s or {}
            print(
                f"  {n:>2} compactor(s): {r.seconds:7.2f}s (of {r.tries})"
                f"  {r.entries_per_s:>10,.0f} entries/s"
                f"  CPU s: compactors {cpu.get('compactor', 0):.1f}, tserver "
                f"{cpu.get('tserver', 0):.1f}, coordinator {cpu.get('coordinator', 0):.1f}"
                f"  (load before {r.load_before:.1f})"
            )
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            shutil.rmtree(template, ignore_errors=True)

    base = results[0].entries_per_s
    for r in results:
        r.efficiency = r.entries_per_s / (r.compactors * base)
    # The same from the median run of each count (the table above uses the fastest).
    median_s = {r.compactors: statistics.median(r.tries or [r.seconds]) for r in results}
    median_eff = {n: median_s[1] / (n * s) for n, s in median_s.items()}
    print()
    print(f"baseline: 1 compactor, {base:,.0f} entries/s")
    print(
        f"{'compactors':>10} {'seconds':>8} {'entries/s':>12} {'speed-up':>9} {'efficiency':>10}"
        f" {'compactor cores':>16}"
    )
    for r in results:
        note = f"  (exceeds the {cores} cores)" if r.compactors > cores else ""
        ok = (
            ""
            if r.compactors > cores
            else ("  ok" if r.efficiency >= TARGET_EFFICIENCY else "  BELOW TARGET")
        )
        busy = (r.cpu_s or {}).get("compactor", 0.0) / r.seconds
        print(
            f"{r.compactors:>10} {r.seconds:>8.2f} {r.entries_per_s:>12,.0f} "
            f"{r.entries_per_s / base:>8.2f}x {r.efficiency:>9.0%} {busy:>16.2f}{ok}{note}"
        )
    within = [r for r in results if r.compactors <= cores]
    met = all(r.efficiency >= TARGET_EFFICIENCY for r in within)
    print(f"target >= {TARGET_EFFICIENCY:.0%} up to {cores} cores: {'met' if met else 'NOT met'}")
    if max(len(r.tries or ()) for r in results) > 1:
        shown = ", ".join(f"{n}: {e:.0%}" for n, e in median_eff.items())
        print(f"efficiency from the median runs instead: {shown}")

    if args.json:
        out = {
            "compactors": [r.compactors for r in results],
            "entries_per_s": [round(r.entries_per_s, 1) for r in results],
            "efficiency": [round(r.efficiency, 4) for r in results],
            "efficiency_of_medians": [round(median_eff[r.compactors], 4) for r in results],
            "seconds": [round(r.seconds, 3) for r in results],
            "jobs": [r.jobs for r in results],
            "compactor_cores": [
                round((r.cpu_s or {}).get("compactor", 0.0) / r.seconds, 3) for r in results
            ],
            "baseline": {"compactors": 1, "entries_per_s": round(base, 1)},
            "total_entries": results[0].entries,
            "tablets": args.tablets,
            "files_per_tablet": args.files_per_tablet,
            "entries_per_file": args.entries_per_file,
            "value_bytes": args.value_bytes,
            "cores": cores,
            "compactor_threads": args.compactor_threads,
            "target_efficiency": TARGET_EFFICIENCY,
            "target_met_up_to_cores": met,
            "runs": [asdict(r) for r in results],
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
