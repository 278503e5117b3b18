"""`lithify tserver`: run the tablet server of an instance."""

from __future__ import annotations

import sys

import click

from lithify.cli.main import METADATA_OPTION


@click.command("tserver")
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False),
    help="Instance directory (created if missing).",
)
@METADATA_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=0, show_default=True, help="Port to listen on (0: any free one).")
@click.option(
    "--gc-interval",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds between garbage collection passes (0: only on request, POST /v1/gc).",
)
@click.option("--announce", default=None, hidden=True, help="Write {url, pid} here once serving.")
def tserver(
    directory: str,
    metadata_url: str | None,
    host: str,
    port: int,
    gc_interval: float,
    announce: str | None,
) -> None:
    """Host every tablet of the instance and serve it over HTTP.

    The URL is published in the `tserver` lease of the metadata store, where clients
    (`lithify.connect(DIR)`) and the compaction coordinator find it. The instance secret is
    made when the instance has none. SIGTERM stops it cleanly.
    """
    from lithify.server.tserver import run_tserver

    sys.exit(
        run_tserver(
            directory,
            metadata_url=metadata_url,
            host=host,
            port=port,
            announce_file=announce,
            gc_interval_s=gc_interval,
        )
    )
