"""The `lithify` command: one entry point with a subcommand per job.

Store commands take `--store DIR` (default `./lithify-data`, the embedded default: SQLite
metadata and a local data directory) and `--metadata-url URL` to use PostgreSQL instead.
"""

from __future__ import annotations

import logging
import sys

import click

from lithify.errors import LithifyError

STORE_OPTION = click.option(
    "--store",
    "store_dir",
    default="lithify-data",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory of the embedded store (created if missing).",
)
METADATA_OPTION = click.option(
    "--metadata-url",
    default=None,
    envvar="LITHIFY_METADATA_URL",
    help="SQLAlchemy URL of the metadata store (default: SQLite file inside the store).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """lithify: a sorted key-value tablet store whose compactions can run anywhere."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from lithify.cli import (
        ci,
        cluster,
        compactor,
        coordinator,
        demo,
        fileinfo,
        shell,
        status,
        tserver,
    )

    cli.add_command(demo.demo)
    cli.add_command(ci.ci)
    cli.add_command(status.status)
    cli.add_command(coordinator.compaction_coordinator)
    cli.add_command(tserver.tserver)
    cli.add_command(compactor.compactor)
    cli.add_command(cluster.cluster)
    cli.add_command(fileinfo.fileinfo)
    for cmd in shell.COMMANDS:
        cli.add_command(cmd)


def main() -> None:
    _register()
    try:
        cli(standalone_mode=True)
    except LithifyError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
