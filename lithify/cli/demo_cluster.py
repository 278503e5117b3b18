"""The cluster form of `lithify demo`: external compactions surviving a killed compactor.

Starts a local cluster (tablet server, coordinator, two compactors on queue DCQ1) whose
`default` service keeps small compactions in the tablet server and sends larger ones to the
external queue, runs continuous ingest through a client, kills one compactor with SIGKILL
half-way and starts another, then verifies the linked lists and prints how many compactions ran
where. Every process is stopped at the end, whatever happened.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import lithify
from lithify.cli.ci import print_verify, split_points
from lithify.cli.cluster import start_cluster
from lithify.compaction.executors_config import executors_property
from lithify.continuous.ingest import ContinuousIngest
from lithify.continuous.verify import VerifyResult, verify_batches
from lithify.metrics import scrape
from lithify.rpc.client import RpcClient, RpcError
from lithify.server import launcher
from lithify.server.instance import (
    COORDINATOR_LEASE,
    ensure_secret,
    lease_holder,
    open_metadata,
)

QUEUE = "DCQ1"


def demo_executors(small_max: str) -> str:
    """Small compactions stay in the tablet server; everything larger goes to DCQ1."""
    return json.dumps(
        [
            {"name": "small", "type": "internal", "maxSize": small_max, "numThreads": 2},
            {"name": "large", "type": "external", "queue": QUEUE},
        ]
    )


def _metrics(url: str | None, secret: str) -> dict[str, dict[tuple, float]]:
    if not url:
        return {}
    rpc = RpcClient(url, secret, timeout=5)
    try:
        resp = rpc.stream("GET", "/metrics")
        try:
            return scrape(resp.read().decode())
        finally:
            resp.close()
    except RpcError:
        return {}
    finally:
        rpc.close()


def where_table(tserver: dict, coordinator: dict, killed: str | None) -> Table:
    """Compactions per executor: internal ones from the tablet server, external from DCQ1."""
    t = Table(title="compactions by executor")
    for col in ("executor", "queued", "running", "completed"):
        t.add_column(col, justify="left" if col == "executor" else "right")

    def get(m: dict, name: str, **labels: str) -> int:
        return int(m.get(name, {}).get(tuple(sorted(labels.items())), 0))

    execs = sorted(
        {dict(k).get("executor") for k in tserver.get("lithify_compactions_queued", {})} - {None}
    )
    for ex in execs:
        if ex.startswith("e."):
            continue
        t.add_row(
            ex,
            str(get(tserver, "lithify_compactions_queued", executor=ex)),
            str(get(tserver, "lithify_compactions_running", executor=ex)),
            str(get(tserver, "lithify_compaction_completed_total", executor=ex)),
        )
    t.add_row(
        f"e.{QUEUE} (compactors)",
        str(get(coordinator, "lithify_coordinator_queued", queue=QUEUE)),
        str(get(coordinator, "lithify_coordinator_running_by_queue", queue=QUEUE)),
        str(
            int(
                sum(coordinator.get("lithify_coordinator_compactions_completed_total", {}).values())
            )
        ),
    )
    mean = sum(tserver.get("lithify_tablet_files_mean", {}).values())
    mx = sum(tserver.get("lithify_tablet_files_max", {}).values())
    t.caption = f"files per tablet: mean {mean:.1f}, max {mx:.0f}" + (
        f"; killed {killed}" if killed else ""
    )
    return t


def _busy_compactor(
    records: list[launcher.ProcessRecord], secret: str, directory: str
) -> launcher.ProcessRecord | None:
    """A compactor process that is running an external compaction right now, if any."""
    meta = open_metadata(directory)
    try:
        url, _ = lease_holder(meta, COORDINATOR_LEASE)
    finally:
        meta.close()
    if not url:
        return None
    rpc = RpcClient(url, secret, timeout=5)
    try:
        running = rpc.call("GET", "/v1/coordinator").get("running", [])
    except RpcError:
        return None
    finally:
        rpc.close()
    busy = {r.get("address") for r in running}
    return next((r for r in records if r.kind == "compactor" and r.url in busy), None)


def run_cluster_demo(
    console: Console,
    path: Path,
    *,
    entries: int,
    tablets: int,
    batch_size: int,
    memory: str,
    small_max: str,
    seed: int,
) -> tuple[VerifyResult, dict[str, Any]]:
    directory = str(path)
    meta = open_metadata(directory)
    try:
        secret = ensure_secret(meta)
        meta.set_system_properties(
            {
                executors_property("default"): demo_executors(small_max),
                "tserver.memory.maps.max": memory,
                "compactor.wait.time.job.min": "200ms",
                "compactor.wait.time.job.max": "2s",
            }
        )
    finally:
        meta.close()
    console.print("starting a local cluster: tserver, coordinator, 2 compactors on DCQ1 ...")
    records = start_cluster(
        directory,
        compactors=2,
        coordinators=1,
        queue=QUEUE,
        metadata_url=None,
        ready_timeout_s=120,
    )
    killed: str | None = None
    try:
        urls = {r.name: r.url for r in records}
        with lithify.connect(directory, wait_s=30) as client:
            client.create_table("ci", splits=split_points(tablets))
            ingest = ContinuousIngest(
                lambda t: client.write("ci", t), batch_size=batch_size, seed=seed
            )
            progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            task = progress.add_task("continuous ingest", total=entries)
            last_view = 0.0

            def view() -> Group:
                meta_now = open_metadata(directory)
                try:
                    coord_url, _ = lease_holder(meta_now, COORDINATOR_LEASE)
                finally:
                    meta_now.close()
                return Group(
                    progress,
                    where_table(
                        _metrics(urls["tserver"], secret), _metrics(coord_url, secret), killed
                    ),
                )

            t0 = time.perf_counter()
            with Live(view(), console=console, refresh_per_second=2) as live:
                half = entries // 2
                done = 0
                for _ in range(1_000_000):
                    if done >= entries:
                        break
                    n = ingest.run_cycle(entries - done)
                    done += n
                    progress.advance(task, n)
                    if killed is None and done >= half:
                        victim = _busy_compactor(records, secret, directory)
                        if victim is None and done < entries:
                            continue  # kill one while it works, if one gets work in time
                        victim = victim or next(r for r in records if r.name == "compactor-1")
                        launcher.signal_process(victim, signal.SIGKILL)
                        killed = f"{victim.name} (SIGKILL)"
                        rec, _ = launcher.start_process(
                            directory,
                            "compactor-3",
                            "compactor",
                            ["compactor", "-q", QUEUE, "--dir", directory],
                            ready_timeout_s=120,
                        )
                        records.append(rec)
                        killed += ", started compactor-3"
                    if time.perf_counter() - last_view > 0.5:
                        live.update(view())
                        last_view = time.perf_counter()
                ingest_s = time.perf_counter() - t0
                client.flush("ci")
                live.update(view())
            t1 = time.perf_counter()
            client.compact("ci", timeout=900)
            compact_s = time.perf_counter() - t1
            result = verify_batches(client.scan("ci"))
            final = view()
        console.print(final.renderables[1])
        console.print(
            f"ingest: {ingest.stats.written:,} entries in {ingest_s:.1f}s "
            f"({ingest.stats.written / ingest_s:,.0f} entries/s); user compaction in "
            f"{compact_s:.1f}s; verify read {result.entries:,} entries"
        )
        print_verify(result)
        return result, {"ingest_s": ingest_s, "compact_s": compact_s}
    finally:
        outcome = launcher.stop_processes(launcher.read_records(directory), timeout_s=60)
        console.print("stopped: " + ", ".join(f"{k} {v}" for k, v in sorted(outcome.items())))
