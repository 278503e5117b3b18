"""`lithify demo`: the main job on the embedded default, end to end.

By default it runs a local cluster (`lithify/cli/demo_cluster.py`): tablet server, coordinator
and two compactors, continuous ingest with one compactor killed half-way, then verify. With
`--embedded` it runs everything in this process instead: continuous ingest into a pre-split
table on the `default` compaction service while showing the compactions queued and running per
executor, then a user compaction of the whole table and verify. Either way it exits non-zero if
verification fails (UNDEFINED or CORRUPT not zero).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import lithify
from lithify.cli.ci import print_verify, split_points
from lithify.continuous.ingest import ContinuousIngest
from lithify.continuous.verify import verify_batches


def executor_table(store: lithify.Store) -> Table:
    """Queued and running compactions per executor, files per tablet, completed work."""
    t = Table(title="compactions")
    for col in ("executor", "queued", "running", "completed", "entries written"):
        t.add_column(col, justify="right" if col != "executor" else "left")
    totals = store.compactions.totals.snapshot()
    for ex_id, st in sorted(store.manager.executor_stats().items()):
        done = totals.get(ex_id, {})
        t.add_row(
            ex_id,
            str(st.queued),
            str(st.running),
            str(done.get("completed", 0)),
            f"{done.get('entries_written', 0):,}",
        )
    counts = store.files_per_tablet()
    mean = sum(counts) / len(counts) if counts else 0
    t.caption = f"files per tablet: mean {mean:.1f}, max {max(counts, default=0)}"
    return t


@click.command("demo")
@click.option(
    "--dir", "directory", default="lithify-demo", show_default=True, help="Store dir (replaced)."
)
@click.option("--entries", default=2_000_000, show_default=True, help="Entries to ingest.")
@click.option("--tablets", default=8, show_default=True, help="Tablets of the demo table.")
@click.option("--batch-size", default=20_000, show_default=True, help="Entries per batch.")
@click.option(
    "--memory", default="8M", show_default=True, help="tserver.memory.maps.max for the demo."
)
@click.option("--seed", default=7, show_default=True)
@click.option(
    "--embedded", is_flag=True, help="Run in this process (no cluster, internal executors only)."
)
@click.option(
    "--small-max",
    default="12M",
    show_default=True,
    help="Cluster mode: compactions below this size stay in the tablet server; larger ones go "
    "to the external queue DCQ1.",
)
def demo(
    directory: str,
    entries: int,
    tablets: int,
    batch_size: int,
    memory: str,
    seed: int,
    embedded: bool,
    small_max: str,
) -> None:
    """Continuous ingest with compactions running (a compactor killed half-way), then verify.

    Without --embedded: a local cluster of real processes (logs under DIR/logs).
    """
    console = Console()
    path = Path(directory)
    if path.exists():
        shutil.rmtree(path)
    if not embedded:
        from lithify.cli.demo_cluster import run_cluster_demo

        result, _ = run_cluster_demo(
            console,
            path,
            entries=entries,
            tablets=tablets,
            batch_size=batch_size,
            memory=memory,
            small_max=small_max,
            seed=seed,
        )
        _conclude(console, result.ok)
        return
    with lithify.open(path) as store:
        store.set_system_property("tserver.memory.maps.max", memory)
        store.create_table("ci", splits=split_points(tablets))
        ingest = ContinuousIngest(lambda t: store.write("ci", t), batch_size=batch_size, seed=seed)
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        task = progress.add_task("continuous ingest", total=entries)
        t0 = time.perf_counter()
        with Live(
            Group(progress, executor_table(store)), console=console, refresh_per_second=4
        ) as live:

            def advance(n: int) -> None:
                progress.advance(task, n)
                live.update(Group(progress, executor_table(store)))

            stats = ingest.run(entries, advance)
            ingest_s = time.perf_counter() - t0
            store.flush("ci")
            store.wait_for_compactions(timeout=600)
            live.update(Group(progress, executor_table(store)))
        t1 = time.perf_counter()
        summary = store.compact("ci", timeout=600)
        compact_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        result = verify_batches(store.scan("ci"))
        verify_s = time.perf_counter() - t2
        console.print(executor_table(store))
        totals = store.compactions.totals.snapshot()
        written = sum(v["bytes_written"] for v in totals.values())
        console.print(
            f"ingest: {stats.written:,} entries in {ingest_s:.1f}s "
            f"({stats.written / ingest_s:,.0f} entries/s); user compaction of {summary.tablets} "
            f"tablets in {compact_s:.1f}s; compactions wrote {written:,} bytes in all; "
            f"verify read {result.entries:,} entries in {verify_s:.1f}s"
        )
        print_verify(result)
        store.gc()
    _conclude(console, result.ok)


def _conclude(console: Console, ok: bool) -> None:
    if ok:
        console.print("[green]verified: UNDEFINED=0 CORRUPT=0[/green]")
    else:
        console.print("[red]VERIFY FAILED[/red]")
        raise SystemExit(1)
