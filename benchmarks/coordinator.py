"""Compaction coordinator: reservations per second and pickup latency, against a real process.

A fresh instance directory (SQLite metadata in WAL mode, `synchronous=NORMAL`: durable across a
process crash, not across power loss) gets tables whose tablets each reference a few small files
in the metadata. The files need not exist: a reservation only touches metadata. A real
`lithify.coordinator.process` is started as a subprocess on it, then:

* reservations/s, for each N in `--compactors`: a deep queue (`--tablets` jobs, one per tablet,
  posted to `/v1/queues/plan`), then N simulated compactors (threads sharing one `RpcClient`,
  each with its own keep-alive connection) call `/v1/compactor/next` with a fresh ECID and
  `wait_s=0` until the queue is empty. Rate = successful reservations / time until the queue
  is drained. The records are left in place (nobody reports on them), so the coordinator's
  periodic check is switched off for the run (`coordinator.check.interval` = 1h), or it would
  judge the silent compactors dead and release thousands of records mid-measurement.
* pickup latency: `--waiters` compactors long-poll (`wait_s`) an empty queue; `--pickups` times
  one job is planned; latency = from just before the `POST /v1/queues/plan` to the moment a
  waiting compactor holds the reserved job (both clocks are this process's `perf_counter`).

With `--repeat R` every count is measured R times (in rounds over the counts, so that a burst of
other load on a shared machine hits all counts alike) and the median is reported; the headline
figure is the best count's median. The coordinator's CPU per reservation (load-independent) and
this process's CPU (the simulated compactors share the machine's cores) are reported as well.

    .venv/bin/python benchmarks/coordinator.py --compactors 1,8,64 --repeat 3 --json /tmp/c.json

Targets: >= 1,000 reservations/s and pickup p50 < 50 ms.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from lithify.data.ranges import Extent, FileRef
from lithify.metadata.store import MetadataStore, TabletMeta
from lithify.rpc.client import RpcClient
from lithify.rpc.wire import extent_from_json, extent_to_json
from lithify.server.instance import ensure_secret, open_metadata

REPO = Path(__file__).resolve().parent.parent
TARGET_RES_S = 1000.0
TARGET_P50_MS = 50.0


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(p / 100.0 * (len(s) - 1))))
    return s[k]


def make_table(meta: MetadataStore, name: str, tablets: int, files: int) -> list[TabletMeta]:
    """A table of `tablets` tablets, each referencing `files` (non-existent) small files."""
    splits = [f"r{i:07d}".encode() for i in range(1, tablets)]
    info = meta.create_table(name, splits=splits)
    out = []
    for i, m in enumerate(meta.tablets(info.id)):
        refs = tuple(
            FileRef(f"tables/{info.id}/F{i:07d}{k:02d}.parquet", 1000 + k, 10) for k in range(files)
        )
        out.append(meta.update_tablet(m, m.replace(files=refs)))
    return out


def plan_body(m: TabletMeta, queue_name: str) -> dict[str, Any]:
    return {
        "extent": extent_to_json(m.extent),
        "jobs": [
            {
                "files": [f.to_json() for f in m.files],
                "executor": f"e.{queue_name}",
                "priority": 1,
                "kind": "SYSTEM",
            }
        ],
    }


class Coordinator:
    """The coordinator subprocess; always killed on exit."""

    def __init__(self, directory: Path, verbose: bool) -> None:
        self.announce = directory / "coordinator.json"
        cmd = [
            sys.executable,
            "-m",
            "lithify.coordinator.process",
            "--dir",
            str(directory),
            "--port",
            "0",
            "--announce",
            str(self.announce),
        ]
        self.log = open(directory / "coordinator.log", "w")  # noqa: SIM115 - closed in stop()
        path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = ""
        self.verbose = verbose

    def wait_active(self, secret: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited with {self.proc.returncode}")
            if self.announce.exists():
                self.url = json.loads(self.announce.read_text())["url"]
                try:
                    if RpcClient(self.url, secret).call("GET", "/v1/coordinator")["active"]:
                        return self.url
                except Exception:  # noqa: BLE001 - not up yet
                    pass
            time.sleep(0.05)
        raise RuntimeError("coordinator did not become active")

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            self.log.close()


def enqueue(client: RpcClient, metas: list[TabletMeta], queue_name: str) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        for r in pool.map(
            lambda m: client.call("POST", "/v1/queues/plan", plan_body(m, queue_name)), metas
        ):
            assert r["queued"] == 1, r
    return len(metas) / (time.perf_counter() - t0)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def bench_reservations(
    client: RpcClient, metas: list[TabletMeta], n: int, pid: int, queue_name: str
) -> dict[str, Any]:
    plans_per_s = enqueue(client, metas, queue_name)
    cpu0 = cpu_seconds(pid)
    own0 = cpu_seconds(os.getpid())
    counts = [0] * n
    barrier = threading.Barrier(n + 1)
    ends = [0.0] * n

    def compactor(i: int) -> None:
        barrier.wait()
        while True:
            body = {
                "queue": queue_name,
                "compactor": f"bench-{n}-{i}",
                "address": None,
                "ecid": uuid.uuid4().hex,
                "wait_s": 0,
            }
            if client.call("POST", "/v1/compactor/next", body)["job"] is None:
                break
            counts[i] += 1
        ends[i] = time.perf_counter()

    threads = [threading.Thread(target=compactor, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = max(ends) - t0
    cpu = cpu_seconds(pid) - cpu0
    own = cpu_seconds(os.getpid()) - own0
    total = sum(counts)
    assert total == len(metas), (total, len(metas))
    return {
        "compactors": n,
        "reservations": total,
        "seconds": round(elapsed, 3),
        "reservations_per_s": round(total / elapsed, 1),
        "coordinator_cpu_s": round(cpu, 3),
        # Load-independent: what one fully available core would sustain.
        "reservations_per_cpu_s": round(total / cpu, 1) if cpu > 0 else None,
        # The simulated compactors share the machine's cores with the coordinator.
        "bench_client_cpu_s": round(own, 3),
        "plans_per_s": round(plans_per_s, 1),
    }


def bench_pickup(
    client: RpcClient, metas: list[TabletMeta], waiters: int, wait_s: float
) -> dict[str, Any]:
    queue_name = "pickup"
    received: queue.Queue[tuple[float, Extent]] = queue.Queue()
    stop = threading.Event()

    def waiter(i: int) -> None:
        while not stop.is_set():
            body = {
                "queue": queue_name,
                "compactor": f"waiter-{i}",
                "address": None,
                "ecid": uuid.uuid4().hex,
                "wait_s": wait_s,
            }
            try:
                job = client.call("POST", "/v1/compactor/next", body, timeout=wait_s + 10)["job"]
            except Exception:  # noqa: BLE001 - the coordinator is being stopped
                return
            if job is not None:
                received.put((time.perf_counter(), extent_from_json(job["extent"])))

    threads = [threading.Thread(target=waiter, args=(i,), daemon=True) for i in range(waiters)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # let every waiter park
    latencies: list[float] = []
    try:
        for m in metas:
            t0 = time.perf_counter()
            client.call("POST", "/v1/queues/plan", plan_body(m, queue_name))
            t1, extent = received.get(timeout=10)
            assert extent == m.extent
            latencies.append((t1 - t0) * 1000.0)
            time.sleep(0.005)  # the waiter goes back to waiting
    finally:
        stop.set()
    return {
        "waiters": waiters,
        "pickups": len(latencies),
        "pickup_p50_ms": round(_pct(latencies, 50), 2),
        "pickup_p99_ms": round(_pct(latencies, 99), 2),
        "pickup_max_ms": round(max(latencies), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compactors", default="1,8,64", help="comma-separated compactor counts")
    ap.add_argument("--tablets", type=int, default=3000, help="queue depth per count (jobs)")
    ap.add_argument("--files", type=int, default=3, help="files per tablet")
    ap.add_argument("--repeat", type=int, default=1, help="measurements per count (median)")
    ap.add_argument("--pickups", type=int, default=200)
    ap.add_argument("--waiters", type=int, default=8)
    ap.add_argument("--wait-s", type=float, default=5.0, help="long-poll length of waiters")
    ap.add_argument("--dir", default=None, help="instance directory (default: a fresh temp dir)")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    counts = [int(x) for x in args.compactors.split(",") if x.strip()]

    directory = Path(args.dir or tempfile.mkdtemp(prefix="lithify-coord-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    meta = open_metadata(directory)
    coordinator: Coordinator | None = None
    try:
        secret = ensure_secret(meta)
        meta.set_system_properties({"coordinator.check.interval": "1h"})
        runs = [(n, r) for r in range(args.repeat) for n in counts]
        tables = {
            (n, r): make_table(meta, f"res{n}_{r}", args.tablets, args.files) for n, r in runs
        }
        pickup_table = make_table(meta, "pickup", args.pickups, args.files)
        coordinator = Coordinator(directory, args.verbose)
        url = coordinator.wait_active(secret)
        pid = coordinator.proc.pid
        client = RpcClient(url, secret, timeout=60.0)
        results = []
        for n, rep in runs:  # rounds of every count, so that a burst of load hits all alike
            r = bench_reservations(client, tables[n, rep], n, pid, f"res{n}_{rep}")
            print(
                f"{n:3d} compactors: {r['reservations']} reservations in {r['seconds']:.2f}s = "
                f"{r['reservations_per_s']:.0f}/s; coordinator CPU {r['coordinator_cpu_s']:.2f}s "
                f"= {r['reservations_per_cpu_s']:.0f} per CPU-second, bench client CPU "
                f"{r['bench_client_cpu_s']:.2f}s (plans queued at {r['plans_per_s']:.0f}/s)",
                flush=True,
            )
            results.append(r)
        medians = {
            n: {
                key: statistics.median(r[key] for r in results if r["compactors"] == n)
                for key in ("reservations_per_s", "reservations_per_cpu_s")
            }
            for n in counts
        }
        for n, m in medians.items():
            print(
                f"{n:3d} compactors, median of {args.repeat}: {m['reservations_per_s']:.0f}/s, "
                f"{m['reservations_per_cpu_s']:.0f} per coordinator CPU-second",
                flush=True,
            )
        pickup = bench_pickup(client, pickup_table, args.waiters, args.wait_s)
        print(
            f"pickup latency over {pickup['pickups']} enqueues, {pickup['waiters']} waiting "
            f"compactors: p50 {pickup['pickup_p50_ms']:.1f} ms, p99 {pickup['pickup_p99_ms']:.1f} "
            f"ms, max {pickup['pickup_max_ms']:.1f} ms",
            flush=True,
        )
        best = max(m["reservations_per_s"] for m in medians.values())
        out = {
            "reservations_per_s": best,
            "pickup_p50_ms": pickup["pickup_p50_ms"],
            "pickup_p99_ms": pickup["pickup_p99_ms"],
            "median_by_compactors": {str(n): m for n, m in medians.items()},
            "by_compactors": results,
            "pickup": pickup,
            "metadata": "sqlite WAL synchronous=NORMAL",
            # uvicorn uses httptools when it is importable, else the pure-Python h11.
            "http_parser": "httptools" if importlib.util.find_spec("httptools") else "h11",
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "targets": {"reservations_per_s": TARGET_RES_S, "pickup_p50_ms": TARGET_P50_MS},
            "met": {
                "reservations_per_s": best >= TARGET_RES_S,
                "pickup_p50_ms": pickup["pickup_p50_ms"] < TARGET_P50_MS,
            },
        }
        print(json.dumps(out["met"]))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    finally:
        if coordinator is not None:
            coordinator.stop()
        meta.close()
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
