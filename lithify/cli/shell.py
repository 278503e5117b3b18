"""Accumulo-shell-like commands on an embedded store: tables, config, insert, scan, compact."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

import lithify
from lithify.cli.main import METADATA_OPTION, STORE_OPTION
from lithify.data.mutation import Mutation
from lithify.errors import LithifyError
from lithify.metadata.store import MetadataStore
from lithify.store import write_system_property


def with_store(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Open the store of --store/--metadata-url around a command; errors exit with status 1."""

    @STORE_OPTION
    @METADATA_OPTION
    @functools.wraps(fn)
    def wrapper(store_dir: str, metadata_url: str | None, **kw: Any) -> Any:
        try:
            with lithify.open(store_dir, metadata_url=metadata_url) as store:
                return fn(store, **kw)
        except LithifyError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


@click.command("createtable")
@click.argument("table")
@click.option("--split", "splits", multiple=True, help="A split point (repeatable).")
@with_store
def createtable(store: lithify.Store, table: str, splits: tuple[str, ...]) -> None:
    """Create TABLE, optionally pre-split."""
    info = store.create_table(table, splits=splits)
    click.echo(f"created table {info.name} (id {info.id}) with {len(splits) + 1} tablet(s)")


@click.command("deletetable")
@click.argument("table")
@with_store
def deletetable(store: lithify.Store, table: str) -> None:
    """Delete TABLE (its files are removed by the garbage collector)."""
    store.delete_table(table)
    click.echo(f"deleted table {table}")


@click.command("tables")
@with_store
def tables(store: lithify.Store) -> None:
    """List tables with their state and tablets."""
    for t in store.list_tables():
        n = len(store.meta.tablets(t.id))
        click.echo(f"{t.name}\tid={t.id}\t{t.state}\ttablets={n}")


@click.command("config")
@click.option("-t", "--table", default=None, help="Table whose properties to show or change.")
@click.option("-s", "--set", "setting", default=None, metavar="NAME=VALUE", help="Set a property.")
@click.option("-d", "--delete", "unset", default=None, metavar="NAME", help="Unset a property.")
@click.option(
    "--offline",
    is_flag=True,
    help="System properties only: read and write them in the metadata store without opening "
    "the store, for a store that cannot open (e.g. set tserver.wal.recovery=point-in-time "
    "after its log is reported corrupt). Takes effect when the store next opens.",
)
@STORE_OPTION
@METADATA_OPTION
def config(
    store_dir: str,
    metadata_url: str | None,
    table: str | None,
    setting: str | None,
    unset: str | None,
    offline: bool,
) -> None:
    """Show or change table properties (-t) or system properties (no -t)."""
    name = value = None
    if setting:
        name, sep, value = setting.partition("=")
        if not sep:
            raise click.BadParameter("expected NAME=VALUE", param_hint="--set")
        name = name.strip()
    try:
        if offline:
            if table:
                raise click.UsageError("--offline changes system properties only (no -t)")
            _config_offline(store_dir, metadata_url, name, value, unset)
            return
        with lithify.open(store_dir, metadata_url=metadata_url) as store:
            if name is not None:
                if table:
                    store.set_property(table, name, value)
                else:
                    store.set_system_property(name, value)
            if unset:
                if table:
                    store.unset_property(table, unset)
                else:
                    store.set_system_property(unset, None)
            props = store.get_properties(table) if table else dict(store.system_properties())
    except LithifyError as e:
        raise click.ClickException(str(e)) from None
    _echo_properties(props)


def _config_offline(
    store_dir: str, metadata_url: str | None, name: str | None, value: str | None, unset: str | None
) -> None:
    meta = MetadataStore.open_in(store_dir, metadata_url)
    try:
        if name is not None:
            write_system_property(meta, name, value)
        if unset:
            write_system_property(meta, unset, None)
        props = meta.get_system_properties()
    finally:
        meta.close()
    _echo_properties(props)


def _echo_properties(props: dict[str, str]) -> None:
    for k in sorted(props):
        click.echo(f"{k}={props[k]}")


@click.command("insert")
@click.argument("table")
@click.argument("row")
@click.argument("family")
@click.argument("qualifier")
@click.argument("value")
@click.option("--visibility", default="", help="Visibility label.")
@click.option("--timestamp", type=int, default=None, help="Explicit timestamp (default: server).")
@with_store
def insert(
    store: lithify.Store,
    table: str,
    row: str,
    family: str,
    qualifier: str,
    value: str,
    visibility: str,
    timestamp: int | None,
) -> None:
    """Insert one entry."""
    m = Mutation(row.encode()).put(
        family, qualifier, value, visibility=visibility, timestamp=timestamp
    )
    store.write(table, [m])


@click.command("delete")
@click.argument("table")
@click.argument("row")
@click.argument("family")
@click.argument("qualifier")
@with_store
def delete(store: lithify.Store, table: str, row: str, family: str, qualifier: str) -> None:
    """Delete one column of a row (a delete marker at the server's time)."""
    store.write(table, [Mutation(row.encode()).delete(family, qualifier)])


@click.command("scan")
@click.argument("table")
@click.option("-b", "--begin-row", default=None, help="First row (inclusive).")
@click.option("-e", "--end-row", default=None, help="Last row (inclusive).")
@click.option("-c", "--columns", default=None, help="family[:qualifier],... to keep.")
@click.option("-n", "--limit", type=int, default=None, help="Stop after this many entries.")
@click.option("--timestamps/--no-timestamps", default=False, help="Show timestamps.")
@with_store
def scan(
    store: lithify.Store,
    table: str,
    begin_row: str | None,
    end_row: str | None,
    columns: str | None,
    limit: int | None,
    timestamps: bool,
) -> None:
    """Print entries as `row family:qualifier [visibility] value`."""
    cols = None
    if columns:
        cols = [(c.partition(":")[0], c.partition(":")[2] or None) for c in columns.split(",")]
    for shown, (key, value) in enumerate(
        store.scan_entries(table, begin_row, end_row, columns=cols)
    ):
        if limit is not None and shown >= limit:
            break
        ts = f" {key.timestamp}" if timestamps else ""
        vis = f" [{key.visibility.decode(errors='replace')}]" if key.visibility else ""
        column = f"{show_bytes(key.family)}:{show_bytes(key.qualifier)}"
        click.echo(f"{show_bytes(key.row)} {column}{vis}{ts}\t{show_bytes(value)}")


def show_bytes(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


@click.command("flush")
@click.option("-t", "--table", required=True, help="Table to flush.")
@with_store
def flush(store: lithify.Store, table: str) -> None:
    """Flush a table's in-memory data to files."""
    store.flush(table)
    click.echo(f"flushed {table}")


@click.command("compact")
@click.option("-t", "--table", required=True, help="Table to compact.")
@click.option("--begin-row", default=None, help="First row of the range (inclusive).")
@click.option("--end-row", default=None, help="Last row of the range (inclusive).")
@with_store
def compact(store: lithify.Store, table: str, begin_row: str | None, end_row: str | None) -> None:
    """Compact every tablet in range into one file."""
    s = store.compact(table, begin_row, end_row)
    click.echo(
        f"compacted {s.tablets} tablet(s): {s.files_in} files, {s.entries_read} entries read, "
        f"{s.entries_written} written, {s.bytes_written} bytes"
    )


@click.command("addsplits")
@click.argument("table")
@click.argument("points", nargs=-1, required=True)
@with_store
def addsplits(store: lithify.Store, table: str, points: tuple[str, ...]) -> None:
    """Split TABLE's tablets at POINTS (metadata only)."""
    store.add_splits(table, points)


@click.command("merge")
@click.argument("table")
@click.option("--begin-row", default=None)
@click.option("--end-row", default=None)
@with_store
def merge(store: lithify.Store, table: str, begin_row: str | None, end_row: str | None) -> None:
    """Merge the tablets of TABLE overlapping the range into one (metadata only)."""
    store.merge_tablets(table, begin_row, end_row)


@click.command("gc")
@with_store
def gc(store: lithify.Store) -> None:
    """Delete files that no tablet refers to."""
    deleted = store.gc()
    click.echo(f"deleted {len(deleted)} file(s)")


@click.command("tablets")
@click.argument("table")
@with_store
def tablets(store: lithify.Store, table: str) -> None:
    """Show TABLE's tablets and their files."""
    for t in store.tablets(table):
        size = sum(f.size for f in t.files)
        click.echo(f"{t.extent}\tfiles={len(t.files)}\tbytes={size}\tmemory={t.memory_bytes}")


COMMANDS = [
    createtable,
    deletetable,
    tables,
    config,
    insert,
    delete,
    scan,
    flush,
    compact,
    addsplits,
    merge,
    gc,
    tablets,
]
