"""The wire formats shared by servers and clients: extents and rows as JSON, entries as Arrow.

Rows are arbitrary bytes, so JSON carries them as lowercase hex (None = unbounded), the way
docs/EXTERNAL_COMPACTIONS.md writes extents. Entry batches travel as an Arrow IPC stream
(`application/vnd.apache.arrow.stream`): no conversion on either side, and a scan can be sent
batch by batch as it is produced. Errors travel as `{"detail": {"error": CLASS, "message": M}}`
so that a client raises the same `LithifyError` subclass the embedded store would.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

from lithify import errors
from lithify.data.ranges import Extent

ARROW_STREAM = "application/vnd.apache.arrow.stream"

#: The Arrow IPC end-of-stream marker (continuation token, then a zero length).
_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"

#: Deliberate errors and the HTTP status a server answers them with. Order matters: the first
#: class an exception is an instance of wins, so subclasses come before LithifyError.
ERROR_STATUS: tuple[tuple[type[errors.LithifyError], int], ...] = (
    (errors.TableNotFoundError, 404),
    (errors.TableExistsError, 409),
    (errors.TableOfflineError, 409),
    (errors.ConfigError, 400),
    (errors.InvalidMutationError, 400),
    (errors.CompactionCancelledError, 409),
    (errors.ConditionalUpdateError, 409),
    (errors.CorruptFileError, 500),
    (errors.LithifyError, 400),
)
_ERRORS_BY_NAME = {cls.__name__: cls for cls, _ in ERROR_STATUS}


def hex_or_none(b: bytes | str | None) -> str | None:
    if b is None:
        return None
    return (b.encode() if isinstance(b, str) else bytes(b)).hex()


def bytes_or_none(h: str | None) -> bytes | None:
    """Bytes from hex; ValueError (a 4xx for servers) when it is not hex."""
    return None if h is None else bytes.fromhex(h)


def extent_to_json(e: Extent) -> dict[str, Any]:
    return {
        "table_id": e.table_id,
        "prev_end_row": hex_or_none(e.prev_end_row),
        "end_row": hex_or_none(e.end_row),
    }


def extent_from_json(d: dict[str, Any]) -> Extent:
    return Extent(
        str(d["table_id"]), bytes_or_none(d.get("prev_end_row")), bytes_or_none(d.get("end_row"))
    )


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of a deliberate error."""
    for cls, status in ERROR_STATUS:
        if isinstance(exc, cls):
            return status, {"detail": {"error": cls.__name__, "message": str(exc)}}
    return 500, {"detail": {"error": type(exc).__name__, "message": str(exc)}}


def error_from_detail(detail: Any, fallback: str) -> errors.LithifyError:
    """The LithifyError a server's error detail describes (LithifyError when it is unknown)."""
    if isinstance(detail, dict) and "message" in detail:
        cls = _ERRORS_BY_NAME.get(str(detail.get("error")), errors.LithifyError)
        return cls(str(detail["message"]))
    return errors.LithifyError(fallback)


def encode_stream(
    schema: pa.Schema, batches: Iterable[pa.RecordBatch | pa.Table]
) -> Iterator[bytes]:
    """An Arrow IPC stream in pieces: the schema, one piece per batch, the end marker.

    Pieces are produced as the batches arrive, so a server can send a scan while it runs.
    """
    yield schema.serialize().to_pybytes()
    for item in batches:
        for batch in item.to_batches() if isinstance(item, pa.Table) else (item,):
            if batch.num_rows:
                yield batch.serialize().to_pybytes()
    yield _END_OF_STREAM


def encode_table(table: pa.Table | pa.RecordBatch) -> bytes:
    """A whole table as one Arrow IPC stream body."""
    return b"".join(encode_stream(table.schema, [table]))


def decode_table(body: bytes) -> pa.Table:
    """The table of an Arrow IPC stream body; pa.ArrowInvalid when the body is not one."""
    with pa.ipc.open_stream(pa.py_buffer(body)) as reader:
        return reader.read_all()
