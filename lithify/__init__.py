"""lithify: a sorted key-value tablet store whose compactions can run anywhere.

Start with `lithify.open(path)` for an embedded store; see README.md and docs/ARCHITECTURE.md.
"""

from lithify.client import Client, connect
from lithify.data.key import ENTRY_SCHEMA, Key
from lithify.data.mutation import Mutation
from lithify.data.ranges import Extent, FileRef, RowRange
from lithify.errors import LithifyError
from lithify.store import Store, open

__all__ = [
    "Client",
    "ENTRY_SCHEMA",
    "Extent",
    "FileRef",
    "Key",
    "LithifyError",
    "Mutation",
    "RowRange",
    "Store",
    "connect",
    "open",
]
