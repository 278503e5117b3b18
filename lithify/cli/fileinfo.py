"""`lithify fileinfo`: what sorted files hold, read from their footers, and optionally checked.

An operator's tool (Accumulo has `rfile-info`): which keys a file covers, how many entries and row
groups it has, how it is compressed, whether its row groups lie in key order on disk (files of
parallel subcompactions interleave them), and with `--verify` a whole read that checks every
page checksum, the schema, nulls and key order.
"""

from __future__ import annotations

import os
import statistics

import click

from lithify.cli.shell import show_bytes
from lithify.data.key import Key
from lithify.errors import CorruptFileError
from lithify.files.reader import SortedFileReader
from lithify.files.storage import Storage
from lithify.files.verify import FileCheckError, verify_entries


def show_key(key: Key | None) -> str:
    if key is None:
        return "-"
    kind = " delete" if key.deleted else ""
    vis = f" [{show_bytes(key.visibility)}]" if key.visibility else ""
    return (
        f"{show_bytes(key.row)} {show_bytes(key.family)}:{show_bytes(key.qualifier)}{vis} "
        f"@{key.timestamp}{kind}"
    )


def describe(reader: SortedFileReader) -> list[tuple[str, str]]:
    """(label, value) lines of what the footer says about the file."""
    md = reader.metadata
    sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    starts = [md.row_group(i).column(0).data_page_offset for i in range(md.num_row_groups)]
    codecs = sorted(
        {md.row_group(0).column(c).compression.lower() for c in range(md.num_columns)}
        if md.num_row_groups
        else set()
    )
    groups = f"{len(sizes)}"
    if sizes:
        groups += (
            f" (entries min {min(sizes):,}, median {int(statistics.median(sizes)):,}, "
            f"max {max(sizes):,}); on disk "
            + ("in key order" if starts == sorted(starts) else "interleaved (parallel parts)")
        )
    return [
        ("size", f"{reader.size:,} bytes"),
        ("entries", f"{reader.entries:,}"),
        ("format", str(reader.format_version) if reader.format_version else "not lithify's"),
        ("first key", show_key(reader.first_key)),
        ("last key", show_key(reader.last_key)),
        ("row groups", groups),
        ("codec", ", ".join(codecs) or "-"),
    ]


@click.command("fileinfo")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--verify",
    is_flag=True,
    help="Also read every entry: page checksums, schema, nulls and key order (reads it all).",
)
def fileinfo(paths: tuple[str, ...], verify: bool) -> None:
    """Print what the sorted files at PATHS (local files) hold, from their footers.

    Exits with status 1 when a file cannot be read or, with --verify, is not a valid sorted
    file; the message names the file and what is wrong.
    """
    failed = 0
    for path in paths:
        storage = Storage(os.path.dirname(os.path.abspath(path)))
        name = os.path.basename(path)
        click.echo(path)
        try:
            with SortedFileReader.open(storage, name) as reader:
                for label, value in describe(reader):
                    click.echo(f"  {label:<11} {value}")
                if verify:
                    info = verify_entries(reader)
                    click.echo(f"  {'verified':<11} {info.entries:,} entries read: OK")
        except (CorruptFileError, FileCheckError) as e:
            failed += 1
            click.echo(f"  error: {path}: {e}", err=True)
    if failed:
        raise SystemExit(1)
