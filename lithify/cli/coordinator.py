"""`lithify compaction-coordinator`: run a compaction coordinator of an instance."""

from __future__ import annotations

import logging
import sys

import click

from lithify.cli.main import METADATA_OPTION


@click.command("compaction-coordinator")
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False),
    help="Instance directory (made by the tablet server or `lithify cluster start`).",
)
@METADATA_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=0, show_default=True, help="Port to listen on (0: any free one).")
@click.option("--announce", default=None, hidden=True, help="Write {url, pid} here once serving.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def compaction_coordinator(
    directory: str,
    metadata_url: str | None,
    host: str,
    port: int,
    announce: str | None,
    verbose: int,
) -> None:
    """Own the external compaction queues and the running external compactions.

    One coordinator is active (it holds the `coordinator` lease, whose holder is its URL);
    others stand by and take over when it goes. SIGTERM releases the lease and stops cleanly.
    """
    from lithify.coordinator.process import run_coordinator

    if verbose:
        logging.getLogger().setLevel(logging.INFO if verbose == 1 else logging.DEBUG)
    sys.exit(
        run_coordinator(
            directory, metadata_url=metadata_url, host=host, port=port, announce_file=announce
        )
    )
