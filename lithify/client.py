"""`lithify.connect`: the store's API, served by a running tablet server.

A client has the embedded store's common calls (`lithify.open`) with the same arguments,
results and errors, so code can move from an embedded store to a cluster by changing one line.
Entries travel as Arrow IPC streams, so a scan yields the same record batches either way.

Given an instance directory (or a metadata URL), the client finds the tablet server through the
`tserver` lease and reads the instance secret from the metadata; when the server moves (a
restart on another port), the next call that cannot reach it looks it up again. Given a URL,
the secret must be passed (or set in `LITHIFY_SECRET`).

User compactions with `wait` use the coordinator's asynchronous request protocol (SYSTEM.md
5.6) when a coordinator answers: submit, then poll with the tick it gives, resubmitting (the
same request, so the same id) when a new coordinator does not know it. Without a coordinator,
the tablet server starts the compaction and the client polls its status.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa

from lithify.data.key import Key
from lithify.data.mutation import Mutation, mutations_to_table
from lithify.data.ranges import FileRef
from lithify.errors import CompactionCancelledError, LithifyError
from lithify.metadata.store import MetadataStore, TableInfo
from lithify.rpc.client import RpcClient, RpcError
from lithify.rpc.wire import encode_table, error_from_detail, extent_from_json, hex_or_none
from lithify.server.instance import (
    COORDINATOR_LEASE,
    TSERVER_LEASE,
    lease_holder,
    open_metadata,
    read_secret,
)
from lithify.store import SCAN_BATCH, CompactionSummary, TabletInfo

SECRET_ENV = "LITHIFY_SECRET"
#: Longest pause between two status polls of a user compaction.
_MAX_POLL_S = 2.0
_FINAL = ("FINISHED", "FAILED", "CANCELLED")


def connect(
    url_or_dir: str | os.PathLike,
    secret: str | None = None,
    *,
    metadata_url: str | None = None,
    timeout: float = 120.0,
    wait_s: float = 0.0,
) -> Client:
    """A client of a running tablet server.

    `url_or_dir`: the server's URL (`http://host:port`; `secret` or `$LITHIFY_SECRET` needed) or
    the instance directory (`metadata_url` for a non-default metadata store); with a directory
    the server and the secret are found in the metadata, waiting up to `wait_s` for a server
    to publish itself. `timeout` bounds each call.
    """
    target = os.fspath(url_or_dir)
    if target.startswith(("http://", "https://")):
        secret = secret or os.environ.get(SECRET_ENV)
        if not secret:
            raise LithifyError(
                f"connecting to {target} needs the instance secret (argument or ${SECRET_ENV})"
            )
        return Client(target, secret, timeout=timeout)
    if not Path(target).is_dir() and metadata_url is None:
        raise LithifyError(f"{target} is neither a URL nor an instance directory")
    meta = open_metadata(target, metadata_url)
    try:
        secret = secret or read_secret(meta)
        url = _tserver_url(meta, wait_s)
    except BaseException:
        meta.close()
        raise
    return Client(url, secret, meta=meta, timeout=timeout)


def _tserver_url(meta: MetadataStore, wait_s: float) -> str:
    deadline = time.monotonic() + wait_s
    while True:
        url, _ = lease_holder(meta, TSERVER_LEASE)
        if url:
            return url
        if time.monotonic() >= deadline:
            raise LithifyError(
                "no tablet server is running for this instance (nobody holds the "
                f"{TSERVER_LEASE!r} lease); start one with `lithify tserver` or `lithify cluster`"
            )
        time.sleep(0.2)


def _t(table: str) -> str:
    return quote(table, safe="")


def _table_info(d: dict[str, Any]) -> TableInfo:
    return TableInfo(d["id"], d["name"], d["state"], dict(d.get("properties", {})))


class Client:
    """The embedded store's API over HTTP. Thread-safe; close it when done."""

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        meta: MetadataStore | None = None,
        timeout: float = 120.0,
    ) -> None:
        self._secret = secret
        self._meta = meta
        self._timeout = timeout
        self._rpc = RpcClient(url, secret, timeout=timeout)
        self.client_id = f"client-{uuid.uuid4().hex[:12]}"

    @property
    def url(self) -> str:
        return self._rpc.base_url

    # -- plumbing -----------------------------------------------------------------------------

    def _server_moved(self) -> bool:
        """Look the tablet server up again; True when it now lives at another URL."""
        if self._meta is None:
            return False
        url, _ = lease_holder(self._meta, TSERVER_LEASE)
        if not url or url == self._rpc.base_url:
            return False
        self._rpc.close()
        self._rpc = RpcClient(url, self._secret, timeout=self._timeout)
        return True

    def _call(
        self, method: str, path: str, body: Any = None, *, timeout: float | None = None
    ) -> Any:
        for attempt in range(2):
            try:
                return self._rpc.call(method, path, body, timeout=timeout)
            except RpcError as e:
                if e.unreachable and attempt == 0 and self._server_moved():
                    continue
                raise self._error(e) from None
        raise AssertionError("unreachable")

    def _error(self, e: RpcError) -> LithifyError:
        if e.unreachable:
            return LithifyError(f"the tablet server at {self._rpc.base_url} cannot be reached: {e}")
        return error_from_detail(e.detail, str(e))

    # -- tables -------------------------------------------------------------------------------

    def create_table(
        self,
        name: str,
        *,
        splits: Iterable[bytes | str] = (),
        properties: dict[str, str] | None = None,
    ) -> TableInfo:
        body = {
            "name": name,
            "splits": [hex_or_none(s) for s in splits],
            "properties": dict(properties or {}),
        }
        return _table_info(self._call("POST", "/v1/tables", body))

    def list_tables(self) -> list[TableInfo]:
        return [_table_info(t) for t in self._call("GET", "/v1/tables")["tables"]]

    def table_info(self, name: str) -> TableInfo:
        return _table_info(self._call("GET", f"/v1/tables/{_t(name)}"))

    def delete_table(self, name: str) -> None:
        """Delete a table; its files become garbage, its external compactions are cancelled."""
        self._call("DELETE", f"/v1/tables/{_t(name)}")

    def offline(self, name: str) -> None:
        self._call("POST", f"/v1/tables/{_t(name)}/offline")

    def online(self, name: str) -> None:
        self._call("POST", f"/v1/tables/{_t(name)}/online")

    def tablets(self, name: str) -> list[TabletInfo]:
        return [
            TabletInfo(
                extent_from_json(t["extent"]),
                tuple(FileRef.from_json(f) for f in t["files"]),
                int(t["memory_bytes"]),
            )
            for t in self._call("GET", f"/v1/tables/{_t(name)}/tablets")["tablets"]
        ]

    def add_splits(self, name: str, points: Iterable[bytes | str]) -> None:
        """Split tablets at the given rows (metadata only)."""
        hexes = [hex_or_none(p) for p in points]
        if hexes:
            self._call("POST", f"/v1/tables/{_t(name)}/splits", {"points": hexes})

    def merge_tablets(
        self, name: str, start: bytes | str | None = None, end: bytes | str | None = None
    ) -> None:
        """Join the tablets that overlap rows [start, end] into one (metadata only)."""
        body = {"start": hex_or_none(start), "end": hex_or_none(end)}
        self._call("POST", f"/v1/tables/{_t(name)}/merge", body)

    # -- properties ---------------------------------------------------------------------------

    def set_property(self, table: str, name: str, value: str) -> None:
        self._call("PUT", f"/v1/tables/{_t(table)}/properties", {"name": name, "value": value})

    def unset_property(self, table: str, name: str) -> None:
        self._call("DELETE", f"/v1/tables/{_t(table)}/properties/{_t(name)}")

    def get_properties(self, table: str) -> dict[str, str]:
        return dict(self._call("GET", f"/v1/tables/{_t(table)}/properties")["properties"])

    def set_system_property(self, name: str, value: str | None) -> None:
        """Set (or with None unset) a system property; compaction services change at once."""
        self._call("PUT", "/v1/system/properties", {"name": name, "value": value})

    def system_properties(self) -> dict[str, str]:
        """System properties with defaults; the instance secret is masked."""
        return dict(self._call("GET", "/v1/system/properties")["properties"])

    # -- writes and scans ---------------------------------------------------------------------

    def write(self, table: str, data: pa.Table | pa.RecordBatch | Iterable[Mutation]) -> int:
        """Write mutations or an Arrow table of entries; returns entries written.

        When this returns every entry is acknowledged with the table's durability. One call is
        one request: each mutation is applied atomically.
        """
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        entries = data if isinstance(data, pa.Table) else mutations_to_table(list(data))
        if entries.num_rows == 0:
            return 0
        body = encode_table(entries)
        path = f"/v1/tables/{_t(table)}/write"
        for attempt in range(2):
            try:
                return int(self._rpc.call_bytes("POST", path, body)["written"])
            except RpcError as e:
                if e.unreachable and attempt == 0 and self._server_moved():
                    continue
                raise self._error(e) from None
        raise AssertionError("unreachable")

    def _scan_body(
        self,
        start: bytes | str | None,
        end: bytes | str | None,
        columns: Sequence[tuple[bytes | str, bytes | str | None]] | None,
        min_timestamp: int | None,
        max_timestamp: int | None,
        batch_size: int,
    ) -> dict[str, Any]:
        return {
            "start": hex_or_none(start),
            "end": hex_or_none(end),
            "columns": None
            if columns is None
            else [[hex_or_none(f), hex_or_none(q)] for f, q in columns],
            "min_timestamp": min_timestamp,
            "max_timestamp": max_timestamp,
            "batch_size": batch_size,
        }

    def scan(
        self,
        table: str,
        start: bytes | str | None = None,
        end: bytes | str | None = None,
        *,
        columns: Sequence[tuple[bytes | str, bytes | str | None]] | None = None,
        min_timestamp: int | None = None,
        max_timestamp: int | None = None,
        batch_size: int = SCAN_BATCH,
    ) -> Iterator[pa.RecordBatch]:
        """Record batches (ENTRY_SCHEMA) of rows in [start, end], as `Store.scan`; streamed."""
        body = self._scan_body(start, end, columns, min_timestamp, max_timestamp, batch_size)
        path = f"/v1/tables/{_t(table)}/scan"
        try:
            resp = self._rpc.stream("POST", path, body)
        except RpcError as e:
            if not (e.unreachable and self._server_moved()):
                raise self._error(e) from None
            try:
                resp = self._rpc.stream("POST", path, body)
            except RpcError as e2:
                raise self._error(e2) from None
        try:
            with pa.ipc.open_stream(resp) as reader:
                yield from reader
        except (pa.ArrowException, OSError) as e:
            raise LithifyError(f"the scan of {table} was cut short: {e}") from None
        finally:
            resp.close()

    def scan_entries(
        self, table: str, start: bytes | str | None = None, end: bytes | str | None = None, **kw
    ) -> Iterator[tuple[Key, bytes]]:
        """The same as `scan`, one (Key, value) pair at a time."""
        for batch in self.scan(table, start, end, **kw):
            cols = [batch.column(n).to_pylist() for n in batch.schema.names]
            for r, f, q, v, ts, d, val in zip(*cols, strict=True):
                yield Key(r, f, q, v, ts, d), val

    def count(self, table: str) -> int:
        """Entries a full scan would return (counted by the server)."""
        body = self._scan_body(None, None, None, None, None, SCAN_BATCH)
        return int(self._call("POST", f"/v1/tables/{_t(table)}/count", body)["count"])

    # -- flush and compactions ----------------------------------------------------------------

    def flush(self, table: str, *, wait: bool = True) -> None:
        """Flush every tablet of a table to files (a minor compaction)."""
        self._call("POST", f"/v1/tables/{_t(table)}/flush", {"wait": wait})

    def compact(
        self,
        table: str,
        start: bytes | str | None = None,
        end: bytes | str | None = None,
        *,
        flush: bool = True,
        wait: bool = True,
        timeout: float | None = None,
        iterators: Sequence[tuple[str, dict[str, str]]] = (),
        hints: dict[str, str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> CompactionSummary:
        """A user compaction: every tablet overlapping [start, end] ends as one file.

        As `Store.compact`. With `wait`, it returns when the compaction finished and raises
        CompactionCancelledError when it was cancelled, LithifyError when `timeout` passed
        first. Entry and byte counts are those the server reports (0 when it does not know).
        """
        iters = [[c, dict(o)] for c, o in iterators]
        if wait:
            via = self._compact_via_coordinator(
                table, start, end, flush, timeout, iters, hints, progress
            )
            if via is not None:
                return via
        body = {
            "start": hex_or_none(start),
            "end": hex_or_none(end),
            "flush": flush,
            "wait": False,
            "iterators": iters,
            "hints": dict(hints or {}),
        }
        st = self._call("POST", f"/v1/tables/{_t(table)}/compact", body)
        if wait:
            st = self._wait_compaction(table, st, timeout, progress)
        return CompactionSummary(
            int(st.get("tablets") or 0), int(st.get("files_in") or 0), 0, 0, 0, str(st["id"])
        )

    def _wait_compaction(
        self,
        table: str,
        st: dict[str, Any],
        timeout: float | None,
        progress: Callable[[int, int], None] | None,
    ) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.05
        while True:
            if progress is not None and st.get("tablets") is not None:
                total = int(st["tablets"])
                progress(total - int(st.get("pending") or 0), total)
            state = st.get("state")
            if state == "FINISHED":
                return st
            if state == "CANCELLED":
                raise CompactionCancelledError(
                    f"user compaction {st['id']} of {table} was cancelled"
                )
            if state not in ("RUNNING",):
                raise LithifyError(
                    f"user compaction {st['id']} of {table} is {state}: the tablet server "
                    "restarted and no longer knows it"
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise LithifyError(
                    f"user compaction {st['id']} of {table} did not finish in {timeout}s"
                )
            time.sleep(pause)
            pause = min(_MAX_POLL_S, pause * 2)
            st = self._call("GET", f"/v1/compactions/{_t(st['id'])}")

    # -- the coordinator's asynchronous requests ----------------------------------------------

    def _coordinator(self) -> RpcClient | None:
        if self._meta is not None:
            url, _ = lease_holder(self._meta, COORDINATOR_LEASE)
        else:
            url = (self.status().get("coordinator") or {}).get("url")
        if not url:
            return None
        return RpcClient(url, self._secret, timeout=min(self._timeout, 30.0))

    def _compact_via_coordinator(
        self,
        table: str,
        start: bytes | str | None,
        end: bytes | str | None,
        flush: bool,
        timeout: float | None,
        iterators: list[list[Any]],
        hints: dict[str, str] | None,
        progress: Callable[[int, int], None] | None,
    ) -> CompactionSummary | None:
        """Run a user compaction through the coordinator's request protocol; None when no
        coordinator takes requests (the caller then uses the tablet server)."""
        coord = self._coordinator()
        if coord is None:
            return None
        if flush:
            self.flush(table, wait=True)
        request = {
            "op": "compact",
            "table": table,
            "start": hex_or_none(start),
            "end": hex_or_none(end),
            "iterators": iterators,
            "hints": dict(hints or {}),
            "client": self.client_id,
            "nonce": uuid.uuid4().hex,
            "cancel_on_client_loss": False,
        }
        try:
            sub = coord.call("POST", "/v1/requests", request)
        except RpcError as e:
            coord.close()
            if e.unreachable or e.status in (404, 405, 501, 503):
                return None  # no coordinator that takes requests: use the tablet server
            raise error_from_detail(e.detail, str(e)) from None
        try:
            return self._follow_request(coord, table, request, sub, timeout, progress)
        finally:
            coord.close()

    def _follow_request(
        self,
        coord: RpcClient,
        table: str,
        request: dict[str, Any],
        sub: dict[str, Any],
        timeout: float | None,
        progress: Callable[[int, int], None] | None,
    ) -> CompactionSummary:
        deadline = None if timeout is None else time.monotonic() + timeout
        rid = str(sub["id"])
        tick = float(sub.get("tick_s") or 1.0)
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                raise LithifyError(f"user compaction {rid} of {table} did not finish in {timeout}s")
            time.sleep(max(0.05, min(tick, _MAX_POLL_S)))
            try:
                st = coord.call("GET", f"/v1/requests/{_t(rid)}")
            except RpcError as e:
                if not e.unreachable:
                    raise error_from_detail(e.detail, str(e)) from None
                # The coordinator is failing over: find the new one and ask again.
                new = self._coordinator()
                if new is not None:
                    coord.close()
                    coord = new
                continue
            state = st.get("state")
            tick = float(st.get("tick_s") or tick)
            p = st.get("progress") or {}
            if progress is not None and p.get("tablets_total") is not None:
                total = int(p["tablets_total"])
                progress(total - int(p.get("tablets_pending") or 0), total)
            if state == "FINISHED":
                return CompactionSummary(
                    int(p.get("tablets_total") or 0),
                    int(p.get("selected") or 0),
                    int(p.get("entries_read") or 0),
                    int(p.get("entries_written") or 0),
                    int(p.get("bytes_written") or 0),
                    rid,
                )
            if state == "CANCELLED":
                raise CompactionCancelledError(f"user compaction {rid} of {table} was cancelled")
            if state == "FAILED":
                raise LithifyError(f"user compaction {rid} of {table} failed: {st.get('progress')}")
            if state == "NOT_SUBMITTED":
                # A coordinator that took over does not know it: submit it again (same id).
                try:
                    coord.call("POST", "/v1/requests", request)
                except RpcError:
                    continue

    def cancel_compaction(self, table: str) -> int:
        """Cancel the table's pending user compaction; returns how many were cancelled."""
        return int(self._call("POST", f"/v1/tables/{_t(table)}/compact/cancel")["cancelled"])

    # -- observation and lifecycle ------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The tablet server's status (URL, tables, tablets, memory, coordinator)."""
        return self._call("GET", "/v1/status")

    def gc(self) -> list[str]:
        """Have the tablet server delete data files that nothing refers to; returns their paths."""
        return list(self._call("POST", "/v1/gc")["paths"])

    def close(self) -> None:
        self._rpc.close()
        if self._meta is not None:
            self._meta.close()
            self._meta = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
