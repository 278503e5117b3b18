"""Compaction iterators: table-configured filters applied to merged entries.

They work on whole Arrow record batches (not one entry at a time) so that a filter costs a
vectorised kernel per batch, not Python per entry. The merge applies them, in the configured
order, to its output after versioning and the delete rule; an iterator may drop entries but must
keep the order of those it keeps.
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from lithify.errors import ConfigError


class CompactionIterator(ABC):
    """Base of compaction iterators. Created with no arguments, then `init(options)`."""

    def init(self, options: Mapping[str, str]) -> None:  # noqa: B027 - optional hook
        """Receive the iterator's options (strings, from table properties)."""

    @abstractmethod
    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Return the entries of `batch` to keep, in the same order."""


class AgeOffFilter(CompactionIterator):
    """Drops entries older than `ttl` milliseconds (timestamp < now - ttl).

    Options: `ttl` (milliseconds, required), `currentTime` (milliseconds; default: the time
    `init` ran, so one compaction uses one cut-off throughout).
    """

    def __init__(self) -> None:
        self.cutoff: int | None = None

    def init(self, options: Mapping[str, str]) -> None:
        if "ttl" not in options:
            raise ConfigError("AgeOffFilter option 'ttl' (milliseconds) is required")
        ttl = _int_option(options, "ttl")
        if ttl < 0:
            raise ConfigError(f"AgeOffFilter option 'ttl' must be >= 0, got {ttl}")
        now = (
            _int_option(options, "currentTime")
            if "currentTime" in options
            else time.time_ns() // 1_000_000
        )
        self.cutoff = now - ttl

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self.cutoff is None:
            raise ConfigError("AgeOffFilter used before init()")
        keep = pc.greater_equal(batch.column("timestamp"), pa.scalar(self.cutoff, pa.int64()))
        n = keep.true_count
        if n == batch.num_rows:
            return batch
        return batch.filter(keep)


def _int_option(options: Mapping[str, str], name: str) -> int:
    try:
        return int(options[name])
    except (TypeError, ValueError):
        raise ConfigError(f"option {name!r} must be an integer, got {options[name]!r}") from None


def load_iterators(
    specs: Sequence[tuple[str, Mapping[str, str]]],
) -> list[CompactionIterator]:
    """Instantiate and initialise `module:Class` iterators, in order."""
    out: list[CompactionIterator] = []
    for name, options in specs:
        mod_name, sep, cls_name = name.partition(":")
        if not sep or not mod_name or not cls_name:
            raise ConfigError(f"compaction iterator {name!r} must be named 'module:Class'")
        try:
            cls = getattr(importlib.import_module(mod_name), cls_name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"cannot load compaction iterator {name!r}: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, CompactionIterator)):
            raise ConfigError(f"compaction iterator {name!r} is not a CompactionIterator")
        try:
            it = cls()
            it.init(dict(options))
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - a plug-in's own failure, reported by name
            raise ConfigError(f"compaction iterator {name!r} failed to initialise: {e}") from None
        out.append(it)
    return out
