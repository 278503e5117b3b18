"""`lithify cluster start|status|stop`: a whole instance on this machine, as real processes."""

from __future__ import annotations

import json
import os
import time

import click
from rich.console import Console
from rich.table import Table

from lithify.cli.main import METADATA_OPTION
from lithify.compaction.executors_config import executors_property
from lithify.compaction.manager import CompactionManager
from lithify.errors import LithifyError
from lithify.metadata.store import MetadataStore
from lithify.server import launcher
from lithify.server.instance import (
    COORDINATOR_LEASE,
    TSERVER_LEASE,
    ensure_secret,
    lease_holder,
    open_metadata,
)

DEFAULT_QUEUE = "DCQ1"


def mixed_executors(queue: str) -> str:
    """The `default` service's executors when compactors run: small and medium compactions
    stay in the tablet server, large ones go to the external queue."""
    return json.dumps(
        [
            {"name": "small", "type": "internal", "maxSize": "32M", "numThreads": 2},
            {"name": "medium", "type": "internal", "maxSize": "128M", "numThreads": 2},
            {"name": "large", "type": "external", "queue": queue},
        ]
    )


def configure_external(meta: MetadataStore, queue: str) -> str | None:
    """Give the `default` service an external executor for `queue` unless the service is
    already configured; returns the executors set (None: left as it was)."""
    prop = executors_property("default")
    current = meta.get_system_properties()
    if prop in current:
        return None
    value = mixed_executors(queue)
    CompactionManager.validate({**current, prop: value})
    meta.set_system_properties({prop: value})
    return value


def start_cluster(
    directory: str,
    *,
    compactors: int,
    coordinators: int,
    queue: str,
    metadata_url: str | None,
    ready_timeout_s: float = 60.0,
    compactor_threads: int | None = None,
) -> list[launcher.ProcessRecord]:
    """Initialise the instance and start its processes; on any failure, stop what started.

    Each compactor may use `compactor_threads` threads per compaction; by default the host's
    cores are shared out among the compactors (at least one each), since they all run here.
    """
    running = [r for r in launcher.read_records(directory) if launcher.is_alive(r)]
    if running:
        names = ", ".join(r.name for r in running)
        raise LithifyError(f"a cluster is already running in {directory} ({names}); stop it first")
    for stale in launcher.read_records(directory):
        launcher.forget(directory, stale)
    meta = open_metadata(directory, metadata_url)
    try:
        ensure_secret(meta)
        if compactors:
            configure_external(meta, queue)
    finally:
        meta.close()
    common = ["--dir", directory, *(["--metadata-url", metadata_url] if metadata_url else [])]
    plan: list[tuple[str, str, list[str]]] = [("tserver", "tserver", ["tserver", *common])]
    plan += [
        (f"coordinator-{i}", "coordinator", ["compaction-coordinator", *common])
        for i in range(1, coordinators + 1)
    ]
    threads = compactor_threads or max(1, (os.cpu_count() or 1) // max(1, compactors))
    plan += [
        (
            f"compactor-{i}",
            "compactor",
            ["compactor", "-q", queue, *common, "--threads", str(threads)],
        )
        for i in range(1, compactors + 1)
    ]
    # Start everything at once (each takes seconds to import and open the store), then wait
    # for each to answer.
    spawned = [launcher.spawn(directory, name, kind, args) for name, kind, args in plan]
    started: list[launcher.ProcessRecord] = []
    try:
        for sp in spawned:
            started.append(launcher.ready(directory, sp, ready_timeout_s))
    except BaseException:
        for sp in spawned:
            launcher.kill_spawned(sp)
        for rec in started:
            launcher.forget(directory, rec)
        raise
    return started


@click.group("cluster")
def cluster() -> None:
    """Run a whole lithify instance on this machine as separate processes."""


@cluster.command("start")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False))
@click.option("--compactors", default=1, show_default=True, help="Compactor processes.")
@click.option(
    "--coordinators",
    default=1,
    show_default=True,
    help="Coordinator processes (one active, the others standing by).",
)
@click.option("--queue", default=DEFAULT_QUEUE, show_default=True, help="The compactors' queue.")
@click.option(
    "--compactor-threads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads one compaction may use in each compactor [default: the cores divided among "
    "the compactors].",
)
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait per process.")
@METADATA_OPTION
def start(
    directory: str,
    compactors: int,
    coordinators: int,
    queue: str,
    compactor_threads: int | None,
    timeout: float,
    metadata_url: str | None,
) -> None:
    """Start a tablet server, coordinators and compactors for the instance in DIR.

    Each process runs in its own process group, logs to DIR/logs/<name>.log and is recorded in
    DIR/cluster/<name>.json. The instance secret is made if the instance has none.

    With compactors, when the `default` compaction service has no executors configured
    (tserver.compaction.major.service.default.planner.opts.executors), it gets a mix: small
    (< 32M, 2 threads) and medium (< 128M, 2 threads) internal executors in the tablet server,
    and a large external executor served by the compactors on QUEUE. Change it with
    `lithify config -s` or `set_system_property`.
    """
    try:
        records = start_cluster(
            str(directory),
            compactors=compactors,
            coordinators=coordinators,
            queue=queue,
            metadata_url=metadata_url,
            ready_timeout_s=timeout,
            compactor_threads=compactor_threads,
        )
    except LithifyError as e:
        raise click.ClickException(str(e)) from None
    table = Table(title=f"lithify cluster in {directory}")
    for col in ("name", "pid", "url", "log"):
        table.add_column(col)
    for r in records:
        table.add_row(r.name, str(r.pid), r.url, r.log)
    Console().print(table)


@cluster.command("status")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False))
@METADATA_OPTION
def status(directory: str, metadata_url: str | None) -> None:
    """Show each recorded process (alive, answering), and who holds the leases."""
    records = launcher.read_records(directory)
    table = Table(title=f"lithify cluster in {directory}")
    for col in ("name", "pid", "alive", "answers", "url"):
        table.add_column(col)
    for r in records:
        alive = launcher.is_alive(r)
        ok = alive and launcher.answers(r.url)
        table.add_row(r.name, str(r.pid), "yes" if alive else "NO", "yes" if ok else "no", r.url)
    console = Console()
    console.print(table)
    if not records:
        console.print("no processes recorded")
    try:
        meta = open_metadata(directory, metadata_url)
    except LithifyError as e:
        console.print(f"metadata store: {e}")
        return
    try:
        for lease in (TSERVER_LEASE, COORDINATOR_LEASE):
            holder, epoch = lease_holder(meta, lease)
            console.print(f"lease {lease}: {holder or 'nobody'} (epoch {epoch})")
    finally:
        meta.close()


@cluster.command("stop")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False))
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    help="Seconds each kind of process gets to stop after SIGTERM before SIGKILL.",
)
def stop(directory: str, timeout: float) -> None:
    """Stop the recorded processes: compactors, coordinators, then the tablet server."""
    records = launcher.read_records(directory)
    if not records:
        click.echo(f"no cluster processes recorded in {directory}")
        return
    began = time.monotonic()
    outcome = launcher.stop_processes(records, timeout_s=timeout)
    for r in records:
        click.echo(f"{r.name}\tpid {r.pid}\t{outcome.get(r.name, 'unknown')}")
        launcher.forget(directory, r)
    click.echo(f"stopped in {time.monotonic() - began:.1f}s")
