"""Optional bearer token (ZOO_API_TOKEN): every route but the health checks needs `Authorization: Bearer <token>`."""

from __future__ import annotations

import secrets

from api.limits import ASGIApp, Receive, Scope, Send, send_error

OPEN_PATHS = ("/health/", "/v2/health/")
"""Probes of orchestrators carry no credentials, so liveness and readiness stay open."""


class BearerAuth:
    """ASGI middleware comparing the bearer token in constant time; 401 with WWW-Authenticate otherwise."""

    def __init__(self, app: ASGIApp, *, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        given = b""
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                scheme, _, given = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    given = b""
        if not secrets.compare_digest(given.strip(), self.token):
            await send_error(send, 401, "missing or wrong bearer token; send 'Authorization: Bearer <token>' with "
                                        "the server's ZOO_API_TOKEN", {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)
