"""`lithify compactor`: run external compactions of one queue."""

from __future__ import annotations

import sys

import click

from lithify.cli.main import METADATA_OPTION


@click.command("compactor")
@click.option("-q", "--queue", required=True, help="External queue to serve (e.g. DCQ1).")
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False),
    help="Instance directory (its data files and, by default, its metadata).",
)
@METADATA_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=0, show_default=True, help="Port to listen on (0: any free one).")
@click.option("--id", "compactor_id", default=None, help="Compactor id (default: host:port).")
@click.option(
    "--poll-wait",
    default=30.0,
    show_default=True,
    help="Seconds one request for work may wait at the coordinator (long-poll).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads one compaction may use (subcompactions and input read-ahead) [default: every "
    "core]. On a host running several compactors give each its share of the cores: threads "
    "beyond it only contend with the other compactors.",
)
@click.option("--announce", default=None, hidden=True, help="Write {url, pid} here once serving.")
def compactor(
    queue: str,
    directory: str,
    metadata_url: str | None,
    host: str,
    port: int,
    compactor_id: str | None,
    poll_wait: float,
    threads: int | None,
    announce: str | None,
) -> None:
    """Run compaction jobs of external queue QUEUE, one at a time.

    It finds the coordinator through the `coordinator` lease of the metadata store, asks for
    work, runs it, and reports the result until a coordinator acknowledges it. Idle, it backs
    off between `compactor.wait.time.job.min` and `.max`. SIGTERM: finish the current job
    (cancelled after `compactor.cancel.grace`), then exit.
    """
    from lithify.compactor.process import run_compactor

    sys.exit(
        run_compactor(
            directory,
            queue,
            metadata_url=metadata_url,
            host=host,
            port=port,
            compactor_id=compactor_id,
            announce_file=announce,
            poll_wait_s=poll_wait,
            threads=threads,
        )
    )
