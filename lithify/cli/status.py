"""`lithify status`: tables, tablets, compaction services and metrics of a store."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

import lithify
from lithify.cli.main import METADATA_OPTION, STORE_OPTION
from lithify.cli.shell import with_store
from lithify.metrics import exposition, scrape
from lithify.rpc.client import RpcClient, RpcError
from lithify.server.instance import TSERVER_LEASE, lease_holder, open_metadata, read_secret


def _running_tserver_metrics(store_dir: str, metadata_url: str | None) -> str | None:
    """The Prometheus text of the tablet server serving this instance, if one is running."""
    if metadata_url is None and not (Path(store_dir) / "metadata.db").exists():
        return None
    meta = open_metadata(store_dir, metadata_url)
    try:
        url, _ = lease_holder(meta, TSERVER_LEASE)
        if not url:
            return None
        rpc = RpcClient(url, read_secret(meta), timeout=10)
        try:
            resp = rpc.stream("GET", "/metrics")
            try:
                return resp.read().decode()
            finally:
                resp.close()
        except RpcError:
            return None
        finally:
            rpc.close()
    finally:
        meta.close()


def _print_scraped(text: str) -> None:
    samples = scrape(text)
    table = Table(title="tablet server metrics")
    table.add_column("metric")
    table.add_column("labels")
    table.add_column("value", justify="right")
    for name in sorted(samples):
        for labels, value in sorted(samples[name].items()):
            shown = ",".join(f"{k}={v}" for k, v in labels)
            table.add_row(name, shown, f"{value:,.6g}")
    Console().print(table)


@click.command("status")
@STORE_OPTION
@METADATA_OPTION
@click.option("--prometheus", is_flag=True, help="Print the Prometheus text format instead.")
def status(store_dir: str, metadata_url: str | None, prometheus: bool) -> None:
    """Print compaction services, executors, files per tablet and compaction totals.

    When a tablet server is serving the instance, its live metrics are shown; otherwise the
    store is opened here (embedded) and its configuration and files are shown.
    """
    text = _running_tserver_metrics(store_dir, metadata_url)
    if text is not None:
        if prometheus:
            click.echo(text, nl=False)
        else:
            _print_scraped(text)
        return
    _embedded_status(store_dir=store_dir, metadata_url=metadata_url, prometheus=prometheus)


@with_store
def _embedded_status(store: lithify.Store, prometheus: bool) -> None:
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
