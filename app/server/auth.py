"""The API key check, made before a request's body is read or parsed (so that a client without the key
learns nothing else: malformed JSON with no key is a 401, not a 400). The key names the request's tenant
(tenants.py); a tenant with a cap on requests in progress gets 429 past it."""

from __future__ import annotations

import collections
import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError, TooManyRequests, Unauthorized, error_response
from .metrics import ServerMetrics
from .settings import Settings
from .tenants import TENANT_STATE, Tenant

BEARER = "bearer "


def authenticate(tenants: list[Tenant], authorization: str | None) -> Tenant | None:
    """The tenant whose key `authorization` ("Bearer <key>") carries; None when the server has no keys.
    Unauthorized when it names none. Every key is compared in constant time."""
    if not tenants:
        return None
    if not authorization or not authorization.lower().startswith(BEARER):
        raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
    given = authorization[len(BEARER) :].strip().encode()
    found = None
    for tenant in tenants:
        if secrets.compare_digest(given, tenant.key.encode()):
            found = tenant
    if found is None:
        raise Unauthorized("wrong API key")
    return found


class ApiKeyMiddleware:
    """POST requests (the routes that compute) need a key; it is checked here, before the body, and its
    tenant noted in the request's state, where routes and metrics find it."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: ServerMetrics) -> None:
        self.app = app
        self.tenants = settings.tenants()
        self.metrics = metrics
        self.in_progress: collections.Counter[str] = collections.Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not self.tenants:
            await self.app(scope, receive, send)
            return
        authorization = dict(scope.get("headers", ())).get(b"authorization", b"").decode("latin-1")
        try:
            tenant = authenticate(self.tenants, authorization)
            assert tenant is not None
            if tenant.max_in_progress is not None and self.in_progress[tenant.name] >= tenant.max_in_progress:
                raise TooManyRequests(
                    f"tenant {tenant.name!r} already has {tenant.max_in_progress} requests in progress, its limit"
                )
        except ApiError as error:
            self.metrics.failures.labels(reason=error.type).inc()
            await error_response(error, scope["path"])(scope, receive, send)
            return
        scope.setdefault("state", {})[TENANT_STATE] = tenant
        self.in_progress[tenant.name] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress[tenant.name] -= 1
