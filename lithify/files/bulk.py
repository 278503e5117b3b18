"""Validation of externally written files before a bulk import adds them to tablets.

A file written by another program must already be a lithify sorted file in all but name: the
exact entry schema, no nulls, at least one entry, keys in key order (see `verify`). The error
names the file and what is wrong.
"""

from __future__ import annotations

from lithify.errors import CorruptFileError, InvalidMutationError
from lithify.files.reader import SortedFileReader
from lithify.files.storage import Storage
from lithify.files.verify import FileCheckError, verify_entries
from lithify.files.writer import FileInfo


class BulkImportError(InvalidMutationError):
    """A bulk import file that cannot be imported; the message names the file."""


def validate_import_file(storage: Storage, rel_path: str) -> FileInfo:
    """Check a file for bulk import; return its facts (computed, not trusted from the footer)."""
    try:
        with SortedFileReader.open(storage, rel_path) as reader:
            return verify_entries(reader, allow_empty=False)
    except (CorruptFileError, FileCheckError) as e:
        raise BulkImportError(f"bulk import file {rel_path}: {e}") from None
