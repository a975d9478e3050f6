"""FastAPI dependencies: the app's settings, model registry and metrics, and the API key check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .auth import authenticate
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
    """Bearer token on the POST routes (ApiKeyMiddleware checks it before the body is read; this
    dependency puts the requirement in the OpenAPI schema and checks again, at no cost)."""
    authenticate(settings.tenants(), None if credentials is None else f"Bearer {credentials.credentials}")
