"""The metadata store: the one authoritative record of tables, tablets and their files.

SYSTEM.md 4 asks for a single store behind SQLite (a file beside the data, the default) and
PostgreSQL (several hosts), with the same code and the same tests for both. Everything here is
SQLAlchemy Core; the only dialect-specific pieces are connection set-up, the upsert construct, the
database clock and a lock that serialises schema creation. The hot path (read a tablet, compare
and set it) uses Core statements compiled once per store for its dialect (`_prepare`, `_run`).

Concurrency model
-----------------
* Every change to a tablet row is a compare-and-set on its `version` column, done by a single
  `UPDATE ... WHERE version = :read_version` (or `DELETE` for splits and merges) inside one
  transaction; the row count tells whether it won. Actors read, decide outside any transaction,
  then try to write: two actors that read the same version cannot both win, so no update is lost.
* SQLite: WAL mode so readers never block the writer, `busy_timeout` so that several processes
  can share the file, and `BEGIN IMMEDIATE` for write transactions so that a writer takes the
  write lock up front instead of failing half-way when it upgrades a read lock.
* PostgreSQL: READ COMMITTED for writes. A conditional `UPDATE`/`DELETE` re-checks its `WHERE`
  against the newest row version after waiting for a concurrent writer, which is exactly
  compare-and-set. Read-modify-write of non-tablet rows (properties, leases) locks the row with
  `FOR UPDATE`. Reads run in REPEATABLE READ so that a read of several statements sees one
  snapshot (the garbage collector must never see a file in neither place it moves between).
* Leases use the database's clock (not the caller's), so on PostgreSQL all hosts agree on when a
  lease expires; on SQLite all processes share one host and thus one clock anyway.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Executable,
    bindparam,
    create_engine,
    delete,
    event,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from lithify.data.ranges import Extent, FileRef
from lithify.errors import (
    ConditionalUpdateError,
    ConfigError,
    LithifyError,
    TableExistsError,
    TableNotFoundError,
)
from lithify.metadata import schema as s

log = logging.getLogger(__name__)

#: System property that chooses SQLite's `synchronous` level (NORMAL or FULL, or EXTRA). NORMAL
#: in WAL mode survives a process crash but may lose the last transactions on power loss; FULL
#: also survives power loss at a cost in commit rate (PERFORMANCE_NOTES: 25k vs 4k tx/s).
SQLITE_SYNC_PROPERTY = "metadata.sqlite.synchronous"

TABLE_STATES = ("online", "offline")

_SQLITE_SYNC_LEVELS = ("NORMAL", "FULL", "EXTRA")
_WRITE_OPTION = "lithify_write"
#: Advisory lock key that serialises schema creation on PostgreSQL ("lith" in ASCII).
_PG_SCHEMA_LOCK = 0x6C697468


#: Matches exactly one extent: the key columns plus the previous end row (NULL-safe equality).
_MATCH_EXTENT = (
    s.tablets.c.table_id == bindparam("k_table"),
    s.tablets.c.end_row == bindparam("k_end"),
    s.tablets.c.prev_end_row.is_not_distinct_from(bindparam("k_prev")),
)
#: The columns an update may change (the extent columns are the row's identity).
_TABLET_STATE_COLUMNS = (
    "files",
    "logs",
    "flushed_seq",
    "compactions",
    "selection",
    "version",
    "time",
)
_MATCH_VERSION = s.tablets.c.version == bindparam("k_version")
_SELECT_TABLET = select(s.tablets).where(*_MATCH_EXTENT)
_UPDATE_TABLET = (
    update(s.tablets)
    .where(*_MATCH_EXTENT, _MATCH_VERSION)
    .values({c: bindparam("v_" + c) for c in _TABLET_STATE_COLUMNS})
)
_DELETE_TABLET = delete(s.tablets).where(*_MATCH_EXTENT, _MATCH_VERSION)
#: The epoch check of every fenced write (the coordinator's reservations and commits).
_SELECT_EPOCH = (
    select(s.leases.c.epoch)
    .where(s.leases.c.name == bindparam("l_name"))
    .with_for_update(read=True)
)


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A statement compiled for one dialect: SQL text and, for positional drivers, the order
    of the named parameters."""

    sql: str
    positions: tuple[str, ...] | None


class LeaseLostError(ConditionalUpdateError):
    """A fenced update found that the lease has a newer epoch: its caller was deposed.

    A subclass of ConditionalUpdateError because the update did not happen, but distinct so that
    retry loops (`mutate_tablet`) stop at once instead of retrying a write that can never succeed.
    """


@dataclass(frozen=True, slots=True)
class TableInfo:
    """A table as stored: `state` is 'online' or 'offline'; properties are strings."""

    id: str
    name: str
    state: str
    properties: dict[str, str]


@dataclass(frozen=True, slots=True)
class TabletMeta:
    """One tablet's metadata as read, with the `version` that a conditional update must match.

    `files` are the tablet's data files (possibly fenced); `logs` the write-ahead logs that hold
    entries newer than `flushed_seq`; `compactions` the running compaction records by compaction
    id (a record's `tmp_path`, and `output_path` once renamed, keep its file from the garbage
    collector); `selection` the files chosen for a user compaction, if one is pending; `time` the
    latest timestamp the tablet handed out or observed as of its last flush (its clock starts
    there after a restart). Treat the dicts as immutable and derive changed copies with
    `replace`.
    """

    extent: Extent
    files: tuple[FileRef, ...] = ()
    logs: tuple[str, ...] = ()
    flushed_seq: int = 0
    compactions: Mapping[str, dict] = field(default_factory=dict)
    selection: dict | None = None
    version: int = 0
    time: int = 0

    def __post_init__(self) -> None:
        # Accept lists from callers but keep the tuples the type promises (frozen: bypass setattr).
        if not isinstance(self.files, tuple):
            object.__setattr__(self, "files", tuple(self.files))
        if not isinstance(self.logs, tuple):
            object.__setattr__(self, "logs", tuple(self.logs))

    def replace(self, **changes: Any) -> TabletMeta:
        """A copy with `changes` applied (dataclasses.replace); the version is kept, so the copy
        can be passed as `new` to `update_tablet` with the original as `old`."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class TabletOutcome:
    """What one item of `mutate_tablets` came to.

    `meta` is the stored tablet when the item's change was written, None when nothing was
    (the tablet does not exist, or its function wanted no change); `error` is what the item's
    function raised, or the ConditionalUpdateError of an item that kept losing. A batch reports
    per item instead of raising, so that one stale item does not fail the others.
    """

    meta: TabletMeta | None = None
    error: Exception | None = None

    def result(self) -> TabletMeta | None:
        """`meta`, or raise `error` (what `mutate_tablet` does for its single item)."""
        if self.error is not None:
            raise self.error
        return self.meta


#: The outcome of an item that wrote nothing and failed in nothing.
_UNCHANGED = TabletOutcome()


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A lease as read: `holder` is None when nobody holds it now; `remaining_s` may be < 0."""

    name: str
    holder: str | None
    epoch: int
    remaining_s: float


@dataclass(frozen=True, slots=True)
class FinalState:
    """An external compaction that finished or failed but whose result is not yet committed."""

    ecid: str
    table_id: str
    extent: Extent
    state: str
    data: dict
    created: float


class MetadataStore:
    """Tables, tablets, files, write-ahead logs, properties, final states and leases.

    Open with `MetadataStore.open(url)`; safe to share between threads (SQLAlchemy's pool gives
    each transaction its own connection) and between processes (the database serialises them).
    """

    def __init__(self, engine: Engine) -> None:
        """Use `open`; this wraps an engine already configured for the store."""
        self._engine = engine
        self._writer = engine.execution_options(**{_WRITE_OPTION: True})
        self._dialect = engine.dialect.name
        # SQLite has one writer at a time, and a writer that finds the lock taken sleeps in
        # steps of milliseconds (its busy handler) instead of being woken when it is free.
        # Writers of this process therefore queue on a lock of their own first, so they follow
        # each other back to back; other processes still meet the busy handler. Re-entrant so
        # that a write started inside another write of the same thread fails as before (busy
        # timeout) rather than hanging here for ever.
        self._write_lock: threading.RLock | None = (
            threading.RLock() if self._dialect == "sqlite" else None
        )
        # Reads that take several statements (referenced_files above all) need one snapshot: on
        # PostgreSQL that is REPEATABLE READ (read-only, so it never fails to serialise); SQLite's
        # deferred BEGIN in WAL mode already reads one snapshot.
        self._reader = (
            engine.execution_options(isolation_level="REPEATABLE READ")
            if self._dialect == "postgresql"
            else engine
        )
        self._select_tablet = self._prepare(_SELECT_TABLET)
        self._update_tablet = self._prepare(_UPDATE_TABLET)
        self._delete_tablet = self._prepare(_DELETE_TABLET)
        self._select_epoch = self._prepare(_SELECT_EPOCH)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open_in(cls, directory: str | os.PathLike, url: str | None = None) -> MetadataStore:
        """The metadata store of the store or instance in `directory`: the one at `url` when
        given, else the SQLite file `metadata.db` inside the directory."""
        return cls.open(url or f"sqlite:///{Path(directory).resolve() / 'metadata.db'}")

    @classmethod
    def open(
        cls,
        url: str,
        *,
        synchronous: str | None = None,
        busy_timeout_s: float = 30.0,
    ) -> MetadataStore:
        """Open (creating the schema if missing) the store at an SQLAlchemy URL.

        `sqlite:///path/meta.db` (the parent directory is created) or
        `postgresql+psycopg://user@host/db` (the database must exist). For SQLite, `synchronous`
        overrides the system property `metadata.sqlite.synchronous` (default NORMAL); it is a
        per-connection setting, so it is given here rather than stored only in the file.
        """
        sa_url = make_url(url)
        backend = sa_url.get_backend_name()
        if backend == "sqlite":
            database = sa_url.database or ""
            if database in ("", ":memory:") or database.startswith("file::memory:"):
                raise ConfigError(
                    f"metadata URL {url!r}: an in-memory SQLite database cannot be shared "
                    "between connections; give a file path"
                )
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            sync = _check_sync(synchronous or "NORMAL", "synchronous")
            settings = {"synchronous": sync}
            engine = create_engine(sa_url, connect_args={"timeout": busy_timeout_s})
            _install_sqlite_hooks(engine, settings, busy_timeout_s)
        elif backend == "postgresql":
            engine = create_engine(sa_url, pool_pre_ping=True)
            settings = {}
        else:
            raise ConfigError(f"metadata URL {url!r}: backend {backend!r} is not supported")

        store = cls(engine)
        try:
            store._create_schema()
            if backend == "sqlite" and synchronous is None:
                wanted = store.get_system_properties().get(SQLITE_SYNC_PROPERTY)
                if wanted is not None:
                    wanted = _check_sync(wanted, SQLITE_SYNC_PROPERTY)
                    if wanted != settings["synchronous"]:
                        settings["synchronous"] = wanted
                        engine.dispose()  # pooled connections were opened with the old level
        except BaseException:
            engine.dispose()
            raise
        return store

    def close(self) -> None:
        """Close pooled connections. The store must not be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def dialect(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self._dialect

    def _create_schema(self) -> None:
        """Create missing tables and counters in one transaction, serialised between processes
        (SQLite: the write lock; PostgreSQL: an advisory lock), so two processes opening a fresh
        database at once do not trip over each other's CREATE TABLE."""
        with self._write() as conn:
            if self._dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_SCHEMA_LOCK})
            s.metadata.create_all(conn, checkfirst=True)
            for name, value in (
                (s.COUNTER_SCHEMA_VERSION, s.SCHEMA_VERSION),
                (s.COUNTER_TABLE_ID, 0),
                (s.COUNTER_LOG_GENERATION, 0),
            ):
                conn.execute(
                    self._insert(s.counters)
                    .values(name=name, value=value)
                    .on_conflict_do_nothing(index_elements=["name"])
                )
            found = conn.execute(
                select(s.counters.c.value).where(s.counters.c.name == s.COUNTER_SCHEMA_VERSION)
            ).scalar_one()
            if found < s.SCHEMA_VERSION:
                self._upgrade(conn, found)
        if found > s.SCHEMA_VERSION:
            raise LithifyError(
                f"metadata schema version {found} is newer than this lithify "
                f"(supports {s.SCHEMA_VERSION}); upgrade lithify"
            )

    def _upgrade(self, conn: Connection, found: int) -> None:
        """Bring a database of schema version `found` to this version (inside the schema
        transaction, so a crash leaves the old version whole)."""
        for version in range(found + 1, s.SCHEMA_VERSION + 1):
            for statement in s.UPGRADES.get(version, ()):
                conn.execute(text(statement))
            log.info("upgraded the metadata schema to version %d", version)
        conn.execute(
            update(s.counters)
            .where(s.counters.c.name == s.COUNTER_SCHEMA_VERSION)
            .values(value=s.SCHEMA_VERSION)
        )

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read transaction: one consistent snapshot on both backends."""
        with self._reader.begin() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction; on SQLite it starts with BEGIN IMMEDIATE (see the hooks) once
        this process's earlier writers are done (`_write_lock`)."""
        if self._write_lock is None:
            with self._writer.begin() as conn:
                yield conn
            return
        with self._write_lock, self._writer.begin() as conn:
            yield conn

    def _prepare(self, stmt: Executable) -> _Prepared:
        """Compile a statement once for this store's dialect (see `_run`)."""
        compiled = stmt.compile(dialect=self._engine.dialect)
        positions = tuple(compiled.positiontup) if compiled.positiontup else None
        return _Prepared(compiled.string, positions)

    def _run(self, conn: Connection, stmt: _Prepared, params: dict[str, Any]) -> Any:
        """Execute a prepared statement with named parameters; returns the driver's cursor,
        which the caller closes (`_fetch_one` and `_count` do).

        The tablet read and compare-and-set run on every flush, reservation and commit. Going
        straight to the DBAPI cursor of the transaction's connection skips SQLAlchemy's statement
        cache lookup and the result metadata it builds for every execution, which together cost
        more than the statement itself on SQLite (benchmarks/metadata_cas.py). Only columns whose
        types need no bind or result processing (text and integers) go through here; rows come
        back as plain tuples in the statement's column order.
        """
        args = params if stmt.positions is None else tuple(params[k] for k in stmt.positions)
        cur = conn.connection.dbapi_connection.cursor()
        try:
            cur.execute(stmt.sql, args)
        except BaseException:
            cur.close()
            raise
        return cur

    def _fetch_one(self, conn: Connection, stmt: _Prepared, params: dict[str, Any]) -> Any:
        """The first row of a prepared query (a tuple), or None."""
        cur = self._run(conn, stmt, params)
        try:
            return cur.fetchone()
        finally:
            cur.close()

    def _count(self, conn: Connection, stmt: _Prepared, params: dict[str, Any]) -> int:
        """The row count of a prepared UPDATE or DELETE (the compare-and-set's verdict)."""
        cur = self._run(conn, stmt, params)
        try:
            return cur.rowcount
        finally:
            cur.close()

    def _insert(self, table: Any) -> Any:
        """The dialect's INSERT, which has `on_conflict_do_nothing/_do_update` on both."""
        return pg_insert(table) if self._dialect == "postgresql" else sqlite_insert(table)

    def _next_counter(self, conn: Connection, name: str) -> int:
        """Increment a counter in one statement: atomic across processes on both backends."""
        return conn.execute(
            update(s.counters)
            .where(s.counters.c.name == name)
            .values(value=s.counters.c.value + 1)
            .returning(s.counters.c.value)
        ).scalar_one()

    def _db_now(self, conn: Connection) -> float:
        """The database's clock in seconds since the epoch (see the module docstring)."""
        if self._dialect == "postgresql":
            q = text("SELECT extract(epoch FROM clock_timestamp())")
        else:
            q = text("SELECT (julianday('now') - 2440587.5) * 86400.0")
        return float(conn.execute(q).scalar_one())

    def _check_fence(self, conn: Connection, fence: tuple[str, int] | None) -> None:
        """Raise LeaseLostError unless lease `fence[0]` still has epoch `fence[1]`.

        The lease row is share-locked (PostgreSQL) or the write lock is held (SQLite) until the
        transaction ends, so no new holder can take over between this check and the commit.
        """
        if fence is None:
            return
        name, epoch = fence
        row = self._fetch_one(conn, self._select_epoch, {"l_name": name})
        current = None if row is None else row[0]
        if current != epoch:
            raise LeaseLostError(
                f"lease {name!r}: epoch {epoch} was superseded (current epoch {current})"
            )

    # ------------------------------------------------------------------ tables

    def create_table(
        self,
        name: str,
        properties: Mapping[str, str] | None = None,
        splits: Iterable[bytes] = (),
    ) -> TableInfo:
        """Create an online table with one tablet per interval between the split points.

        Split points are sorted and de-duplicated; n distinct points give n + 1 tablets. The id is
        a fresh base-36 counter value, never reused, so files of a deleted table can never be
        mistaken for those of a new table with the same name.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"table name must be a non-empty string, not {name!r}")
        props = _check_properties(properties or {})
        points = _check_splits(splits)
        try:
            with self._write() as conn:
                exists = conn.execute(
                    select(s.tables.c.id).where(s.tables.c.name == name)
                ).scalar_one_or_none()
                if exists is not None:
                    raise TableExistsError(f"table {name!r} already exists (id {exists})")
                table_id = _base36(self._next_counter(conn, s.COUNTER_TABLE_ID))
                conn.execute(
                    s.tables.insert().values(
                        id=table_id,
                        name=name,
                        state="online",
                        properties=_dumps(props),
                        created=time.time(),
                    )
                )
                bounds: list[bytes | None] = [None, *points, None]
                rows = [
                    _tablet_values(TabletMeta(Extent(table_id, bounds[i], bounds[i + 1])), 1)
                    for i in range(len(bounds) - 1)
                ]
                conn.execute(s.tablets.insert(), rows)
        except IntegrityError as e:  # a concurrent create of the same name won the race
            raise TableExistsError(f"table {name!r} already exists") from e
        return TableInfo(table_id, name, "online", props)

    def get_table(self, name_or_id: str) -> TableInfo:
        """The table with this name or, failing that, this id."""
        with self._read() as conn:
            row = conn.execute(select(s.tables).where(s.tables.c.name == name_or_id)).first()
            if row is None:
                row = conn.execute(select(s.tables).where(s.tables.c.id == name_or_id)).first()
        if row is None:
            raise TableNotFoundError(f"table {name_or_id!r} does not exist")
        return _table_info(row)

    def list_tables(self) -> list[TableInfo]:
        """All tables, by name."""
        with self._read() as conn:
            rows = conn.execute(select(s.tables).order_by(s.tables.c.name)).all()
        return [_table_info(r) for r in rows]

    def set_table_state(self, table_id: str, state: str) -> TableInfo:
        """Take a table online or offline."""
        if state not in TABLE_STATES:
            raise ValueError(f"table state must be one of {TABLE_STATES}, not {state!r}")
        with self._write() as conn:
            row = conn.execute(
                update(s.tables)
                .where(s.tables.c.id == table_id)
                .values(state=state)
                .returning(*s.tables.c)
            ).first()
        if row is None:
            raise TableNotFoundError(f"table id {table_id!r} does not exist")
        return _table_info(row)

    def set_table_properties(self, table_id: str, changes: Mapping[str, str | None]) -> TableInfo:
        """Set (a string) or unset (None) table properties; the row is locked while merging so
        concurrent changes to different properties are all kept."""
        checked = _check_changes(changes)
        with self._write() as conn:
            row = conn.execute(
                select(s.tables).where(s.tables.c.id == table_id).with_for_update()
            ).first()
            if row is None:
                raise TableNotFoundError(f"table id {table_id!r} does not exist")
            props = json.loads(row.properties)
            _apply_changes(props, checked)
            conn.execute(
                update(s.tables).where(s.tables.c.id == table_id).values(properties=_dumps(props))
            )
        return TableInfo(row.id, row.name, row.state, props)

    def delete_table(self, table_id: str) -> None:
        """Remove the table and all its tablets in one transaction; their files become garbage
        (referenced_files no longer lists them)."""
        with self._write() as conn:
            conn.execute(delete(s.tablets).where(s.tablets.c.table_id == table_id))
            gone = conn.execute(delete(s.tables).where(s.tables.c.id == table_id)).rowcount
            if gone != 1:
                raise TableNotFoundError(f"table id {table_id!r} does not exist")

    # ------------------------------------------------------------------ system properties

    def get_system_properties(self) -> dict[str, str]:
        """All system properties that are set (defaults live in lithify.table.properties)."""
        with self._read() as conn:
            rows = conn.execute(select(s.system_properties)).all()
        return {r.name: r.value for r in rows}

    def set_system_properties(self, changes: Mapping[str, str | None]) -> None:
        """Set (a string) or unset (None) system properties in one transaction."""
        checked = _check_changes(changes)
        sp = s.system_properties
        with self._write() as conn:
            for name, value in checked.items():
                if value is None:
                    conn.execute(delete(sp).where(sp.c.name == name))
                else:
                    conn.execute(
                        self._insert(sp)
                        .values(name=name, value=value)
                        .on_conflict_do_update(index_elements=["name"], set_={"value": value})
                    )

    # ------------------------------------------------------------------ tablets

    def tablets(self, table_id: str) -> list[TabletMeta]:
        """The table's tablets in row order (the tablet with the unbounded end row last)."""
        with self._read() as conn:
            known = conn.execute(
                select(s.tables.c.id).where(s.tables.c.id == table_id)
            ).scalar_one_or_none()
            if known is None:
                raise TableNotFoundError(f"table id {table_id!r} does not exist")
            rows = conn.execute(select(s.tablets).where(s.tablets.c.table_id == table_id)).all()
        metas = [_tablet_meta(r) for r in rows]
        metas.sort(key=lambda m: _end_key(m.extent))
        return metas

    def get_tablet(self, extent: Extent) -> TabletMeta | None:
        """The tablet with exactly this extent, or None (split, merged, or its table deleted)."""
        return self.get_tablets((extent,))[0]

    def get_tablets(self, extents: Sequence[Extent]) -> list[TabletMeta | None]:
        """The tablets with exactly these extents (None for each that does not exist), read in
        one snapshot, so that a batch of conditional updates costs one read transaction."""
        if not extents:
            return []
        with self._read() as conn:
            rows = [self._fetch_one(conn, self._select_tablet, _key_params(e)) for e in extents]
        return [None if row is None else _tablet_meta(row) for row in rows]

    def update_tablet(
        self,
        old: TabletMeta,
        new: TabletMeta,
        *,
        fence: tuple[str, int] | None = None,
    ) -> TabletMeta:
        """Write `new` if the stored tablet still has `old.version`; return it with version + 1.

        Raises ConditionalUpdateError if the tablet changed (or is gone) since `old` was read,
        and LeaseLostError if `fence=(lease name, epoch)` is given and that epoch was superseded.
        The extent cannot change here: splits and merges use `replace_tablets`.
        """
        _check_same_extent(old, new)
        with self._write() as conn:
            self._check_fence(conn, fence)
            (version,) = self._update_rows(conn, ((old, new),))
            if version is None:
                found = self._fetch_one(conn, self._select_tablet, _key_params(old.extent))
                what = "no longer exists" if found is None else f"is at version {found[-1]}"
                raise ConditionalUpdateError(
                    f"tablet {old.extent} changed: read at version {old.version}, now {what}"
                )
        return new.replace(version=version)

    def update_tablets(
        self,
        changes: Sequence[tuple[TabletMeta, TabletMeta]],
        *,
        fence: tuple[str, int] | None = None,
    ) -> list[TabletMeta | None]:
        """Several `update_tablet`s, each `(old, new)`, in ONE transaction (group commit).

        Each change is its own compare-and-set on `old.version`: the result holds the stored
        tablet (version + 1) for each change that won and None for each whose tablet changed
        or is gone, in the order given; a loser does not stop the others. One commit for the
        lot is what makes a batch cheap (SQLite pays per transaction, PostgreSQL per round
        trip of the commit). The fence is checked once for all of them and raises
        LeaseLostError before anything is written. Two changes of the same tablet in one call
        chain like two calls would: the second wins only if its `old` is the first's result.
        """
        for old, new in changes:
            _check_same_extent(old, new)
        if not changes:
            return []
        with self._write() as conn:
            self._check_fence(conn, fence)
            versions = self._update_rows(conn, changes)
        return [
            None if v is None else new.replace(version=v)
            for (_, new), v in zip(changes, versions, strict=True)
        ]

    def _update_rows(
        self, conn: Connection, changes: Sequence[tuple[TabletMeta, TabletMeta]]
    ) -> list[int | None]:
        """The compare-and-set statements of `update_tablet(s)` inside the caller's transaction:
        the new version of each change, or None where the row count says it lost.

        Rows are written in row-key order, whatever the order given, so that two transactions
        of several updates lock PostgreSQL rows in the same order and cannot deadlock (SQLite
        has a single writer anyway).
        """
        versions: list[int | None] = [None] * len(changes)
        order = sorted(range(len(changes)), key=lambda i: _row_key(changes[i][0].extent))
        for i in order:
            old, new = changes[i]
            version = old.version + 1
            params = _key_params(old.extent, old.version)
            values = _tablet_values(new, version)
            params.update(("v_" + k, values[k]) for k in _TABLET_STATE_COLUMNS)
            if self._count(conn, self._update_tablet, params) == 1:
                versions[i] = version
        return versions

    def mutate_tablet(
        self,
        extent: Extent,
        fn: Callable[[TabletMeta], TabletMeta | None],
        *,
        max_attempts: int = 50,
        fence: tuple[str, int] | None = None,
    ) -> TabletMeta | None:
        """Read the tablet, apply `fn`, write conditionally; on a conflict re-read and retry.

        `fn` runs outside any transaction (it may be slow or run more than once, so it must be a
        pure function of its argument). Returns the stored result, or None when the tablet does
        not exist (fn is then not called) or when `fn` returned None (no change wanted). After
        `max_attempts` conflicts it raises ConditionalUpdateError; a lost lease is not retried;
        what `fn` raises is raised here.
        """
        outcome = self.mutate_tablets([(extent, fn)], max_attempts=max_attempts, fence=fence)
        return outcome[0].result()

    def mutate_tablets(
        self,
        items: Sequence[tuple[Extent, Callable[[TabletMeta], TabletMeta | None]]],
        *,
        max_attempts: int = 50,
        fence: tuple[str, int] | None = None,
        backoff: bool = True,
    ) -> list[TabletOutcome]:
        """`mutate_tablet` for several tablets at once: one read and one write transaction per
        round (`get_tablets`, `update_tablets`) instead of one pair per tablet.

        Every item succeeds or fails on its own; the outcomes come back in the order given.
        What an item's `fn` raises becomes that item's outcome (the others go on), as does
        ConditionalUpdateError once it lost `max_attempts` times; only the losers of a round
        are re-read and retried, after a short jittered pause when `backoff` is set (a caller
        whose only competitor is an occasional other writer may retry at once). LeaseLostError
        (the fence) and database errors raise for the whole call: nothing of the round that
        raised was written, but earlier rounds' winners were.
        """
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        outcomes: list[TabletOutcome] = [_UNCHANGED] * len(items)
        pending = list(range(len(items)))
        read_at: dict[int, int] = {}
        for attempt in range(max_attempts):
            currents = self.get_tablets([items[i][0] for i in pending])
            writes: list[tuple[int, TabletMeta, TabletMeta]] = []
            for i, current in zip(pending, currents, strict=True):
                if current is None:
                    continue  # gone: nothing to do (an _UNCHANGED outcome)
                try:
                    wanted = items[i][1](current)
                    if wanted is not None:
                        _check_same_extent(current, wanted)
                except Exception as e:  # noqa: BLE001 - the item's own outcome
                    outcomes[i] = TabletOutcome(error=e)
                    continue
                if wanted is not None:
                    writes.append((i, current, wanted))
            stored = self.update_tablets([(old, new) for _, old, new in writes], fence=fence)
            pending = []
            for (i, old, _), meta in zip(writes, stored, strict=True):
                if meta is None:
                    pending.append(i)
                    read_at[i] = old.version
                else:
                    outcomes[i] = TabletOutcome(meta)
            if not pending:
                return outcomes
            if backoff and attempt + 1 < max_attempts:
                # Jittered, capped backoff so that contending actors stop colliding in lockstep.
                time.sleep(random.uniform(0, min(0.05, 0.0005 * 2**attempt)))
        for i in pending:
            outcomes[i] = TabletOutcome(
                error=ConditionalUpdateError(
                    f"tablet {items[i][0]}: gave up after {max_attempts} conflicting updates "
                    f"(last read at version {read_at[i]})"
                )
            )
        return outcomes

    def replace_tablets(
        self,
        table_id: str,
        old: Sequence[TabletMeta],
        new: Sequence[TabletMeta],
    ) -> list[TabletMeta]:
        """Atomically replace contiguous tablets by others covering exactly the same rows.

        For split (one old, several new) and merge (several old, one new). Conditional on every
        old tablet's version. The new tablets get version max(old versions) + 1, greater than any
        they replace, so a stale reader of a replaced tablet with the same end row cannot match.
        Returns the new tablets in row order.
        """
        old_sorted = _check_cover(table_id, old, "old")
        new_sorted = _check_cover(table_id, new, "new")
        if (old_sorted[0].extent.prev_end_row, old_sorted[-1].extent.end_row) != (
            new_sorted[0].extent.prev_end_row,
            new_sorted[-1].extent.end_row,
        ):
            raise ValueError(
                f"new tablets ({_span(new_sorted)}) do not cover exactly the rows of the old "
                f"tablets ({_span(old_sorted)})"
            )
        version = max(m.version for m in old_sorted) + 1
        # Delete in row order so concurrent replacements lock rows in the same order (no
        # deadlock on PostgreSQL).
        with self._write() as conn:
            for m in old_sorted:
                params = _key_params(m.extent, m.version)
                count = self._count(conn, self._delete_tablet, params)
                if count != 1:
                    raise ConditionalUpdateError(
                        f"tablet {m.extent} changed since version {m.version} was read"
                    )
            conn.execute(s.tablets.insert(), [_tablet_values(m, version) for m in new_sorted])
        return [m.replace(version=version) for m in new_sorted]

    # ------------------------------------------------------------------ write-ahead logs

    def next_log_generation(self) -> int:
        """A generation number greater than any handed out before, by any process, ever."""
        with self._write() as conn:
            return self._next_counter(conn, s.COUNTER_LOG_GENERATION)

    def add_log(self, path: str, generation: int) -> None:
        """Record a write-ahead log (idempotent: re-adding updates its generation)."""
        with self._write() as conn:
            conn.execute(
                self._insert(s.logs)
                .values(path=path, generation=generation, created=time.time())
                .on_conflict_do_update(index_elements=["path"], set_={"generation": generation})
            )

    def remove_log(self, path: str) -> None:
        """Forget a write-ahead log (idempotent)."""
        with self._write() as conn:
            conn.execute(delete(s.logs).where(s.logs.c.path == path))

    def list_logs(self) -> list[tuple[str, int]]:
        """(path, generation) of every recorded log, oldest generation first."""
        with self._read() as conn:
            rows = conn.execute(
                select(s.logs.c.path, s.logs.c.generation).order_by(
                    s.logs.c.generation, s.logs.c.path
                )
            ).all()
        return [(r.path, r.generation) for r in rows]

    # ------------------------------------------------------------------ files

    def referenced_files(self) -> set[str]:
        """Every data file path that must not be garbage collected, read in one snapshot.

        That is every tablet's files, plus `tmp_path` and `output_path` of running compaction
        records and of final states (a compaction's output between rename and commit).
        """
        paths: set[str] = set()
        with self._read() as conn:
            for row in conn.execute(select(s.tablets.c.files, s.tablets.c.compactions)):
                paths.update(f["path"] for f in json.loads(row.files))
                for record in json.loads(row.compactions).values():
                    paths.update(_record_paths(record))
            for row in conn.execute(select(s.final_states.c.json)):
                paths.update(_record_paths(json.loads(row.json)))
        return paths

    # ------------------------------------------------------------------ external compactions

    def put_final_state(
        self,
        ecid: str,
        table_id: str,
        extent: Extent,
        state: str,
        data: Mapping[str, Any],
        *,
        fence: tuple[str, int] | None = None,
    ) -> None:
        """Record (or overwrite: a repeated report after a crash is harmless) a final state."""
        if extent.table_id != table_id:
            raise ValueError(f"extent {extent} is not in table {table_id!r}")
        values = {
            "table_id": table_id,
            "extent": _dumps(_extent_json(extent)),
            "state": state,
            "json": _dumps(dict(data)),
        }
        with self._write() as conn:
            self._check_fence(conn, fence)
            conn.execute(
                self._insert(s.final_states)
                .values(ecid=ecid, created=time.time(), **values)
                .on_conflict_do_update(index_elements=["ecid"], set_=values)
            )

    def final_states(self) -> list[FinalState]:
        """All recorded final states, oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                select(s.final_states).order_by(s.final_states.c.created, s.final_states.c.ecid)
            ).all()
        return [
            FinalState(
                r.ecid,
                r.table_id,
                _extent_from_json(json.loads(r.extent)),
                r.state,
                json.loads(r.json),
                r.created,
            )
            for r in rows
        ]

    def delete_final_state(self, ecid: str, *, fence: tuple[str, int] | None = None) -> None:
        """Forget a final state once its result is committed or cleaned up (idempotent)."""
        with self._write() as conn:
            self._check_fence(conn, fence)
            conn.execute(delete(s.final_states).where(s.final_states.c.ecid == ecid))

    # ------------------------------------------------------------------ leases

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        """Take or renew lease `name` for `ttl_s` seconds of database time.

        Returns the epoch when `holder` now holds the lease, None when another holder's lease has
        not expired. The epoch increases by one whenever the holder changes (including after a
        release) and when a holder takes back its own expired lease, never on renewal; pass it
        as `fence=(name, epoch)` to make writes conditional on still being the holder. (A holder
        whose lease lapsed may have stopped serving meanwhile; its new tenure gets a new epoch
        so that writes still in flight from the old one are fenced out.)
        """
        if not holder:
            raise ValueError("lease holder must be a non-empty string")
        if not ttl_s > 0:
            raise ValueError(f"lease ttl must be positive, not {ttl_s}")
        lt = s.leases
        with self._write() as conn:
            conn.execute(
                self._insert(lt)
                .values(name=name, holder=None, epoch=0, expires_at=0.0)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            row = conn.execute(select(lt).where(lt.c.name == name).with_for_update()).one()
            now = self._db_now(conn)
            if row.holder == holder and row.expires_at > now:
                epoch = row.epoch
            elif row.holder is None or row.expires_at <= now:
                epoch = row.epoch + 1
            else:
                return None
            conn.execute(
                update(lt)
                .where(lt.c.name == name)
                .values(holder=holder, epoch=epoch, expires_at=now + ttl_s)
            )
        return epoch

    def release_lease(self, name: str, holder: str) -> bool:
        """Give up the lease if `holder` holds it (so a stand-by can take over at once)."""
        lt = s.leases
        with self._write() as conn:
            count = conn.execute(
                update(lt)
                .where(lt.c.name == name, lt.c.holder == holder)
                .values(holder=None, expires_at=0.0)
            ).rowcount
        return count == 1

    def lease_info(self, name: str) -> LeaseInfo | None:
        """Who holds lease `name` (None if it was never taken); processes find servers this way."""
        lt = s.leases
        with self._read() as conn:
            row = conn.execute(select(lt).where(lt.c.name == name)).one_or_none()
            if row is None:
                return None
            now = self._db_now(conn)
        live = row.holder is not None and row.expires_at > now
        return LeaseInfo(name, row.holder if live else None, row.epoch, row.expires_at - now)

    def check_epoch(self, name: str, epoch: int) -> bool:
        """Whether `epoch` is still the lease's newest epoch (nobody took over since).

        Only a snapshot: for a write that must not happen after a takeover, pass `fence`.
        """
        with self._read() as conn:
            current = conn.execute(
                select(s.leases.c.epoch).where(s.leases.c.name == name)
            ).scalar_one_or_none()
        return current == epoch


# ---------------------------------------------------------------------- SQLite set-up


def _install_sqlite_hooks(engine: Engine, settings: dict[str, str], busy_timeout_s: float) -> None:
    """Per-connection pragmas and explicit BEGIN statements.

    pysqlite's own transaction handling is switched off (isolation_level None) so that the store
    decides how a transaction begins: BEGIN IMMEDIATE for writes, a plain (deferred) BEGIN for
    reads, which in WAL mode gives a consistent snapshot without blocking the writer.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute(f"PRAGMA synchronous = {settings['synchronous']}")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(_WRITE_OPTION, False)
        # Straight to the driver: BEGIN needs no parameters, result or statement cache, and
        # going through SQLAlchemy's execution machinery here costs a quarter of a small
        # transaction. pysqlite's commit() and rollback() then end it as usual.
        conn.connection.dbapi_connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")


def _check_sync(value: str, what: str) -> str:
    level = value.strip().upper()
    if level not in _SQLITE_SYNC_LEVELS:
        raise ConfigError(f"{what} must be one of {_SQLITE_SYNC_LEVELS}, not {value!r}")
    return level


# ---------------------------------------------------------------------- encoding helpers


def _dumps(value: Any) -> str:
    """Compact, deterministic JSON (stable text makes stored rows easy to diff)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _enc_end(end_row: bytes | None) -> str:
    return s.LAST_END_ROW if end_row is None else end_row.hex()


def _dec_end(value: str) -> bytes | None:
    return None if value == s.LAST_END_ROW else bytes.fromhex(value)


def _end_key(extent: Extent) -> tuple[bool, bytes]:
    """Row-order sort key: by end row, the unbounded end last."""
    return (extent.end_row is None, extent.end_row or b"")


def _key_params(extent: Extent, version: int | None = None) -> dict[str, Any]:
    """Parameters of `_MATCH_EXTENT` (and of the version check when `version` is given)."""
    params: dict[str, Any] = {
        "k_table": extent.table_id,
        "k_end": _enc_end(extent.end_row),
        "k_prev": None if extent.prev_end_row is None else extent.prev_end_row.hex(),
    }
    if version is not None:
        params["k_version"] = version
    return params


def _extent_json(extent: Extent) -> list:
    def h(b: bytes | None) -> str | None:
        return None if b is None else b.hex()

    return [extent.table_id, h(extent.prev_end_row), h(extent.end_row)]


def _extent_from_json(v: list) -> Extent:
    def u(x: str | None) -> bytes | None:
        return None if x is None else bytes.fromhex(x)

    return Extent(v[0], u(v[1]), u(v[2]))


def _tablet_values(meta: TabletMeta, version: int) -> dict[str, Any]:
    e = meta.extent
    return {
        "table_id": e.table_id,
        "end_row": _enc_end(e.end_row),
        "prev_end_row": None if e.prev_end_row is None else e.prev_end_row.hex(),
        "files": _dumps([f.to_json() for f in meta.files]),
        "logs": _dumps(list(meta.logs)),
        "flushed_seq": int(meta.flushed_seq),
        "compactions": _dumps({str(k): v for k, v in meta.compactions.items()}),
        "selection": None if meta.selection is None else _dumps(meta.selection),
        "version": version,
        "time": int(meta.time),
    }


def _tablet_meta(row: Sequence[Any]) -> TabletMeta:
    """A tablet from a row of `select(s.tablets)` (a SQLAlchemy Row or a driver tuple), by
    position: the columns in the order of `schema.tablets`."""
    (
        table_id,
        end_row,
        prev_end_row,
        files,
        logs,
        flushed_seq,
        compactions,
        selection,
        version,
        tablet_time,
    ) = row
    prev = None if prev_end_row is None else bytes.fromhex(prev_end_row)
    return TabletMeta(
        extent=Extent(table_id, prev, _dec_end(end_row)),
        files=tuple(FileRef.from_json(f) for f in json.loads(files)),
        logs=tuple(json.loads(logs)),
        flushed_seq=flushed_seq,
        compactions=json.loads(compactions),
        selection=None if selection is None else json.loads(selection),
        version=version,
        time=tablet_time,
    )


def _check_same_extent(old: TabletMeta, new: TabletMeta) -> None:
    """An update keeps the row's identity; splits and merges go through `replace_tablets`."""
    if new.extent != old.extent:
        raise ValueError(
            f"update_tablet cannot change the extent ({old.extent} -> {new.extent}); "
            "use replace_tablets"
        )


def _row_key(extent: Extent) -> tuple[str, tuple[bool, bytes], bytes]:
    """A total order of tablet rows (table, end row, then previous end row) for lock order."""
    return (extent.table_id, _end_key(extent), extent.prev_end_row or b"")


def _table_info(row: Any) -> TableInfo:
    return TableInfo(row.id, row.name, row.state, json.loads(row.properties))


def _record_paths(record: Any) -> list[str]:
    if not isinstance(record, Mapping):
        return []
    return [record[k] for k in ("tmp_path", "output_path") if isinstance(record.get(k), str)]


# ---------------------------------------------------------------------- validation


def _check_properties(props: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in props.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"property {k!r}: names and values must be strings, not {v!r}")
        out[k] = v
    return out


def _check_changes(changes: Mapping[str, str | None]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for k, v in changes.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, str)):
            raise TypeError(f"property {k!r}: value must be a string or None, not {v!r}")
        out[k] = v
    return out


def _apply_changes(props: dict[str, str], changes: Mapping[str, str | None]) -> None:
    for k, v in changes.items():
        if v is None:
            props.pop(k, None)
        else:
            props[k] = v


def _check_splits(splits: Iterable[bytes]) -> list[bytes]:
    points = set()
    for p in splits:
        if not isinstance(p, bytes | bytearray) or not p:
            raise ValueError(f"split points must be non-empty bytes, not {p!r}")
        points.add(bytes(p))
    return sorted(points)


def _span(metas: Sequence[TabletMeta]) -> str:
    def show(b: bytes | None) -> str:
        return "-inf/+inf" if b is None else repr(b)

    return f"({show(metas[0].extent.prev_end_row)}, {show(metas[-1].extent.end_row)}]"


def _check_cover(table_id: str, metas: Sequence[TabletMeta], what: str) -> list[TabletMeta]:
    """Sort tablets by row and check that they are non-empty and contiguous (no gap, no
    overlap), all in `table_id`; raise ValueError naming the offending tablet otherwise."""
    if not metas:
        raise ValueError(f"replace_tablets: no {what} tablets")
    for m in metas:
        e = m.extent
        if e.table_id != table_id:
            raise ValueError(f"{what} tablet {e} is not in table {table_id!r}")
        if e.prev_end_row is not None and e.end_row is not None and e.prev_end_row >= e.end_row:
            raise ValueError(f"{what} tablet {e} is empty")
    ordered = sorted(metas, key=lambda m: _end_key(m.extent))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.extent.end_row is None or b.extent.prev_end_row != a.extent.end_row:
            raise ValueError(
                f"{what} tablets are not contiguous: {a.extent} is followed by {b.extent}"
            )
    return ordered
