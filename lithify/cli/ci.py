"""`lithify ci ingest` and `lithify ci verify`: the continuous-ingest data-loss test."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import lithify
from lithify.cli.shell import with_store
from lithify.continuous.ingest import ContinuousIngest
from lithify.continuous.verify import VerifyResult, verify_batches
from lithify.errors import TableNotFoundError


def split_points(tablets: int) -> list[bytes]:
    """Split points that spread random 16-hex-digit rows evenly over `tablets` tablets."""
    return [f"{(i << 64) // tablets:016x}".encode() for i in range(1, tablets)]


def ensure_table(store: lithify.Store, table: str, tablets: int) -> None:
    try:
        store.table_info(table)
    except TableNotFoundError:
        store.create_table(table, splits=split_points(tablets))


def progress_bar(console: Console | None = None) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def print_verify(result: VerifyResult, out=None) -> None:
    out = out or sys.stdout
    print(f"REFERENCED={result.referenced}", file=out)
    print(f"UNREFERENCED={result.unreferenced}", file=out)
    print(f"UNDEFINED={result.undefined}", file=out)
    print(f"CORRUPT={result.corrupt}", file=out)
    for row in result.undefined_examples:
        print(f"  undefined row {row.decode(errors='replace')}", file=out)


@click.group("ci")
def ci() -> None:
    """Continuous ingest: write linked lists, then verify that nothing was lost."""


@ci.command("ingest")
@click.option("--table", default="ci", show_default=True)
@click.option("--entries", default=1_000_000, show_default=True, help="Entries to write.")
@click.option("--batch-size", default=10_000, show_default=True, help="Entries per flushed batch.")
@click.option("--tablets", default=8, show_default=True, help="Tablets of a new table.")
@click.option("--delete-probability", default=0.0, show_default=True, type=float)
@click.option("--value-bytes", default=0, show_default=True, help="Random payload bytes.")
@click.option("--seed", default=None, type=int, help="Seed for repeatable runs.")
@with_store
def ingest(
    store: lithify.Store,
    table: str,
    entries: int,
    batch_size: int,
    tablets: int,
    delete_probability: float,
    value_bytes: int,
    seed: int | None,
) -> None:
    """Write ENTRIES linked-list entries into TABLE (created pre-split if missing)."""
    ensure_table(store, table, tablets)
    ingest = ContinuousIngest(
        lambda t: store.write(table, t),
        batch_size=batch_size,
        delete_probability=delete_probability,
        value_bytes=value_bytes,
        seed=seed,
    )
    with progress_bar() as bar:
        task = bar.add_task("ingest", total=entries)
        stats = ingest.run(entries, lambda n: bar.advance(task, n))
    store.flush(table)
    click.echo(
        f"wrote {stats.written} entries ({stats.deleted} deletes) in {stats.batches} batches"
    )


@ci.command("verify")
@click.option("--table", default="ci", show_default=True)
@with_store
def verify(store: lithify.Store, table: str) -> None:
    """Scan TABLE and count REFERENCED, UNREFERENCED, UNDEFINED and CORRUPT entries.

    Exits 1 when UNDEFINED or CORRUPT is not zero.
    """
    result = verify_batches(store.scan(table))
    print_verify(result)
    if not result.ok:
        sys.exit(1)
