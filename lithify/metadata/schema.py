"""SQLAlchemy Core tables of the metadata store (SYSTEM.md 4).

One schema serves SQLite and PostgreSQL, so it uses only portable types: structured values
(file lists, compaction records, properties) are JSON in `Text` columns rather than a native JSON
type, and times are seconds since the epoch in `Float` columns rather than timestamps with
dialect-specific time zone rules.

Row keys are stored as lowercase hex. Hex of bytes sorts like the bytes themselves under a
byte-wise collation, but PostgreSQL databases often use a locale collation, so the store sorts
tablets in Python and never relies on the database's string order.

`SCHEMA_VERSION` is recorded in `counters` when the schema is created; a store refuses a database
written by a newer schema instead of misreading it.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

#: Bumped whenever a table or column changes meaning; see `MetadataStore.open`, which upgrades
#: older databases (`UPGRADES`). 2: `tablets.time`.
SCHEMA_VERSION = 2

#: `tablets.end_row` of the last tablet of a table (whose end row is unbounded). NULL cannot be
#: used because SQL unique constraints treat NULLs as distinct; '~' cannot occur in hex.
LAST_END_ROW = "~"

#: Names of the rows in `counters`.
COUNTER_SCHEMA_VERSION = "schema_version"
COUNTER_TABLE_ID = "table_id"
COUNTER_LOG_GENERATION = "log_generation"

metadata = MetaData()

#: Tables: `properties` is a JSON object of string to string; `state` is online or offline.
tables = Table(
    "tables",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False, unique=True),
    Column("state", String(16), nullable=False),
    Column("properties", Text, nullable=False),
    Column("created", Float, nullable=False),
)

#: Tablets, keyed by (table_id, end_row). `version` is the compare-and-set token: every update
#: of a row is conditional on it and increments it.
tablets = Table(
    "tablets",
    metadata,
    Column("table_id", String(64), nullable=False),
    Column("end_row", Text, nullable=False),  # hex, or LAST_END_ROW
    Column("prev_end_row", Text, nullable=True),  # hex, NULL = unbounded
    Column("files", Text, nullable=False),  # JSON list of FileRef.to_json()
    Column("logs", Text, nullable=False),  # JSON list of write-ahead log paths
    Column("flushed_seq", BigInteger, nullable=False),
    Column("compactions", Text, nullable=False),  # JSON object: compaction id -> record
    Column("selection", Text, nullable=True),  # JSON object, user compaction selection
    Column("version", BigInteger, nullable=False),
    # The tablet's time: no timestamp it hands out after a restart may be lower (SYSTEM.md 1).
    Column("time", BigInteger, nullable=False, server_default="0"),
    PrimaryKeyConstraint("table_id", "end_row", name="tablets_pk"),
)

#: Statements that bring a database of schema version N-1 to N, by N (both backends).
UPGRADES: dict[int, tuple[str, ...]] = {
    2: ('ALTER TABLE tablets ADD COLUMN "time" BIGINT NOT NULL DEFAULT 0',),
}

#: System-wide configuration (string to string); table properties live in `tables.properties`.
system_properties = Table(
    "system_properties",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("value", Text, nullable=False),
)

#: Write-ahead logs that exist; a log is deleted once no tablet's `logs` refers to it.
logs = Table(
    "logs",
    metadata,
    Column("path", String(1024), primary_key=True),
    Column("generation", BigInteger, nullable=False),
    Column("created", Float, nullable=False),
)

#: Monotonic counters (log generations, table ids, the schema version). Incremented with a single
#: UPDATE so that concurrent processes never hand out the same value twice.
counters = Table(
    "counters",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

#: Final states of external compactions that finished (or failed) but are not yet committed to
#: the tablet; they survive a coordinator restart (SYSTEM.md 5.5).
final_states = Table(
    "final_states",
    metadata,
    Column("ecid", String(128), primary_key=True),
    Column("table_id", String(64), nullable=False),
    Column("extent", Text, nullable=False),  # JSON [table_id, prev hex|null, end hex|null]
    Column("state", String(32), nullable=False),
    Column("json", Text, nullable=False),
    Column("created", Float, nullable=False),
    Index("final_states_table", "table_id"),
)

#: Leases for leadership (the active compaction coordinator). `epoch` increases whenever the
#: holder changes and fences a deposed holder; `expires_at` is the database clock in seconds.
leases = Table(
    "leases",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("holder", String(255), nullable=True),
    Column("epoch", BigInteger, nullable=False),
    Column("expires_at", Float, nullable=False),
)
