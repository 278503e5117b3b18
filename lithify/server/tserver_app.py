"""The tablet server's HTTP API: the embedded `Store`, served to clients and to the coordinator.

Every route needs the instance secret (`SecretMiddleware`), except the OpenAPI description.
Rows are hex in JSON (`lithify.rpc.wire`); entries travel as Arrow IPC streams, both ways.
Request bodies are validated strictly (unknown fields refused), so a malformed call gets a 4xx
before it reaches the store and changes nothing. Deliberate errors keep their class across the
wire (`{"detail": {"error": ..., "message": ...}}`), so `lithify.connect` raises what
`lithify.open` would.

Routes (all JSON unless said):

* `GET /v1/status`, `GET /metrics` (Prometheus text)
* `GET|POST /v1/tables`; `GET|DELETE /v1/tables/{t}`; `POST /v1/tables/{t}/offline|online`
* `GET|PUT /v1/tables/{t}/properties`, `DELETE /v1/tables/{t}/properties/{name}`
* `GET /v1/tables/{t}/tablets`, `POST /v1/tables/{t}/splits`, `POST /v1/tables/{t}/merge`
* `POST /v1/tables/{t}/write` (Arrow IPC stream body), `POST /v1/tables/{t}/scan` (Arrow IPC
  stream answer), `POST /v1/tables/{t}/count`
* `POST /v1/tables/{t}/flush`, `POST /v1/tables/{t}/compact`, `POST /v1/tables/{t}/compact/cancel`,
  `GET /v1/compactions/{id}`
* `GET|PUT /v1/system/properties` (`instance.secret` masked, and not settable here)
* `POST /v1/tablets/refresh` (from the coordinator, docs/EXTERNAL_COMPACTIONS.md)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from lithify.data.key import ENTRY_SCHEMA
from lithify.data.ranges import RowRange
from lithify.errors import InvalidMutationError, LithifyError
from lithify.metrics import exposition
from lithify.rpc.auth import SECRET_PROPERTY, SecretMiddleware
from lithify.rpc.wire import (
    ARROW_STREAM,
    bytes_or_none,
    decode_table,
    encode_stream,
    error_payload,
    extent_from_json,
    extent_to_json,
)
from lithify.server.coordinator_link import CoordinatorLink
from lithify.server.user_compactions import UserCompactions, check_iterators
from lithify.store import Store

log = logging.getLogger(__name__)

MASK = "********"
#: Longest a `compact` call with wait=true holds its HTTP request (clients poll instead).
MAX_COMPACT_WAIT_S = 3600.0


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateTable(_Body):
    name: str = Field(min_length=1)
    splits: list[str] = Field(default_factory=list, description="split points, hex")
    properties: dict[str, str] = Field(default_factory=dict)


class SetProperty(_Body):
    name: str = Field(min_length=1)
    value: str | None = Field(description="null unsets a system property")


class Splits(_Body):
    points: list[str] = Field(min_length=1, description="split points, hex")


class RowSpan(_Body):
    start: str | None = Field(default=None, description="first row (inclusive), hex")
    end: str | None = Field(default=None, description="last row (inclusive), hex")


class ScanRequest(RowSpan):
    columns: list[tuple[str, str | None]] | None = Field(
        default=None, description="[family hex, qualifier hex or null] pairs to keep"
    )
    min_timestamp: int | None = None
    max_timestamp: int | None = None
    batch_size: int = Field(default=65536, ge=1, le=1 << 20)


class FlushRequest(_Body):
    wait: bool = True


class CompactRequest(RowSpan):
    id: str | None = Field(
        default=None,
        pattern=r"^[0-9A-Za-z_-]{1,64}$",
        description="id for the selection (the coordinator's request id); a repeat with the "
        "same id follows the selection it made",
    )
    flush: bool = True
    wait: bool = False
    timeout: float | None = Field(default=None, ge=0)
    iterators: list[Any] = Field(default_factory=list)
    hints: dict[str, str] = Field(default_factory=dict)


class ExtentBody(_Body):
    table_id: str
    prev_end_row: str | None = None
    end_row: str | None = None


class RefreshRequest(_Body):
    extents: list[ExtentBody]


def _table_json(info: Any) -> dict[str, Any]:
    return {"id": info.id, "name": info.name, "state": info.state, "properties": info.properties}


def create_app(
    store: Store, secret: str, link: CoordinatorLink | None = None, *, url: str = ""
) -> FastAPI:
    """The app for `store`; `link` (when there is a coordinator) hears of cancellations."""
    app = FastAPI(
        title="lithify tablet server",
        description="Tables, writes, scans, flushes and compactions of a lithify instance.",
        version="1",
    )
    app.add_middleware(SecretMiddleware, secret=secret)
    users = UserCompactions(store)
    started = time.time()

    @app.exception_handler(LithifyError)
    async def _lithify_error(_: Request, exc: LithifyError) -> JSONResponse:
        status, body = error_payload(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(
            {"detail": {"error": "ValueError", "message": str(exc)}}, status_code=400
        )

    # -- status -------------------------------------------------------------------------------

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        tables = store.list_tables()
        coord_url, epoch = link.coordinator if link is not None else (None, 0)
        return {
            "url": url,
            "pid": os.getpid(),
            "started": started,
            "tables": len(tables),
            "tablets": len(store.files_per_tablet()),
            "memory_bytes": store.memory_bytes(),
            "coordinator": {"url": coord_url, "epoch": epoch},
            "plans": {
                "sent": link.plans_sent if link else 0,
                "dropped": link.plans_dropped if link else 0,
                "pending": link.pending() if link else 0,
            },
            "services_misconfigured": store.manager.service_errors(),
        }

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(exposition(store), media_type="text/plain; version=0.0.4")

    # -- tables -------------------------------------------------------------------------------

    @app.get("/v1/tables")
    def list_tables() -> dict[str, Any]:
        return {"tables": [_table_json(t) for t in store.list_tables()]}

    @app.post("/v1/tables", status_code=201)
    def create_table(body: CreateTable) -> dict[str, Any]:
        splits = [bytes.fromhex(p) for p in body.splits]
        info = store.create_table(body.name, splits=splits, properties=body.properties)
        return _table_json(info)

    @app.get("/v1/tables/{table}")
    def table_info(table: str) -> dict[str, Any]:
        return _table_json(store.table_info(table))

    @app.delete("/v1/tables/{table}")
    def delete_table(table: str) -> dict[str, Any]:
        # The store cancels the table's compactions, here and (`Store.on_cancel`) at the
        # coordinator; so do splits and merges below.
        info = store.table_info(table)
        store.delete_table(table)
        users.forget_table(info.id)
        return {"deleted": info.name, "id": info.id}

    @app.post("/v1/tables/{table}/offline")
    def offline(table: str) -> dict[str, Any]:
        store.offline(table)
        return _table_json(store.table_info(table))

    @app.post("/v1/tables/{table}/online")
    def online(table: str) -> dict[str, Any]:
        store.online(table)
        return _table_json(store.table_info(table))

    @app.get("/v1/tables/{table}/properties")
    def get_properties(table: str) -> dict[str, Any]:
        return {"properties": store.get_properties(table)}

    @app.put("/v1/tables/{table}/properties")
    def set_property(table: str, body: SetProperty) -> dict[str, Any]:
        if body.value is None:
            store.unset_property(table, body.name)
        else:
            store.set_property(table, body.name, body.value)
        return {"properties": store.get_properties(table)}

    @app.delete("/v1/tables/{table}/properties/{name}")
    def unset_property(table: str, name: str) -> dict[str, Any]:
        store.unset_property(table, name)
        return {"properties": store.get_properties(table)}

    @app.get("/v1/tables/{table}/tablets")
    def tablets(table: str) -> dict[str, Any]:
        return {
            "tablets": [
                {
                    "extent": extent_to_json(t.extent),
                    "files": [f.to_json() for f in t.files],
                    "memory_bytes": t.memory_bytes,
                }
                for t in store.tablets(table)
            ]
        }

    @app.post("/v1/tables/{table}/splits")
    def add_splits(table: str, body: Splits) -> dict[str, Any]:
        points = sorted({bytes.fromhex(p) for p in body.points})
        split = [
            t.extent
            for t in store.tablets(table)
            if any(t.extent.contains(p) and p != t.extent.end_row for p in points)
        ]
        store.add_splits(table, points)
        if split:
            _plan_table(store, table)
        return {"split": len(split), "tablets": len(store.tablets(table))}

    @app.post("/v1/tables/{table}/merge")
    def merge(table: str, body: RowSpan) -> dict[str, Any]:
        rng = RowRange.rows(bytes_or_none(body.start), bytes_or_none(body.end))
        group = [t.extent for t in store.tablets(table) if t.extent.range.overlaps(rng)]
        store.merge_tablets(table, bytes_or_none(body.start), bytes_or_none(body.end))
        if len(group) >= 2:
            _plan_table(store, table)
        return {"merged": len(group) if len(group) >= 2 else 0}

    # -- writes and scans ---------------------------------------------------------------------

    @app.post(
        "/v1/tables/{table}/write",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def write(table: str, request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype != ARROW_STREAM:
            raise HTTPException(
                415,
                {"error": "UnsupportedMediaType", "message": f"the body must be {ARROW_STREAM}"},
            )
        body = await request.body()
        try:
            entries = decode_table(body)
        except (pa.ArrowException, OSError) as e:
            raise InvalidMutationError(f"the body is not an Arrow IPC stream: {e}") from None
        written = await run_in_threadpool(store.write, table, entries)
        return {"written": written}

    def _scan_batches(table: str, body: ScanRequest) -> Iterator[pa.RecordBatch]:
        columns = None
        if body.columns is not None:
            columns = [
                (bytes.fromhex(f), None if q is None else bytes.fromhex(q)) for f, q in body.columns
            ]
        return store.scan(
            table,
            bytes_or_none(body.start),
            bytes_or_none(body.end),
            columns=columns,
            min_timestamp=body.min_timestamp,
            max_timestamp=body.max_timestamp,
            batch_size=body.batch_size,
        )

    @app.post("/v1/tables/{table}/scan", response_class=StreamingResponse)
    def scan(table: str, body: ScanRequest) -> StreamingResponse:
        batches = _scan_batches(table, body)
        # Pull the first batch here, so that a missing or offline table is a 4xx, not a cut
        # stream; later failures cut the stream, which the client reports as an error.
        first = next(batches, None)

        def chain() -> Iterator[pa.RecordBatch]:
            if first is not None:
                yield first
                yield from batches

        return StreamingResponse(encode_stream(ENTRY_SCHEMA, chain()), media_type=ARROW_STREAM)

    @app.post("/v1/tables/{table}/count")
    def count(table: str, body: ScanRequest) -> dict[str, Any]:
        return {"count": sum(b.num_rows for b in _scan_batches(table, body))}

    # -- flush and compactions ----------------------------------------------------------------

    @app.post("/v1/tables/{table}/flush")
    def flush(table: str, body: FlushRequest) -> dict[str, Any]:
        store.flush(table, wait=body.wait)
        return {"flushed": table, "waited": body.wait}

    @app.post("/v1/tables/{table}/compact")
    def compact(table: str, body: CompactRequest) -> dict[str, Any]:
        st = users.start(
            table,
            bytes_or_none(body.start),
            bytes_or_none(body.end),
            flush=body.flush,
            iterators=check_iterators(body.iterators),
            hints=body.hints,
            ucid=body.id,
        )
        if body.wait:
            limit = (
                MAX_COMPACT_WAIT_S
                if body.timeout is None
                else min(body.timeout, MAX_COMPACT_WAIT_S)
            )
            st = users.wait(st["id"], limit)
        return st

    @app.get("/v1/compactions/{ucid}")
    def compaction_status(ucid: str) -> dict[str, Any]:
        return users.status(ucid)

    @app.post("/v1/tables/{table}/compact/cancel")
    def cancel_compaction(table: str) -> dict[str, Any]:
        info = store.table_info(table)
        if link is not None:
            # Synchronous (no store lock is held here): the caller's next user compaction of
            # the table must not have its jobs dropped by this cancel arriving late. Before the
            # selection is dropped: the coordinator tells a cancelled request from a finished
            # one by its selection still being there.
            link.cancel(info.id, None, "USER")
        n = users.cancel(table)
        return {"cancelled": n}

    # -- configuration ------------------------------------------------------------------------

    @app.get("/v1/system/properties")
    def system_properties() -> dict[str, Any]:
        props = dict(store.system_properties())
        if SECRET_PROPERTY in props:
            props[SECRET_PROPERTY] = MASK
        return {"properties": props}

    @app.put("/v1/system/properties")
    def set_system_property(body: SetProperty) -> dict[str, Any]:
        if body.name == SECRET_PROPERTY:
            raise LithifyError(
                f"{SECRET_PROPERTY} cannot be changed through the API: every process of the "
                "instance would stop trusting the others"
            )
        store.set_system_property(body.name, body.value)
        return system_properties()

    # -- garbage ------------------------------------------------------------------------------

    @app.post("/v1/gc")
    def gc() -> dict[str, Any]:
        """Delete the data files no tablet, running compaction or scan of this server uses."""
        deleted = store.gc()
        return {"deleted": len(deleted), "paths": deleted}

    # -- the coordinator ----------------------------------------------------------------------

    @app.post("/v1/tablets/refresh")
    def refresh(body: RefreshRequest) -> dict[str, Any]:
        done = 0
        for e in body.extents:
            extent = extent_from_json(e.model_dump())
            if store.refresh_tablet(extent) is None:
                continue  # not hosted here (offline, split, merged, deleted): nothing to do
            store.manager.plan(extent)
            done += 1
        return {"refreshed": done}

    return app


def _plan_table(store: Store, table: str) -> None:
    """Plan a table's (new) tablets now rather than at the next planning period."""
    for t in store.tablets(table):
        try:
            store.manager.plan(t.extent)
        except Exception:
            log.exception("planning %s failed", t.extent)
