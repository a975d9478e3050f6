"""FastAPI dependencies: the app's settings, model registry and metrics, and the API key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import Unauthorized
from .metrics import ServerMetrics
from .registry import ModelRegistry
from .settings import Settings

# All async: FastAPI runs a plain `def` dependency in its thread pool, a hop per dependency per request
# that these lookups do not need (and that slowed bursts of requests when the decode lanes are busy).


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_metrics(request: Request) -> ServerMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[ServerMetrics, Depends(get_metrics)]

_bearer = HTTPBearer(auto_error=False, description="PIXELCNN_API_KEY, when the server sets one")


async def require_api_key(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Bearer token check on the POST routes; a no-op unless PIXELCNN_API_KEY is set."""
    if settings.api_key is None:
        return
    if credentials is None:
        raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
    expected = settings.api_key.get_secret_value().encode()
    if not secrets.compare_digest(credentials.credentials.encode(), expected):
        raise Unauthorized("wrong API key")
