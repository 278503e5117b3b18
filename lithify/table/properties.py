"""The known table and system properties: names, types, defaults and validation.

Only known names are accepted, so a typo is an error rather than a silently ignored setting.
Values are strings (as in Accumulo) and are checked when set; readers use the typed getters of
`Properties`, which fall back to the defaults declared here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lithify import units
from lithify.errors import ConfigError

Validator = Callable[[str, str], str]


def _int_at_least(low: int) -> Validator:
    def check(name: str, value: str) -> str:
        try:
            v = int(value.strip())
        except ValueError:
            raise ConfigError(
                f"property {name}: {value!r} is not an integer (expected an integer >= {low})"
            ) from None
        if v < low:
            raise ConfigError(f"property {name}: {v} is below the minimum {low}")
        return str(v)

    return check


def _any_int(name: str, value: str) -> str:
    try:
        return str(int(value.strip()))
    except ValueError:
        raise ConfigError(f"property {name}: {value!r} is not an integer") from None


def _float_at_least(low: float) -> Validator:
    def check(name: str, value: str) -> str:
        try:
            v = float(value.strip())
        except ValueError:
            raise ConfigError(
                f"property {name}: {value!r} is not a number (expected a number >= {low})"
            ) from None
        if not v >= low:
            raise ConfigError(f"property {name}: {v} is below the minimum {low}")
        return repr(v) if "." in value or "e" in value.lower() else str(v)

    return check


def _choice(*choices: str) -> Validator:
    def check(name: str, value: str) -> str:
        v = value.strip().lower()
        if v not in choices:
            raise ConfigError(
                f"property {name}: {value!r} is not accepted; accepted values: {', '.join(choices)}"
            )
        return v

    return check


def parse_size(name: str, value: str) -> int:
    """Bytes from a size such as `64M` (binary suffixes K, M, G; a bare number is bytes)."""
    return units.parse_size(value, property_name=f"property {name}")


def _size(name: str, value: str) -> str:
    parse_size(name, value)
    return value.strip()


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_MULT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(name: str, value: str) -> float:
    """Seconds from a duration such as `30s`, `500ms`, `5m` (a bare number is seconds)."""
    m = _DURATION_RE.match(value)
    if not m:
        raise ConfigError(
            f"property {name}: {value!r} is not a duration (expected e.g. 500ms, 30s, 5m, 1h)"
        )
    return float(m.group(1)) * _DURATION_MULT[m.group(2)]


def _duration(name: str, value: str) -> str:
    parse_duration(name, value)
    return value.strip()


_CLASS_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _class_name(name: str, value: str) -> str:
    if not _CLASS_RE.match(value.strip()):
        raise ConfigError(
            f"property {name}: {value!r} is not a plug-in name of the form module:Class"
        )
    return value.strip()


def _any_string(name: str, value: str) -> str:
    return value


def _iterator_setting(name: str, value: str) -> str:
    """`<priority>,<module:Class>` as in Accumulo's table.iterator.<scope>.<name>."""
    prio, _, cls = value.partition(",")
    _int_at_least(0)(name, prio)
    _class_name(name, cls)
    return f"{int(prio)},{cls.strip()}"


@dataclass(frozen=True)
class PropertyDef:
    name: str
    default: str | None
    validate: Validator
    description: str
    prefix: bool = False


DEFAULT_DISPATCHER = "lithify.compaction.dispatcher:SimpleCompactionDispatcher"
DEFAULT_PLANNER = "lithify.compaction.planner:DefaultCompactionPlanner"

TABLE_PROPERTIES: tuple[PropertyDef, ...] = (
    PropertyDef("table.versions", "1", _int_at_least(1), "newest versions kept per column"),
    PropertyDef(
        "table.durability",
        "flush",
        _choice("none", "flush", "sync"),
        "when a write is acknowledged: none (in memory), flush (in the OS), sync (on disk)",
    ),
    PropertyDef(
        "table.compaction.major.ratio",
        "3",
        _float_at_least(1.0),
        "a set of files is compacted when largest * ratio < total",
    ),
    PropertyDef(
        "table.file.max",
        "15",
        _any_int,
        "files per tablet above which compactions get urgent (<= 0: scan files open max - 1)",
    ),
    PropertyDef(
        "table.file.compress.type",
        "zstd",
        _choice("zstd", "snappy", "lz4", "gzip", "none"),
        "Parquet codec of new files",
    ),
    PropertyDef(
        "table.minc.compress.type",
        "none",
        _choice("zstd", "snappy", "lz4", "gzip", "none"),
        "Parquet codec of flush (F) files. They live only until a compaction rewrites them with "
        "table.file.compress.type, and a flush must keep up with ingest, so by default they are "
        "not compressed (as RocksDB advises for level 0): measured per 700,000 entries, zstd "
        "180 ms, lz4 120 ms, none 70 ms of CPU, ingest 15-20% faster than with lz4",
    ),
    PropertyDef(
        "table.compaction.dispatcher",
        DEFAULT_DISPATCHER,
        _class_name,
        "plug-in that chooses a compaction service per compaction",
    ),
    PropertyDef(
        "table.compaction.dispatcher.opts.",
        None,
        _any_string,
        "dispatcher options",
        prefix=True,
    ),
    PropertyDef(
        "table.iterator.",
        None,
        _any_string,
        "table.iterator.<scan|majc>.<name> = <priority>,<module:Class>; "
        "table.iterator.<scope>.<name>.opt.<key> = option",
        prefix=True,
    ),
)

SYSTEM_PROPERTIES: tuple[PropertyDef, ...] = (
    PropertyDef(
        "tserver.memory.maps.max", "64M", _size, "in-memory map size that triggers a flush"
    ),
    PropertyDef(
        "tserver.compaction.major.delay", "30s", _duration, "period of planning for every tablet"
    ),
    PropertyDef(
        "tserver.scan.files.open.max", "100", _int_at_least(2), "files a scan may open at once"
    ),
    PropertyDef(
        "tserver.memory.maps.max.age",
        "5m",
        _duration,
        "a tablet's in-memory map holding entries written this long ago is flushed, so that a "
        "tablet written now and then does not keep its write-ahead logs (and their replay after "
        "a crash) for ever (0: only by size or on request)",
    ),
    PropertyDef("tserver.wal.max.size", "1G", _size, "size at which the write-ahead log rolls"),
    PropertyDef(
        "tserver.wal.flush.interval",
        "1s",
        _duration,
        "longest time a table.durability=none write stays buffered in the tablet server before "
        "the write-ahead log writes it out (0: only when the buffer fills)",
    ),
    PropertyDef(
        "tserver.wal.recovery",
        "tolerate-tail",
        _choice("tolerate-tail", "point-in-time"),
        "what log replay does with a damaged record: tolerate-tail (only a torn tail, a damaged "
        "record with nothing intact after it, is dropped; damage followed by intact records "
        "stops recovery with an error), point-in-time (replay stops at the first damaged "
        "record wherever it is, dropping what follows, with a warning)",
    ),
    PropertyDef(
        "metadata.sqlite.synchronous",
        "normal",
        _choice("normal", "full", "extra"),
        "SQLite's synchronous level for the metadata store, read when a process opens it: "
        "normal survives a process crash, full also power loss (needed for table.durability=sync "
        "to survive it) at a lower commit rate",
    ),
    PropertyDef(
        "tserver.compaction.major.service.",
        None,
        _any_string,
        "tserver.compaction.major.service.<svc>.planner / .planner.opts.<opt> / .rate.limit",
        prefix=True,
    ),
    PropertyDef(
        "instance.secret", None, _any_string, "shared secret of every process-to-process call"
    ),
    PropertyDef(
        "coordinator.lease.ttl", "5s", _duration, "coordinator lease; a standby takes over after it"
    ),
    PropertyDef(
        "coordinator.queue.max", "10000", _int_at_least(1), "jobs per external queue before rejects"
    ),
    PropertyDef(
        "coordinator.phi.threshold",
        "8",
        _float_at_least(1.0),
        "phi above which a compactor is suspect",
    ),
    PropertyDef(
        "coordinator.phi.window", "100", _int_at_least(2), "heartbeat intervals the detector keeps"
    ),
    PropertyDef(
        "coordinator.phi.min.std", "500ms", _duration, "lowest deviation the detector assumes"
    ),
    PropertyDef(
        "coordinator.check.interval", "1s", _duration, "period of the coordinator's checks"
    ),
    PropertyDef(
        "compactor.cancel.grace", "30s", _duration, "time a stopping compactor may finish its job"
    ),
    PropertyDef(
        "compactor.wait.time.job.min", "1s", _duration, "shortest idle wait between job requests"
    ),
    PropertyDef(
        "compactor.wait.time.job.max", "5m", _duration, "longest idle wait between job requests"
    ),
)

_ITERATOR_RE = re.compile(r"^table\.iterator\.(scan|majc)\.([A-Za-z0-9_-]+)(\.opt\.(.+))?$")


def _find(defs: tuple[PropertyDef, ...], name: str) -> PropertyDef | None:
    for d in defs:
        if (d.prefix and name.startswith(d.name) and len(name) > len(d.name)) or d.name == name:
            return d
    return None


def _validate(defs: tuple[PropertyDef, ...], kind: str, name: str, value: str) -> str:
    d = _find(defs, name)
    if d is None:
        known = ", ".join(x.name + ("*" if x.prefix else "") for x in defs)
        raise ConfigError(f"unknown {kind} property {name!r}; known properties: {known}")
    if not isinstance(value, str):
        raise ConfigError(f"property {name}: value must be a string, got {type(value).__name__}")
    if name.startswith("table.iterator."):
        m = _ITERATOR_RE.match(name)
        if not m:
            raise ConfigError(
                f"property {name}: expected table.iterator.<scan|majc>.<name>[.opt.<key>]"
            )
        return value if m.group(3) else _iterator_setting(name, value)
    return d.validate(name, value)


def validate_table_property(name: str, value: str) -> str:
    """The normalised value, or ConfigError naming the property and the accepted values."""
    return _validate(TABLE_PROPERTIES, "table", name, value)


def validate_system_property(name: str, value: str) -> str:
    """The normalised value, or ConfigError naming the property and the accepted values."""
    return _validate(SYSTEM_PROPERTIES, "system", name, value)


class Properties(Mapping[str, str]):
    """Properties with defaults, read through typed getters."""

    def __init__(self, values: Mapping[str, str], defs: tuple[PropertyDef, ...]) -> None:
        self._values = dict(values)
        self._defs = defs

    def __getitem__(self, name: str) -> str:
        if name in self._values:
            return self._values[name]
        d = _find(self._defs, name)
        if d is None or d.default is None:
            raise KeyError(name)
        return d.default

    def __iter__(self):
        names = {d.name for d in self._defs if d.default is not None} | set(self._values)
        return iter(sorted(names))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def explicit(self) -> dict[str, str]:
        return dict(self._values)

    def get_int(self, name: str) -> int:
        return int(self[name])

    def get_float(self, name: str) -> float:
        return float(self[name])

    def get_size(self, name: str) -> int:
        return parse_size(name, self[name])

    def get_duration(self, name: str) -> float:
        return parse_duration(name, self[name])

    def with_prefix(self, prefix: str) -> dict[str, str]:
        """Explicit values under `prefix`, with the prefix removed from their names."""
        return {k[len(prefix) :]: v for k, v in self._values.items() if k.startswith(prefix)}


def table_properties(values: Mapping[str, str]) -> Properties:
    return Properties(values, TABLE_PROPERTIES)


def system_properties(values: Mapping[str, str]) -> Properties:
    return Properties(values, SYSTEM_PROPERTIES)


def iterator_specs(props: Properties, scope: str) -> list[tuple[str, dict[str, str]]]:
    """The (module:Class, options) of a scope's table iterators, in priority order."""
    prefix = f"table.iterator.{scope}."
    found: list[tuple[int, str, str]] = []
    opts: dict[str, dict[str, str]] = {}
    for key, value in props.with_prefix(prefix).items():
        name, sep, rest = key.partition(".opt.")
        if sep:
            opts.setdefault(name, {})[rest] = value
        else:
            prio, _, cls = value.partition(",")
            found.append((int(prio), name, cls))
    return [(cls, opts.get(name, {})) for _, name, cls in sorted(found)]
