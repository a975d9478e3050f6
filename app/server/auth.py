"""The API key check, made before a request's body is read or parsed (so that a client without the key
learns nothing else: malformed JSON with no key is a 401, not a 400)."""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import Unauthorized, error_response
from .metrics import ServerMetrics
from .settings import Settings

BEARER = "bearer "


def check_api_key(settings: Settings, authorization: str | None) -> None:
    """Unauthorized unless `authorization` is "Bearer <PIXELCNN_API_KEY>"; a no-op without a key."""
    if settings.api_key is None:
        return
    if not authorization or not authorization.lower().startswith(BEARER):
        raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
    expected = settings.api_key.get_secret_value().encode()
    if not secrets.compare_digest(authorization[len(BEARER) :].strip().encode(), expected):
        raise Unauthorized("wrong API key")


class ApiKeyMiddleware:
    """POST requests (the routes that compute) need the key; it is checked here, before the body."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: ServerMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self.settings.api_key is not None:
            authorization = dict(scope.get("headers", ())).get(b"authorization", b"").decode("latin-1")
            try:
                check_api_key(self.settings, authorization)
            except Unauthorized as error:
                self.metrics.failures.labels(reason=error.type).inc()
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
