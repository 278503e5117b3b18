"""The instance secret: every process-to-process call carries it, and servers refuse calls without.

The secret is made once when an instance is initialised and kept as the system property
`instance.secret` in the metadata store, which every process of the instance can already read.
Servers compare it in constant time; a call without it, or with a wrong one, gets 401 before
any handler runs, so it changes nothing.
"""

from __future__ import annotations

import hmac
import secrets

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

SECRET_HEADER = "X-Lithify-Secret"
SECRET_PROPERTY = "instance.secret"
#: Paths anyone may read: the API description, so operators can see what a server offers.
PUBLIC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect"})


def new_secret() -> str:
    return secrets.token_urlsafe(32)


class SecretMiddleware(BaseHTTPMiddleware):
    """Refuse (401) any call whose secret header does not match the instance secret."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        super().__init__(app)
        if not secret:
            raise ValueError("an instance secret is required")
        self._secret = secret.encode()

    async def dispatch(self, request: Request, call_next) -> Response:  # type: ignore[no-untyped-def]
        if request.url.path not in PUBLIC_PATHS:
            given = request.headers.get(SECRET_HEADER, "").encode()
            if not hmac.compare_digest(given, self._secret):
                return JSONResponse({"detail": "missing or wrong instance secret"}, status_code=401)
        return await call_next(request)
