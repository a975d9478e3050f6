"""The OpenAI Images API, a front end on the same engine as /sample and /complete.

    POST /v1/images/generations   -> a generation (prompt = class name)     as /sample
    POST /v1/images/edits         -> a completion (mask = pixels to draw)   as /complete
    GET  /v1/models[/{id}]        -> the loaded models, in OpenAI's list shape

Requests become the engine's GenerationRequest through the same `generation_request` as the native routes
(so limits, labels, seeds and temperatures mean the same), run as a GenerationRun (the same cancellation on
disconnect, time limit, metrics and request ids), and their results are encoded the OpenAI way. Errors on
/v1/* come in OpenAI's format (errors.PROTOCOL_ERROR_FORMATS).
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from app.engine import GenerationRequest, SampleResult
from app.imaging import ImageDecodeError, decode_alpha, encode_image

from ..deps import MetricsDep, RegistryDep, SettingsDep, require_api_key
from ..errors import HttpError, InvalidRequest, UnsupportedMediaType, openai_error_body
from ..inputs import class_index, decode_images, form_parts, generation_request, media_type, validate
from ..jobs import GenerationRun, stream_error_body
from ..metrics import ServerMetrics
from ..openai_schemas import (
    OPENAI_ERROR_RESPONSES,
    OpenAIImageFields,
    OpenAIImageGenerationRequest,
    OpenAIImagesResponse,
    OpenAIModelList,
)
from ..outputs import SSE_HEADERS, generation_headers, sse_event
from ..registry import ServedModel
from ..schemas import GenerationFields
from ..settings import Settings
from .generation import RunStreamingResponse, start_run

router = APIRouter(prefix="/v1", tags=["openai"], responses=OPENAI_ERROR_RESPONSES)

OWNER = "pixelcnn-server"
MASK_RULE = (
    "Possible masks: opaque pixels from the top-left corner in raster order (whole top rows, optionally followed "
    "by the start of the next row) and fully transparent pixels (alpha 0) from there to the bottom-right corner. "
    "The model draws pixels in raster order (row by row, left to right), each conditioned only on the pixels "
    "before it, so it can generate exactly the pixels after the last kept one."
)


@router.get("/models", response_model=OpenAIModelList, summary="loaded models (OpenAI's list shape)")
async def list_models(registry: RegistryDep) -> dict[str, Any]:
    return {"object": "list", "data": [openai_model(model) for _, model in sorted(registry.models.items())]}


@router.get("/models/{model_id}", summary="one model (OpenAI's shape)")
async def get_model(model_id: str, registry: RegistryDep) -> dict[str, Any]:
    return openai_model(registry.get(model_id))


def openai_model(model: ServedModel) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": int(model.path.stat().st_mtime), "owned_by": OWNER}


IMAGES_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": OpenAIImagesResponse,
        "description": "JSON; with stream, SSE events <kind>.partial_image (partial_images of them) then "
        "<kind>.completed, one per image, or an `error` event",
        "content": {"text/event-stream": {}},
    }
}


@router.post(
    "/images/generations",
    summary="generate images (OpenAI Images API): prompt = class name",
    responses=IMAGES_RESPONSES,
    dependencies=[Depends(require_api_key)],
)
async def generations(
    body: OpenAIImageGenerationRequest,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> Response:
    model = registry.get(body.model)
    engine_request = generation_request(model, native_fields(model, body), settings)
    return await respond(model, engine_request, body, "image_generation", request, metrics, settings)


def edit_body() -> dict[str, Any]:
    form = OpenAIImageFields.model_json_schema()
    file = {"type": "string", "format": "binary"}
    form["properties"] = {"image": file, "mask": file, **form["properties"]}
    form["required"] = ["image"]
    form.pop("additionalProperties", None)
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}


@router.post(
    "/images/edits",
    summary="complete an image (OpenAI Images API): the mask's transparent pixels are generated",
    responses=IMAGES_RESPONSES,
    dependencies=[Depends(require_api_key)],
    openapi_extra=edit_body(),
)
async def edits(request: Request, registry: RegistryDep, settings: SettingsDep, metrics: MetricsDep) -> Response:
    fields, image, mask = await read_edit_form(request, settings)
    model = registry.get(fields.model)
    known = decode_images(model, [image], settings, "image")
    kept = kept_pixels(model, mask if mask is not None else image, "mask" if mask is not None else "image")
    engine_request = generation_request(model, native_fields(model, fields), settings, known, pixels=kept)
    return await respond(model, engine_request, fields, "image_edit", request, metrics, settings, completion=True)


def native_fields(model: ServedModel, fields: OpenAIImageFields) -> GenerationFields:
    """The OpenAI fields as the native API's: prompt -> label; the OpenAI-only fields checked here."""
    c, h, w = model.config.shape
    if fields.size not in (None, "auto", f"{w}x{h}"):
        raise InvalidRequest(
            f'size must be "{w}x{h}" (WIDTHxHEIGHT: model {model.name!r} makes {w}x{h} images only) or "auto", '
            f"got {fields.size!r}",
            field="size",
        )
    if fields.response_format == "url":
        raise InvalidRequest(
            'response_format "url" is not supported: this server keeps no images to serve at a URL; use "b64_json" '
            "(the default)",
            field="response_format",
        )
    if fields.background == "transparent":
        raise InvalidRequest('background "transparent" is not supported: the images are opaque', field="background")
    label = prompt_label(model, fields.prompt)
    native = {
        "model": fields.model,
        "n": fields.n,
        "label": label,
        "temperature": fields.temperature,
        "seed": fields.seed,
    }
    return GenerationFields.model_validate(native)


def prompt_label(model: ServedModel, prompt: str) -> int | None:
    """The prompt names a class (as `label` does on /sample); empty: no class given."""
    text = prompt.strip()
    if not text:
        return None
    if not model.config.conditional:
        raise InvalidRequest(
            f"model {model.name!r} is unconditional: the prompt must be empty (it has no classes to name), "
            f"got {prompt!r}",
            field="prompt",
        )
    return class_index(model, text, "prompt")


EDIT_FILES = {"image": "image", "image[]": "image", "mask": "mask"}  # the SDK sends a list of images as image[]


async def read_edit_form(request: Request, settings: Settings) -> tuple[OpenAIImageFields, bytes, bytes | None]:
    """The multipart form of an edit -> (validated fields, image file, mask file or None)."""
    if media_type(request) != "multipart/form-data":
        raise UnsupportedMediaType(
            f"Content-Type {media_type(request)!r} is not supported: send multipart/form-data with an image file "
            "and an optional mask file (curl -F image=@picture.png -F mask=@mask.png)"
        )
    files: dict[str, list[bytes]] = {"image": [], "mask": []}
    fields: dict[str, str] = {}
    async with form_parts(request, max_files=len(EDIT_FILES), max_part_size=settings.max_upload_bytes) as form:
        for key, value in form.multi_items():
            if key in EDIT_FILES:
                if not isinstance(value, UploadFile):
                    raise InvalidRequest(f"{key} must be an uploaded file, e.g. curl -F {key}=@picture.png", field=key)
                files[EDIT_FILES[key]].append(await value.read())
            elif isinstance(value, UploadFile):
                raise InvalidRequest(f"{key} must be a plain form field, not a file", field=key)
            elif key in fields:
                raise InvalidRequest(f"{key} was given twice; give it once", field=key)
            elif value.strip() != "":  # curl -F seed= means "not given"
                fields[key] = value.strip()
    for name, given in files.items():
        if len(given) > 1:
            raise InvalidRequest(f"{len(given)} {name} files given: give one", field=name)
    if not files["image"]:
        raise InvalidRequest(
            "no image given: send the image to edit as a file (curl -F image=@picture.png)", field="image"
        )
    mask = files["mask"][0] if files["mask"] else None
    return validate(OpenAIImageFields, fields, form=True), files["image"][0], mask


def kept_pixels(model: ServedModel, data: bytes, field: str) -> int:
    """How many pixels, in raster order, a mask keeps: the ones before its first fully transparent pixel.
    Every pixel from there on must be transparent too (400 otherwise, explaining which masks work)."""
    _, h, w = model.config.shape
    try:
        alpha = decode_alpha(data, h, w)
    except ImageDecodeError as error:
        raise InvalidRequest(f"{field}: {error} (model {model.name!r})", field=field) from None
    if alpha is None:
        raise InvalidRequest(
            f"the {field} has no alpha channel: send a mask (an RGBA or LA PNG) whose fully transparent pixels "
            f"(alpha 0) are the ones to generate{'' if field == 'mask' else ', or an image with such pixels'}. "
            + MASK_RULE,
            field=field,
        )
    transparent = (alpha == 0).reshape(-1)
    if not transparent.any():
        raise InvalidRequest(
            f"the {field} has no fully transparent pixel (alpha 0): nothing to generate. {MASK_RULE}", field=field
        )
    first = int(transparent.argmax())
    if not transparent[first:].all():
        stray = first + int((~transparent[first:]).argmax())
        raise InvalidRequest(
            f"the {field}'s transparent pixels are not a raster-order suffix: the first is at row {first // w}, "
            f"column {first % w}, but row {stray // w}, column {stray % w} after it is not transparent. {MASK_RULE}",
            field=field,
        )
    return first


async def respond(
    model: ServedModel,
    engine_request: GenerationRequest,
    fields: OpenAIImageFields,
    kind: str,
    request: Request,
    metrics: ServerMetrics,
    settings: Settings,
    completion: bool = False,
) -> Response:
    run = start_run(model, engine_request, completion, request, metrics, settings, stream_rows=fields.stream)
    if fields.stream:
        headers = {**SSE_HEADERS, "X-Model": model.name, "X-Seed": str(run.seed), "X-Numerics": model.numerics}
        events = image_events(run, fields, kind)
        return RunStreamingResponse(run, events, media_type="text/event-stream", headers=headers)
    result = await run.result()
    body = {
        "created": int(time.time()),
        "data": [{"b64_json": encoded(image, fields)} for image in np.asarray(result.images)],
        **image_settings(model, fields),
    }
    return JSONResponse(body, headers={**generation_headers(model, result, run.seed), **run.server_timing()})


def encoded(image: np.ndarray, fields: OpenAIImageFields) -> str:
    return base64.b64encode(encode_image(image, fields.output_format, fields.output_compression)).decode("ascii")


def image_settings(model: ServedModel, fields: OpenAIImageFields) -> dict[str, str]:
    _, h, w = model.config.shape
    return {"output_format": fields.output_format, "size": f"{w}x{h}", "background": "opaque"}


def partial_rows(first: int, height: int, count: int) -> list[int]:
    """The rows after which the `count` partial images go out: spread evenly over the generated rows
    first..height-1, none at the last (the completed image follows it); fewer if there are too few rows."""
    generated = height - first
    rows = {first + -(-(i + 1) * generated // (count + 1)) - 1 for i in range(count)}
    return sorted(row for row in rows if first <= row < height - 1)


async def image_events(run: GenerationRun, fields: OpenAIImageFields, kind: str) -> AsyncIterator[str]:
    """OpenAI's stream: `<kind>.partial_image` events (the image so far, rows not yet drawn black) after the
    rows partial_rows picks, then `<kind>.completed`, each for every image in order; an `error` event with
    an OpenAI error if the generation fails or runs past the time limit. The run is closed however it ends."""
    model, request = run.model, run.engine_request
    c, h, w = model.config.shape
    canvas = np.zeros((request.n, c, h, w), dtype=np.uint8)
    if request.known is not None:
        canvas[:] = np.asarray(request.known, dtype=np.uint8)
        canvas[:, :, request.known_rows :] = 0
    checkpoints = partial_rows(request.known_rows, h, fields.partial_images)
    settings = {**image_settings(model, fields), "quality": "auto"}
    try:
        async with aclosing(run.events()) as events:
            async for event in events:
                if isinstance(event, SampleResult):
                    for image in np.asarray(event.images):
                        yield image_event(f"{kind}.completed", image, fields, settings)
                    return
                canvas[:, :, event.row] = np.asarray(event.pixels)
                if event.row in checkpoints:
                    index = checkpoints.index(event.row)
                    for image in canvas:
                        yield image_event(f"{kind}.partial_image", image, fields, settings, partial_image_index=index)
        if run.timed_out:
            yield sse_event("error", openai_error_body(run.timeout_error()))
    except Exception as error:  # noqa: BLE001 - reported to the client as an event
        run.metrics.failures.labels(reason="stream_error").inc()
        native = stream_error_body(error, run.model.name)["error"]
        yield sse_event("error", openai_error_body(HttpError(500, native["type"], native["message"])))
    finally:
        await run.close()


def image_event(kind: str, image: np.ndarray, fields: OpenAIImageFields, settings: dict[str, str], **extra: int) -> str:
    data = {"type": kind, "b64_json": encoded(image, fields), "created_at": int(time.time()), **settings, **extra}
    return sse_event(kind, data)
