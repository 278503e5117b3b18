"""A small JSON-over-HTTP client with pooled keep-alive connections and the instance secret.

`http.client` with one persistent connection per thread and server was measurably faster than
httpx on loopback (PERFORMANCE_NOTES: 2,956 vs 1,261 calls/s with 8 clients), and these calls
are small and frequent (heartbeats, job requests, reservations).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from lithify.errors import LithifyError

#: The header that carries the instance secret. The same as `lithify.rpc.auth.SECRET_HEADER`,
#: written out rather than imported so that a client needs none of the server's libraries.
SECRET_HEADER = "X-Lithify-Secret"


class RpcError(LithifyError):
    """A call failed: `status` is the HTTP status, or None when the server was unreachable."""

    def __init__(self, message: str, status: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail

    @property
    def unreachable(self) -> bool:
        return self.status is None


class RpcClient:
    """Calls one server. Thread-safe: each thread keeps its own connection."""

    def __init__(self, base_url: str, secret: str, *, timeout: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"expected a URL like http://127.0.0.1:9000, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._host, self._port = parts.hostname, parts.port
        self._secret = secret
        self._timeout = timeout
        self._local = threading.local()

    def _conn(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            self._local.conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def call(
        self, method: str, path: str, body: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Make one call; returns the decoded JSON (None for an empty body).

        A stale keep-alive connection is retried once on a fresh one; anything else raises
        RpcError (status None when the server cannot be reached).
        """
        data = None if body is None else json.dumps(body).encode()
        return self._request(method, path, data, "application/json", timeout)

    def call_bytes(
        self,
        method: str,
        path: str,
        body: bytes,
        *,
        content_type: str = "application/vnd.apache.arrow.stream",
        timeout: float | None = None,
    ) -> Any:
        """Like `call`, but the request body is raw bytes (an Arrow IPC stream, say)."""
        return self._request(method, path, body, content_type, timeout)

    def _request(
        self, method: str, path: str, data: bytes | None, content_type: str, timeout: float | None
    ) -> Any:
        headers = {SECRET_HEADER: self._secret, "Content-Type": content_type}
        t = self._timeout if timeout is None else timeout
        for attempt in range(2):
            conn = self._conn(t)
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                self._drop()
                # Only a stale keep-alive connection deserves a second try; the calls of this
                # project are idempotent (ECIDs, request ids), so a repeat is harmless.
                if attempt == 1 or isinstance(e, ConnectionRefusedError | socket.timeout):
                    raise RpcError(f"{method} {self.base_url}{path}: {e!r}") from None
                continue
            payload = _decode(raw)
            if resp.status >= 400:
                raise _http_error(method, self.base_url + path, resp.status, payload)
            return payload
        raise AssertionError("unreachable")

    def stream(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: float | None = None,
    ) -> http.client.HTTPResponse:
        """Start a call whose answer is read as a stream (a scan's Arrow IPC batches).

        It uses a connection of its own, closed with the returned response, so a caller that
        stops reading half-way never leaves a pooled connection in the middle of a body.
        """
        data = None if body is None else json.dumps(body).encode()
        # "Connection: close" hands the socket to the response: closing it ends the call.
        headers = {
            SECRET_HEADER: self._secret,
            "Content-Type": "application/json",
            "Connection": "close",
        }
        t = self._timeout if timeout is None else timeout
        conn = http.client.HTTPConnection(self._host, self._port, timeout=t)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            conn.close()
            raise RpcError(f"{method} {self.base_url}{path}: {e!r}") from None
        if resp.status >= 400:
            try:
                payload = _decode(resp.read())
            finally:
                conn.close()
            raise _http_error(method, self.base_url + path, resp.status, payload)
        return resp

    def close(self) -> None:
        self._drop()


def _decode(raw: bytes) -> Any:
    """JSON of a body; an error page that is not JSON (a proxy's, say) comes back as text."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def _http_error(method: str, url: str, status: int, payload: Any) -> RpcError:
    detail = payload.get("detail") if isinstance(payload, dict) else payload
    return RpcError(f"{method} {url}: HTTP {status}: {detail}", status, detail)


def retry(
    fn: Callable[[], Any],
    *,
    attempts: int,
    delay: float = 0.2,
    max_delay: float = 5.0,
    retry_on: Callable[[RpcError], bool] = lambda e: e.unreachable or (e.status or 0) >= 500,
) -> Any:
    """Call `fn` until it succeeds, at most `attempts` times, backing off between tries."""
    for i in range(attempts):
        try:
            return fn()
        except RpcError as e:
            if i == attempts - 1 or not retry_on(e):
                raise
            time.sleep(min(max_delay, delay * (2**i)))
    raise AssertionError("unreachable")
