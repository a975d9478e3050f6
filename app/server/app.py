"""The FastAPI application: `create_app(settings)`; models are loaded once the server listens (in the
background, so /health answers and /ready says 503 "loading models" meanwhile), never at import.

    uvicorn --factory app.server.app:create_app      # or: pixelcnn serve
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from .auth import ApiKeyMiddleware
from .errors import install_error_handlers
from .faults import LeakPerRequestMiddleware
from .head import HeadAsGetMiddleware
from .limits import BodyLimitMiddleware
from .metrics import MetricsMiddleware, ServerMetrics
from .openapi import served_openapi
from .registry import (
    EngineFactory,
    ModelRegistry,
    default_engine_factory,
    load_and_start,
)
from .routes import demo, generation, health, inference_v2, likelihood, metrics, models, openai_images, redoc
from .settings import Settings

DESCRIPTION = """Sample, complete and score images with PixelCNN models.

Errors on the native routes have the form `{"error": {"type", "message", "field"?}}`: 400 invalid_request (any bad
input), 401 unauthorized, 404 not_found, 408 request_timeout (a head or body sent too slowly),
413 payload_too_large, 415 unsupported_media_type, 429 too_many_requests (a tenant's cap),
431 headers_too_large, 503 overloaded (with Retry-After) or not_ready, 504 timeout (X-Request-Timeout or
the server's limit passed; the request's work is stopped). Optional headers: X-Priority (0-2 or low/normal/high), X-Request-Timeout
(seconds). The protocol front ends answer in their protocols' formats:
the OpenAI Images API under /v1 (`{"error": {"message", "type", "param", "code"}}`), the Open Inference
Protocol V2 under /v2 (`{"error": "..."}`).
"""


def create_app(settings: Settings | None = None, *, engine_factory: EngineFactory | None = None) -> FastAPI:
    """Build the app. `engine_factory(model, settings)` makes each model's engine (tests may wrap it)."""
    settings = settings or Settings()
    factory = engine_factory or default_engine_factory

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.threads:
            from app.engine import set_cpu_threads

            set_cpu_threads(settings.threads)  # process-wide: the engines' decode threads follow it
        # The load runs beside the server rather than before it: uvicorn opens its port only when the
        # lifespan has started, and a gateway or orchestrator should see /health 200 and /ready 503
        # (not a refused connection) while a replica loads.
        registry = app.state.registry = ModelRegistry(loading=True)
        loader = asyncio.create_task(load_and_start(registry, settings, factory))
        try:
            yield
        finally:
            loader.cancel()  # a shutdown during the load: stop loading, then stop what has started
            await asyncio.wait([loader])
            await registry.stop()
            app.state.registry = ModelRegistry(problems=["shutting down"])

    # FastAPIOffline: FastAPI whose /docs and /redoc load Swagger UI and ReDoc from the package, not a CDN.
    app = FastAPIOffline(
        title="PixelCNN server", version="0.1.0", description=DESCRIPTION, lifespan=lifespan, redoc_url=None
    )  # /redoc: routes/redoc.py (ReDoc's logo inlined instead of fetched from its CDN)
    app.state.settings = settings
    app.state.registry = ModelRegistry(problems=["starting up"])
    app.state.metrics = ServerMetrics()
    app.state.metrics.watch(lambda: app.state.registry)

    # PIXELCNN_API_KEY(S) unset: no route asks for a key, and the schema says so.
    app.openapi = served_openapi(app, keep_security=bool(settings.tenants()))  # type: ignore[method-assign]
    install_error_handlers(app)
    for module in (health, models, generation, likelihood, metrics, demo, redoc, openai_images, inference_v2):
        app.include_router(module.router)

    # Added innermost first: HEAD as GET -> body limit -> API key -> CORS (so browsers can read 401s and
    # 413s) -> metrics (outermost, so it sees every status).
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes, metrics=app.state.metrics)
    app.add_middleware(ApiKeyMiddleware, settings=settings, metrics=app.state.metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
            expose_headers=["X-Seed", "X-Labels", "X-Model", "X-Numerics", "X-Request-ID", "Retry-After"],
        )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    if settings.fault_leak_bytes_per_request:
        app.add_middleware(LeakPerRequestMiddleware, bytes_per_request=settings.fault_leak_bytes_per_request)
    return app
