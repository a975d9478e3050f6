"""The Open Inference Protocol V2 (KServe, Triton, OpenVINO Model Server), a front end on the same engine.

    GET  /v2, /v2/health/live, /v2/health/ready           server metadata and health
    GET  /v2/models/{m}[/versions/1][/ready]              a model's tensors, and whether it serves
    POST /v2/models/{m}[/versions/1]/infer                scoring: IMAGE [, LABEL] -> LOG_PROB, BITS_PER_DIM,
                                                          PER_PIXEL_NLL (the engine's likelihood, as /likelihood)
    POST /v2/models/{m}[/versions/1]/generate[_stream]    Triton's generate extension: /sample's fields

Tensors travel as JSON or with the binary tensor data extension (v2_tensors.py). Errors on /v2 are V2's
`{"error": "..."}` (errors.PROTOCOL_ERROR_FORMATS). Every model has one version, "1".
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from app.engine import SampleResult

from ..deps import MetricsDep, RegistryDep, SettingsDep, require_api_key
from ..errors import InvalidRequest, NotFound, inference_v2_error_body, loads, shown
from ..inputs import check_scoring_cost, generation_request, validate
from ..jobs import GenerationRun, score, stream_error_body
from ..metrics import ServerMetrics
from ..outputs import SSE_HEADERS, row_data
from ..registry import ModelRegistry, ServedModel
from ..schemas import SampleRequest
from ..settings import Settings
from ..tenants import request_budget
from ..v2_tensors import HEADER_LENGTH, InferRequest, Tensor, encode_response, parse_infer_request
from .generation import RunStreamingResponse, start_run

SERVER_NAME = "pixelcnn-server"
VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "generate"]
V2_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "content": {"application/json": {"schema": V2_ERROR}}}
    for status, description in {
        400: "invalid input",
        401: "missing or wrong API key",
        404: "unknown model or version",
        413: "body over max_upload_bytes",
        503: "queue full (Retry-After) or not ready",
    }.items()
}

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"], responses=ERRORS)
AUTH = [Depends(require_api_key)]  # on the POST routes, as on the native ones


def tensor_spec(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def model_inputs(model: ServedModel) -> list[dict[str, Any]]:
    """IMAGE always; LABEL on a class-conditional model (optional: without it the exact marginal)."""
    inputs = [tensor_spec("IMAGE", "UINT8", [-1, *model.config.shape])]
    if model.config.conditional:
        inputs.append(tensor_spec("LABEL", "INT64", [-1]))
    return inputs


def model_outputs(model: ServedModel) -> list[dict[str, Any]]:
    return [
        tensor_spec("LOG_PROB", "FP64", [-1]),
        tensor_spec("BITS_PER_DIM", "FP32", [-1]),
        tensor_spec("PER_PIXEL_NLL", "FP32", [-1, *model.config.shape]),
    ]


DEFAULT_OUTPUTS = ("LOG_PROB", "BITS_PER_DIM")  # PER_PIXEL_NLL only when asked for: it is C*H*W per image


@router.get("", summary="server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/health/live", summary="the process is up")
async def live() -> dict[str, Any]:
    return {"live": True}


@router.get("/health/ready", summary="every model is loaded and serving")
async def ready(registry: RegistryDep) -> JSONResponse:
    reason = registry.not_ready_reason
    if reason is not None:
        return JSONResponse({"ready": False, "error": reason}, status_code=503)
    return JSONResponse({"ready": True})


def served(registry: ModelRegistry, name: str, version: str | None) -> ServedModel:
    model = registry.get(name)
    if version not in (None, VERSION):
        raise NotFound(
            f"model {name!r} has no version {shown(version)}; its only version is {VERSION!r}", field="version"
        )
    return model


@router.get("/models/{name}", summary="a model's metadata: its tensors")
@router.get("/models/{name}/versions/{version}", summary="a model's metadata: its tensors")
async def model_metadata(name: str, registry: RegistryDep, version: str | None = None) -> dict[str, Any]:
    model = served(registry, name, version)
    return {
        "name": model.name,
        "versions": [VERSION],
        "platform": f"pytorch_pixelcnn_{model.config.arch}",
        "inputs": model_inputs(model),
        "outputs": model_outputs(model),
    }


@router.get("/models/{name}/ready", summary="the model serves")
@router.get("/models/{name}/versions/{version}/ready", summary="the model serves")
async def model_ready(name: str, registry: RegistryDep, version: str | None = None) -> JSONResponse:
    model = served(registry, name, version)
    if not model.engine.running:
        return JSONResponse({"name": model.name, "ready": False, "error": "its engine is not running"}, status_code=503)
    return JSONResponse({"name": model.name, "ready": True})


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object", "properties": {"inputs": {"type": "array"}}}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"binary tensor data extension: the JSON header ({HEADER_LENGTH} bytes) then the "
                "inputs' raw little-endian bytes",
            },
        },
    }
}


@router.post(
    "/models/{name}/infer", summary="score images: exact log-likelihood", openapi_extra=INFER_BODY, dependencies=AUTH
)
@router.post(
    "/models/{name}/versions/{version}/infer", summary="score images", openapi_extra=INFER_BODY, dependencies=AUTH
)
async def infer(
    name: str,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    version: str | None = None,
) -> Response:
    model = served(registry, name, version)
    parsed = parse_infer_request(await request.body(), request.headers.get(HEADER_LENGTH))
    images, labels = scoring_inputs(model, parsed, settings)
    wanted = requested_outputs(model, parsed)
    request.state.model, request.state.images = model.name, len(images)  # for the access log
    metrics.request_images.labels(route=request.url.path).observe(len(images))
    check_scoring_cost(model, len(images), labels is not None, settings)
    result = await score(model, images, labels, request, metrics, request_budget(request).deadline)
    metrics.scored.labels(model=model.name).inc(len(images))
    nll = np.asarray(result.nll_nats, dtype=np.float64)
    tensors = {
        "LOG_PROB": lambda: Tensor("LOG_PROB", "FP64", -nll),
        "BITS_PER_DIM": lambda: Tensor(
            "BITS_PER_DIM", "FP32", (nll / (model.config.dims * math.log(2))).astype(np.float32)
        ),
        "PER_PIXEL_NLL": lambda: Tensor("PER_PIXEL_NLL", "FP32", np.asarray(result.per_pixel, dtype=np.float32)),
    }
    body, header_length = encode_response(model.name, parsed, [(tensors[out](), binary) for out, binary in wanted])
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


def scoring_inputs(model: ServedModel, parsed: InferRequest, settings: Settings) -> tuple[np.ndarray, list[int] | None]:
    """IMAGE UINT8 [N, C, H, W] and the optional LABEL INT64 [N], checked against the model's metadata."""
    config = model.config
    expected = {spec["name"]: spec for spec in model_inputs(model)}
    unknown = sorted(set(parsed.inputs) - set(expected))
    if unknown:
        raise InvalidRequest(f"unknown input {unknown[0]}: model {model.name!r} takes {', '.join(expected)}")
    if "IMAGE" not in parsed.inputs:
        raise InvalidRequest(f"input IMAGE (UINT8 [-1, {', '.join(map(str, config.shape))}]) is required")
    for tensor in parsed.inputs.values():
        spec = expected[tensor.name]
        shape = list(tensor.array.shape)
        if (
            tensor.datatype != spec["datatype"]
            or len(shape) != len(spec["shape"])
            or any(want not in (-1, got) for want, got in zip(spec["shape"], shape))
        ):
            raise InvalidRequest(
                f"input {tensor.name} must be {spec['datatype']} of shape {spec['shape']} (-1: any), "
                f"got {tensor.datatype} of shape {shape}"
            )
    images = parsed.inputs["IMAGE"].array
    limit = settings.max_images_per_request
    if not 1 <= len(images) <= limit:
        raise InvalidRequest(f"IMAGE holds {len(images)} images: give 1..{limit} (the per-request image limit)")
    if "LABEL" not in parsed.inputs:
        return images, None
    labels = parsed.inputs["LABEL"].array.tolist()
    if len(labels) != len(images):
        raise InvalidRequest(f"LABEL has {len(labels)} values for {len(images)} images: give one per image")
    bad = [label for label in labels if not 0 <= label < config.num_classes]
    if bad:
        raise InvalidRequest(f"LABEL values must be class indices 0..{config.num_classes - 1}, got {bad[0]}")
    return images, labels


def requested_outputs(model: ServedModel, parsed: InferRequest) -> list[tuple[str, bool]]:
    """(output name, binary?) in the order asked for; the defaults without an outputs list."""
    available = [spec["name"] for spec in model_outputs(model)]
    if parsed.outputs is None:
        return [(name, parsed.binary_outputs) for name in DEFAULT_OUTPUTS]
    wanted = []
    for output in parsed.outputs:
        if output.name not in available:
            raise InvalidRequest(f"unknown output {output.name}: model {model.name!r} has {', '.join(available)}")
        wanted.append((output.name, parsed.binary_outputs if output.binary is None else output.binary))
    return wanted


# The generate extension: /sample's fields in, /sample's body out (with model_name and model_version).


@router.post(
    "/models/{name}/generate", summary="sample images (generate extension): /sample's fields", dependencies=AUTH
)
@router.post("/models/{name}/versions/{version}/generate", summary="sample images", dependencies=AUTH)
async def generate(
    name: str,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    version: str | None = None,
) -> JSONResponse:
    run = await start_generation(served(registry, name, version), request, settings, metrics, stream=False)
    result = await run.result()
    headers = {"X-Numerics": run.model.numerics, **run.server_timing()}
    return JSONResponse(tagged(run, run.body(result)), headers=headers)


@router.post(
    "/models/{name}/generate_stream",
    summary="sample images, streamed (generate extension): SSE data events, one per row, then the result",
    responses={200: {"content": {"text/event-stream": {}}}},
    dependencies=AUTH,
)
@router.post(
    "/models/{name}/versions/{version}/generate_stream",
    summary="sample images, streamed",
    responses={200: {"content": {"text/event-stream": {}}}},
    dependencies=AUTH,
)
async def generate_stream(
    name: str,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    version: str | None = None,
) -> Response:
    run = await start_generation(served(registry, name, version), request, settings, metrics, stream=True)
    headers = {**SSE_HEADERS, "X-Model": run.model.name, "X-Seed": str(run.seed), "X-Numerics": run.model.numerics}
    return RunStreamingResponse(run, generate_events(run), media_type="text/event-stream", headers=headers)


async def start_generation(
    model: ServedModel, request: Request, settings: Settings, metrics: ServerMetrics, stream: bool
) -> GenerationRun:
    """A generate request's run: the model is known (a 404 comes before anything about the body)."""
    body = loads(await request.body() or b"{}")
    if not isinstance(body, dict):
        raise InvalidRequest("expected a JSON object with /sample's fields (n, label, temperature, seed)")
    if "model" in body or "stream" in body:
        raise InvalidRequest("the model is in the path and streaming is /generate_stream: drop model and stream")
    fields = validate(SampleRequest, body)
    return start_run(model, generation_request(model, fields, settings), False, request, metrics, settings, stream)


def tagged(run: GenerationRun, data: dict[str, Any]) -> dict[str, Any]:
    return {"model_name": run.model.name, "model_version": VERSION, **data}


def data_event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def generate_events(run: GenerationRun) -> AsyncIterator[str]:
    """Triton's generate_stream: one `data:` JSON object per row ({row, pixels}), then the /sample body;
    `{"error": ...}` if the generation fails or runs past the time limit. The run is closed however it ends."""
    try:
        async with aclosing(run.events()) as events:
            async for event in events:
                if isinstance(event, SampleResult):
                    yield data_event(tagged(run, run.body(event)))
                    return
                yield data_event(tagged(run, row_data(event.row, event.pixels)))
        if run.timed_out:
            yield data_event(inference_v2_error_body(run.timeout_error()))
    except Exception as error:  # noqa: BLE001 - reported to the client as an event
        run.metrics.failures.labels(reason="stream_error").inc()
        yield data_event({"error": stream_error_body(error, run.model.name)["error"]["message"]})
    finally:
        await run.close()
