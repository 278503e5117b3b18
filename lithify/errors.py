"""Every error lithify raises on purpose derives from `LithifyError`.

Messages name the thing at fault (the property, the file, the table, the value) so that an
operator can act on them without reading the code.
"""

from __future__ import annotations


class LithifyError(Exception):
    """Base of all lithify errors."""


class ConfigError(LithifyError):
    """A property, option or plug-in is invalid; the message names the property."""


class TableNotFoundError(LithifyError):
    """A table name or id that does not exist."""


class TableExistsError(LithifyError):
    """Creating a table whose name is taken."""


class TableOfflineError(LithifyError):
    """Reading or writing a table that is offline."""


class InvalidMutationError(LithifyError):
    """A mutation or entry batch that cannot be written; the message says which field is wrong."""


class CorruptFileError(LithifyError):
    """A data file that cannot be read or whose contents contradict its footer; names the file."""


class ConditionalUpdateError(LithifyError):
    """A conditional metadata update found the tablet changed since it was read."""


class CompactionCancelledError(LithifyError):
    """A compaction stopped because it was cancelled; its temporary output is removed."""
