"""The one filesystem layer: every data file is read and written through `Storage`.

Paths given to `Storage` are relative to its root, so metadata records (which store relative
paths) stay valid when the store moves or is served from a shared filesystem or object store.
"""

from __future__ import annotations

import contextlib
import os

import pyarrow as pa
import pyarrow.fs as pafs

#: Write buffer of output streams.
OUTPUT_BUFFER_BYTES = 1 << 20


class Storage:
    """A directory (local path or any URI pyarrow.fs understands) holding a store's files."""

    def __init__(self, root: str) -> None:
        if "://" in root:
            fs, base = pafs.FileSystem.from_uri(root)
        else:
            fs, base = pafs.LocalFileSystem(), os.path.abspath(root)
        self.root = root
        self.fs: pafs.FileSystem = fs
        self._base = base.rstrip("/")  # "" for the filesystem's root
        if self._base:
            self.fs.create_dir(self._base, recursive=True)

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    def path(self, rel: str) -> str:
        """The path of `rel` as the underlying filesystem names it."""
        rel = rel.lstrip("/")
        return f"{self._base}/{rel}" if rel else self._base

    @property
    def write_is_synchronous(self) -> bool:
        """Whether an output stream is done with a buffer once `write` returns, so the caller
        may reuse it. True for local files; object stores (S3) upload a large write in the
        background straight from the caller's buffer."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def open_input(self, rel: str) -> pa.NativeFile:
        """A random-access file (Parquet readers seek to the footer first)."""
        return self.fs.open_input_file(self.path(rel))

    def open_output(self, rel: str) -> pa.NativeFile:
        """A new output stream, creating parent directories; replaces an existing file.

        Buffered: a Parquet writer writes every page header and page separately, and unbuffered
        that is a system call each (about 5,000 per 8M-entry file, most under 100 bytes).
        """
        self.mkdirs(os.path.dirname(rel))
        return self.fs.open_output_stream(
            self.path(rel), compression=None, buffer_size=OUTPUT_BUFFER_BYTES
        )

    def rename(self, src: str, dst: str) -> None:
        self.mkdirs(os.path.dirname(dst))
        self.fs.move(self.path(src), self.path(dst))

    def delete(self, rel: str) -> None:
        """Delete a file; a file that is already gone is not an error (deletes are retried)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def size(self, rel: str) -> int:
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(rel)
        return int(info.size)

    def list_files(self, prefix: str = "") -> list[str]:
        """Files under the directory `prefix`, recursively, as sorted paths relative to the root."""
        sel = pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True)
        cut = len(self._base) + 1
        return sorted(
            i.path[cut:] for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File
        )

    def mkdirs(self, rel: str) -> None:
        self.fs.create_dir(self.path(rel), recursive=True)
