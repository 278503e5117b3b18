"""`lithify demo`: the main job on the embedded default, end to end.

Creates a pre-split table, ingests entries with a progress bar, deletes a share of them, flushes,
compacts, scans everything back and verifies it, then prints files per tablet, bytes written and
throughput. Exits non-zero if verification fails.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import lithify

BATCH = 50_000


def make_rows(n: int, seed: int) -> pa.Array:
    """n distinct random rows, 16 hex digits each."""
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, 2**64 - 1, size=int(n * 1.01) + 16, dtype=np.uint64))[:n]
    rng.shuffle(keys)
    return pa.array([f"{k:016x}".encode() for k in keys.tolist()], pa.binary())


def batch_of(rows: pa.Array) -> pa.Table:
    n = len(rows)
    values = pc.binary_join_element_wise(rows, pa.scalar(b":v", pa.binary()), b"")
    return pa.table(
        {
            "row": rows,
            "family": pa.array([b"f"] * n, pa.binary()),
            "qualifier": pa.array([b"q"] * n, pa.binary()),
            "value": values,
        }
    )


@click.command("demo")
@click.option(
    "--dir",
    "directory",
    default="lithify-demo",
    show_default=True,
    help="Store directory (replaced).",
)
@click.option("--entries", default=2_000_000, show_default=True, help="Entries to ingest.")
@click.option("--tablets", default=8, show_default=True, help="Tablets of the demo table.")
@click.option("--seed", default=7, show_default=True)
def demo(directory: str, entries: int, tablets: int, seed: int) -> None:
    """Ingest, flush, compact, scan back and verify on an embedded store."""
    console = Console()
    path = Path(directory)
    if path.exists():
        shutil.rmtree(path)
    rows = make_rows(entries, seed)
    points = [f"{(i * 16 // tablets):x}".encode() + b"0" * 15 for i in range(1, tablets)]
    with lithify.open(path) as store:
        store.create_table("demo", splits=points)
        t0 = time.perf_counter()
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        with progress:
            task = progress.add_task("ingest", total=entries)
            for off in range(0, entries, BATCH):
                part = rows.slice(off, BATCH)
                store.write("demo", batch_of(part))
                progress.advance(task, len(part))
        ingest_s = time.perf_counter() - t0
        deleted = rows.slice(0, entries // 100)
        store.write(
            "demo",
            pa.table(
                {
                    "row": deleted,
                    "family": pa.array([b"f"] * len(deleted), pa.binary()),
                    "qualifier": pa.array([b"q"] * len(deleted), pa.binary()),
                    "deleted": pa.array([True] * len(deleted)),
                }
            ),
        )
        t1 = time.perf_counter()
        store.flush("demo")
        flush_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        summary = store.compact("demo")
        compact_s = time.perf_counter() - t2
        t3 = time.perf_counter()
        scanned = pa.concat_arrays(
            [b.column("row") for b in store.scan("demo")] or [pa.array([], pa.binary())]
        )
        values_ok = all(
            pc.all(
                pc.equal(
                    b.column("value"),
                    pc.binary_join_element_wise(
                        b.column("row"), pa.scalar(b":v", pa.binary()), b""
                    ),
                )
            ).as_py()
            for b in store.scan("demo")
        )
        scan_s = time.perf_counter() - t3
        expected = pc.sort_indices(rows.slice(entries // 100))
        expected_rows = rows.slice(entries // 100).take(expected)
        rows_ok = (
            len(scanned) == len(expected_rows) and pc.all(pc.equal(scanned, expected_rows)).as_py()
            if len(scanned)
            else len(expected_rows) == 0
        )

        table = Table(title="files per tablet after compaction")
        table.add_column("tablet")
        table.add_column("files", justify="right")
        table.add_column("bytes", justify="right")
        for t in store.tablets("demo"):
            table.add_row(str(t.extent), str(len(t.files)), f"{sum(f.size for f in t.files):,}")
        console.print(table)
        console.print(
            f"ingest {entries:,} entries in {ingest_s:.2f}s ({entries / ingest_s:,.0f} entries/s); "
            f"flush {flush_s:.2f}s; compaction {compact_s:.2f}s "
            f"({summary.entries_read / max(compact_s, 1e-9):,.0f} entries/s, "
            f"{summary.bytes_written:,} bytes written); scan {len(scanned):,} entries in {scan_s:.2f}s"
        )
        store.gc()
    if rows_ok and values_ok:
        console.print(
            f"[green]verified: {len(scanned):,} entries, every row and value as written, "
            f"{entries // 100:,} deletes applied[/green]"
        )
    else:
        console.print(f"[red]VERIFY FAILED: rows_ok={rows_ok} values_ok={values_ok}[/red]")
        raise SystemExit(1)
