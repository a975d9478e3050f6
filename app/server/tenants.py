"""API keys naming tenants (PIXELCNN_API_KEYS), each with an optional priority and request cap, and what
a request asks of the scheduler: its priority and deadline (headers X-Priority, X-Request-Timeout).

PIXELCNN_API_KEYS="premium:k3y-one:2:16,bulk:k3y-two:0:4,team:k3y-three" names three tenants: a name,
its bearer key, then optionally its priority (0 low, 1 normal, 2 high; default 1: the highest a request
with this key may ask for, and what it gets unless it asks for less) and its cap on requests in progress
at once (default none; past it, 429). The scheduler admits by priority, then tenants in turn, so one
tenant's burst cannot starve another.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from starlette.requests import Request

from .errors import InvalidRequest

PRIORITY_NAMES = {"low": 0, "normal": 1, "high": 2}
DEFAULT_PRIORITY = 1
ANONYMOUS = "anonymous"  # the tenant of requests when the server has no key list
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")


@dataclass(frozen=True)
class Tenant:
    name: str
    key: str
    priority: int = DEFAULT_PRIORITY
    max_in_progress: int | None = None


def parse_tenants(spec: str) -> list[Tenant]:
    """ "name:key[:priority[:max_in_progress]],..." -> tenants; ValueError naming the bad entry."""
    tenants: list[Tenant] = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        parts = entry.split(":")
        if not 2 <= len(parts) <= 4 or not _NAME.fullmatch(parts[0]) or not parts[1]:
            raise ValueError(
                f"API key entry {parts[0]!r}: expected name:key[:priority[:max_in_progress]], a name of "
                "letters, digits, '_', '.', '-' (at most 32)"
            )
        priority = int(parts[2]) if len(parts) > 2 and parts[2] else DEFAULT_PRIORITY
        cap = int(parts[3]) if len(parts) > 3 and parts[3] else None
        if priority not in (0, 1, 2) or (cap is not None and cap < 1):
            raise ValueError(f"API key entry {parts[0]!r}: priority must be 0, 1 or 2 and max_in_progress >= 1")
        tenants.append(Tenant(parts[0], parts[1], priority, cap))
    names = [tenant.name for tenant in tenants]
    if len(set(names)) != len(names) or len({tenant.key for tenant in tenants}) != len(tenants):
        raise ValueError("API key entries must have distinct names and distinct keys")
    return tenants


@dataclass(frozen=True)
class Budget:
    """What a request asks of the scheduler."""

    tenant: str
    priority: int
    deadline: float | None  # time.monotonic()


def request_budget(request: Request) -> Budget:
    """The request's tenant (set by ApiKeyMiddleware), priority (X-Priority, capped at its tenant's) and
    deadline (X-Request-Timeout seconds from now); 400 naming the header when one is malformed."""
    tenant: Tenant | None = request.scope.get("state", {}).get(TENANT_STATE)
    cap = tenant.priority if tenant is not None else max(PRIORITY_NAMES.values())
    priority = tenant.priority if tenant is not None else DEFAULT_PRIORITY
    asked = request.headers.get("x-priority")
    if asked is not None:
        value = PRIORITY_NAMES.get(asked.strip().lower(), asked.strip())
        if str(value) not in ("0", "1", "2"):
            raise InvalidRequest(
                f"X-Priority must be 0, 1, 2 or low, normal, high, got {asked[:20]!r}", field="X-Priority"
            )
        priority = min(int(value), cap)
    deadline = None
    timeout = request.headers.get("x-request-timeout")
    if timeout is not None:
        try:
            seconds = float(timeout)
        except ValueError:
            seconds = float("nan")
        if not 0 < seconds <= 86400:
            raise InvalidRequest(
                f"X-Request-Timeout must be seconds between 0 and 86400, got {timeout[:20]!r}",
                field="X-Request-Timeout",
            )
        deadline = time.monotonic() + seconds
    return Budget(tenant.name if tenant is not None else ANONYMOUS, priority, deadline)


TENANT_STATE = "pixelcnn.tenant"  # key of the request's Tenant in the ASGI scope's state
