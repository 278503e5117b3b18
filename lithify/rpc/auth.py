"""The instance secret: every process-to-process call carries it, and servers refuse calls without.

The secret is made once when an instance is initialised and kept as the system property
`instance.secret` in the metadata store, which every process of the instance can already read.
Servers compare it in constant time; a call without it, or with a wrong one, gets 401 before
any handler runs, so it changes nothing.
"""

from __future__ import annotations

import hmac
import secrets

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

SECRET_HEADER = "X-Lithify-Secret"
#: ASGI gives header names lower-cased, as bytes.
_HEADER_KEY = SECRET_HEADER.lower().encode("latin-1")
SECRET_PROPERTY = "instance.secret"
#: Paths anyone may read: the API description, so operators can see what a server offers.
PUBLIC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect"})


def new_secret() -> str:
    return secrets.token_urlsafe(32)


class SecretMiddleware:
    """Refuse (401) any call whose secret header does not match the instance secret.

    A plain ASGI middleware rather than a `BaseHTTPMiddleware`: the latter wraps every call in
    extra tasks and streams, which halved the rate of small calls (heartbeats, job requests).
    """

    def __init__(self, app: ASGIApp, secret: str) -> None:
        if not secret:
            raise ValueError("an instance secret is required")
        self.app = app
        self._secret = secret.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            given = b""
            for name, value in scope["headers"]:
                if name == _HEADER_KEY:
                    given = value
                    break
            if not hmac.compare_digest(given, self._secret):
                deny = JSONResponse({"detail": "missing or wrong instance secret"}, status_code=401)
                await deny(scope, receive, send)
                return
        await self.app(scope, receive, send)
