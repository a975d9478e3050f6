"""POST /sample and POST /complete: generate images, answered as JSON, a PNG, or a stream of rows."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from app.engine import GenerationRequest

from ..deps import MetricsDep, RegistryDep, SettingsDep, require_api_key
from ..errors import InvalidRequest
from ..inputs import decode_images, generation_request, read_upload
from ..jobs import GenerationRun
from ..metrics import ServerMetrics
from ..outputs import SSE_HEADERS, choose_format, generation_headers, generation_png
from ..registry import ServedModel
from ..schemas import (
    ERROR_RESPONSES,
    UPLOAD_RESPONSES,
    CompleteFields,
    CompleteRequest,
    GenerationFields,
    GenerationResponse,
    SampleRequest,
)
from ..settings import Settings
from ..tenants import request_budget
from .docs import upload_body

log = logging.getLogger("pixelcnn.server")

router = APIRouter(tags=["generation"], dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)

GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": GenerationResponse,
        "description": "JSON; with Accept: image/png the PNG (a grid if n > 1, headers X-Seed, X-Labels); "
        "every format has the X-Numerics header (the `numerics` field); "
        "with stream or Accept: text/event-stream, SSE `row` events then `done` (the JSON) or `error`",
        "content": {"image/png": {}, "text/event-stream": {}},
    }
}


@router.post("/sample", summary="sample new images", responses=GENERATION_RESPONSES)
async def sample(
    body: SampleRequest, request: Request, registry: RegistryDep, settings: SettingsDep, metrics: MetricsDep
) -> Response:
    model = registry.get(body.model)
    engine_request = generation_request(model, body, settings)
    return await respond(model, engine_request, False, request, metrics, settings, body)


@router.post(
    "/complete",
    summary="complete the lower rows of an image",
    responses={**GENERATION_RESPONSES, **UPLOAD_RESPONSES},
    openapi_extra=upload_body(CompleteFields, CompleteRequest, repeated=False),
)
async def complete(request: Request, registry: RegistryDep, settings: SettingsDep, metrics: MetricsDep) -> Response:
    fields, files = await read_upload(request, settings, CompleteFields)
    if len(files) > 1:
        raise InvalidRequest(f"/complete takes one image, got {len(files)}", field="image")
    model = registry.get(fields.model)
    known = decode_images(model, files, settings, "image")
    engine_request = generation_request(model, fields, settings, known, fields.rows, fields.label_mode, fields.pixels)
    return await respond(model, engine_request, True, request, metrics, settings, fields)


async def respond(
    model: ServedModel,
    engine_request: GenerationRequest,
    completion: bool,
    request: Request,
    metrics: ServerMetrics,
    settings: Settings,
    fields: GenerationFields,
) -> Response:
    fmt = choose_format(request.headers.get("accept"), fields.stream)
    run = start_run(model, engine_request, completion, request, metrics, settings, fmt == "sse", fields.scale)
    if fmt == "sse":
        headers = {**SSE_HEADERS, "X-Model": model.name, "X-Seed": str(run.seed), "X-Numerics": model.numerics}
        return RunStreamingResponse(run, media_type="text/event-stream", headers=headers)
    result = await run.result()
    if fmt == "png":
        return Response(
            generation_png(result, fields.scale),
            media_type="image/png",
            headers={**generation_headers(model, result, run.seed), **run.server_timing()},
        )
    return JSONResponse(run.body(result), headers={"X-Numerics": model.numerics, **run.server_timing()})


def start_run(
    model: ServedModel,
    engine_request: GenerationRequest,
    completion: bool,
    request: Request,
    metrics: ServerMetrics,
    settings: Settings,
    stream_rows: bool,
    png_scale: int = 1,
) -> GenerationRun:
    """Submit a generation for any front end (native, OpenAI, V2): the access log's model and image count,
    the images-per-request metric by route, the request's time limit, and its priority, tenant and deadline
    (X-Priority, the API key, X-Request-Timeout) are the same for all."""
    budget = request_budget(request)  # priority, tenant and deadline: the scheduler's business
    engine_request.priority, engine_request.tenant, engine_request.deadline = (
        budget.priority,
        budget.tenant,
        budget.deadline,
    )
    request.state.model, request.state.images = model.name, engine_request.n  # for the access log
    metrics.request_images.labels(route=request.url.path).observe(engine_request.n)
    return GenerationRun(
        model,
        engine_request,
        completion,
        request,
        metrics,
        stream_rows=stream_rows,
        time_limit_s=settings.request_timeout_s,
        png_scale=png_scale,
    )


CUT_GRACE_S = 5.0


class RunStreamingResponse(StreamingResponse):
    """Streams a GenerationRun's SSE events and closes the run however the response ends, even when it
    is cancelled before the body generator ever started (which would skip the generator's finally)."""

    def __init__(self, run: GenerationRun, events: AsyncIterator[str] | None = None, **kwargs: Any) -> None:
        """`events`: the SSE text to send (a protocol front end's own events); default: the run's own."""
        super().__init__(events if events is not None else run.sse(), **kwargs)
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A client that stops reading blocks the body in `send`, where no error event can reach it: past
        # the time limit (and a grace for the error event itself) the response is cut, which closes the
        # connection and frees everything the stream held.
        try:
            with anyio.move_on_after(self.run.time_limit_s + CUT_GRACE_S) as scope_:
                await super().__call__(scope, receive, send)
            if scope_.cancelled_caught:
                log.warning("stream cut: its client read nothing for the request's time limit")
                self.run.metrics.failures.labels(reason="stream_cut").inc()
        finally:
            await self.run.close()
