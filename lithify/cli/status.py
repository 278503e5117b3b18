"""`lithify status`: tables, tablets, compaction services and metrics of a store."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

import lithify
from lithify.cli.shell import with_store
from lithify.metrics import exposition


@click.command("status")
@click.option("--prometheus", is_flag=True, help="Print the Prometheus text format instead.")
@with_store
def status(store: lithify.Store, prometheus: bool) -> None:
    """Print compaction services, executors, files per tablet and compaction totals."""
    if prometheus:
        click.echo(exposition(store).decode(), nl=False)
        return
    console = Console()
    services = Table(title="compaction services")
    for col in ("service", "planner", "executor", "type", "max size", "threads/queue", "state"):
        services.add_column(col)
    errors = store.manager.service_errors()
    for name, cfg in sorted(store.manager.services().items()):
        for spec in cfg.executors:
            services.add_row(
                name,
                cfg.planner_spec.rsplit(":", 1)[-1],
                spec.executor_id,
                spec.type,
                "-" if spec.max_size is None else f"{spec.max_size:,}",
                str(spec.num_threads or spec.queue),
                "MISCONFIGURED" if name in errors else "ok",
            )
    console.print(services)
    tables = Table(title="tables")
    for col in ("table", "id", "state", "tablets", "files (mean / max)"):
        tables.add_column(col)
    for t in store.list_tables():
        counts = [len(m.files) for m in store.meta.tablets(t.id)]
        mean = sum(counts) / len(counts) if counts else 0
        tables.add_row(
            t.name, t.id, t.state, str(len(counts)), f"{mean:.1f} / {max(counts, default=0)}"
        )
    console.print(tables)
    totals = store.compactions.totals.snapshot()
    if totals:
        work = Table(title="compactions since open")
        for col in (
            "executor",
            "completed",
            "failed",
            "cancelled",
            "entries read",
            "bytes written",
        ):
            work.add_column(col)
        for ex, v in sorted(totals.items()):
            work.add_row(
                ex,
                str(v["completed"]),
                str(v["failed"]),
                str(v["cancelled"]),
                f"{v['entries_read']:,}",
                f"{v['bytes_written']:,}",
            )
        console.print(work)
    for name, err in errors.items():
        console.print(f"[red]service {name} is misconfigured: {err}[/red]")
