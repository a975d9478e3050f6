"""Decoding requests: JSON or multipart bodies, base64 or uploaded images, class labels, numeric limits.

Every function raises InvalidRequest (400) with a message that says what was wrong and what was
expected, so routes never see malformed input.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine import GenerationRequest
from app.engine.scoring import SCORE_CHUNK_IMAGES, scoring_passes
from app.imaging import ImageDecodeError, decode_image

from .errors import InvalidRequest, UnsupportedMediaType, from_pydantic, loads, not_json_message
from .registry import ServedModel
from .schemas import GenerationFields
from .settings import Settings

Fields = TypeVar("Fields", bound=BaseModel)
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
IMAGE_KEYS = ("image", "images")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


@asynccontextmanager
async def form_parts(request: Request, max_files: int, max_part_size: int) -> AsyncIterator[FormData]:
    """The request's form (its upload files closed at the end), or InvalidRequest saying what was wrong
    with it and how to send one. A multipart body that ends before its closing boundary (an upload cut
    short) is refused: the parser would quietly keep only the parts before the cut."""
    if media_type(request) == "multipart/form-data":  # the boundary as the form parser reads it
        _, options = parse_options_header(request.headers["content-type"])
        closing = b"--" + options.get(b"boundary", b"") + b"--"
        if len(closing) > 4 and closing not in await request.body():
            raise InvalidRequest(
                f"the multipart body ends before its closing boundary {closing!r}: was the upload cut short?"
            )
    try:
        form = await request.form(max_files=max_files, max_part_size=max_part_size)
    except StarletteHTTPException as error:  # the form parser's own complaints
        raise InvalidRequest(
            f"the form could not be read ({error.detail}); send it as curl does: -F name=value -F image=@picture.png"
        ) from None
    try:
        yield form
    finally:
        await form.close()


async def read_upload(request: Request, settings: Settings, fields_model: type[Fields]) -> tuple[Fields, list[bytes]]:
    """A JSON body (images as base64 strings under "image"/"images") or a multipart form (image files
    under "image", repeatable) -> (validated fields, image file bytes in order)."""
    kind = media_type(request)
    if kind == "application/x-www-form-urlencoded" and (await request.body()).lstrip().startswith(b"{"):
        raise InvalidRequest(not_json_message(kind))  # JSON text sent as a form (curl -d without a header)
    if kind in FORM_TYPES:
        return await _read_form(request, settings, fields_model)
    if kind in ("", "application/json") or kind.endswith("+json"):
        return await _read_json(request, fields_model)
    raise UnsupportedMediaType(
        f"Content-Type {kind!r} is not supported: send multipart/form-data with an image file "
        "(curl -F image=@picture.png) or application/json with base64 images"
    )


async def _read_json(request: Request, fields_model: type[Fields]) -> tuple[Fields, list[bytes]]:
    body = loads(await request.body() or b"null")
    if not isinstance(body, dict):
        raise InvalidRequest("expected a JSON object with base64 images, or a multipart form with image files")
    encoded: list[tuple[str, Any]] = []
    if "image" in body:
        encoded.append(("image", body.pop("image")))
    if "images" in body:
        images = body.pop("images")
        if not isinstance(images, list):
            raise InvalidRequest("images must be a list of base64 strings", field="images")
        encoded += [(f"images[{i}]", value) for i, value in enumerate(images)]
    return validate(fields_model, body), [decode_base64(value, field) for field, value in encoded]


async def _read_form(request: Request, settings: Settings, fields_model: type[Fields]) -> tuple[Fields, list[bytes]]:
    images: list[bytes] = []
    fields: dict[str, Any] = {}
    limits = {"max_files": settings.max_images_per_request, "max_part_size": settings.max_upload_bytes}
    async with form_parts(request, **limits) as form:
        for key, value in form.multi_items():
            if key in IMAGE_KEYS:
                if not isinstance(value, UploadFile):
                    raise InvalidRequest(f"{key} must be an uploaded file, e.g. curl -F {key}=@picture.png", field=key)
                images.append(await value.read())
            elif isinstance(value, UploadFile):
                raise InvalidRequest(f"{key} must be a plain form field, not a file", field=key)
            elif value.strip() != "":  # curl -F seed= means "not given"
                fields.setdefault(key, []).append(value.strip())
    flat: dict[str, Any] = {}
    for key, values in fields.items():
        if key == "label":  # label=3, label=sneaker, label=1,2 or repeated label fields
            labels = [part.strip() for v in values for part in v.split(",") if part.strip()]
            flat[key] = labels[0] if len(labels) == 1 else labels
        elif len(values) > 1:
            raise InvalidRequest(f"{key} was given {len(values)} times; give it once", field=key)
        else:
            flat[key] = values[0]
    return validate(fields_model, flat, form=True), images


def validate(fields_model: type[Fields], data: dict[str, Any], form: bool = False) -> Fields:
    try:
        return fields_model.model_validate(data, context={"form": form})
    except ValidationError as error:
        raise from_pydantic(error) from None


def decode_base64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidRequest(f"{field} must be a base64 string", field=field)
    if value.startswith("data:") and "," in value:  # data:image/png;base64,....
        value = value.split(",", 1)[1]
    try:  # line breaks allowed: `base64` and base64.encodebytes wrap their output at 76 characters
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        message = f"{field} is not valid base64 (expected a base64-encoded image file)"
        raise InvalidRequest(message, field=field) from None


def decode_images(model: ServedModel, files: list[bytes], settings: Settings, field: str) -> np.ndarray:
    """Image files -> uint8 (N, C, H, W) in the model's shape, or 400 with decode_image's explanation."""
    if not files:
        raise InvalidRequest(f"no image given: send {field} as a file upload or base64 string", field=field)
    if len(files) > settings.max_images_per_request:
        raise InvalidRequest(
            f"{len(files)} images given, at most {settings.max_images_per_request} per request", field=field
        )
    c, h, w = model.config.shape
    decoded = []
    for i, data in enumerate(files):
        name = field if len(files) == 1 else f"{field}[{i}]"
        try:
            decoded.append(decode_image(data, c, h, w))
        except ImageDecodeError as error:
            raise InvalidRequest(f"{name}: {error} (model {model.name!r})", field=name) from None
    return np.stack(decoded)


def generation_request(
    model: ServedModel,
    fields: GenerationFields,
    settings: Settings,
    known: np.ndarray | None = None,
    rows: int | None = None,
    label_mode: str = "posterior",
    pixels: int | None = None,
) -> GenerationRequest:
    """The one step from validated fields (their static bounds are in the schemas) to the engine's typed
    request: the rules that depend on the model or the settings live here, each once. A completion keeps
    `rows` whole rows or, instead, `pixels` pixels in raster order (which may end mid-row)."""
    limit = min(settings.max_images_per_request, settings.max_batch_images)
    if not fields.n <= limit:
        raise InvalidRequest(
            f"n must be between 1 and {limit} (the per-request image limit), got {fields.n}", field="n"
        )
    known_rows = known_columns = 0
    if known is not None:
        height, width = model.config.height, model.config.width
        if rows is not None and pixels is not None:
            raise InvalidRequest("give rows (whole rows to keep) or pixels (pixels to keep), not both", field="pixels")
        if pixels is not None:
            if not pixels < height * width:
                raise InvalidRequest(
                    f"pixels must be between 0 and {height * width - 1} (pixels of the image to keep, in raster "
                    f"order), got {pixels}",
                    field="pixels",
                )
            known_rows, known_columns = divmod(pixels, width)
        else:
            known_rows = height // 2 if rows is None else rows
        if not known_rows < height:
            raise InvalidRequest(
                f"rows must be between 0 and {height - 1} (rows of the image to keep), got {known_rows}", field="rows"
            )
    return GenerationRequest(
        n=fields.n,
        seed=secrets.randbits(31) if fields.seed is None else fields.seed,  # returned, so it can be replayed
        labels=class_indices(model, fields.label, fields.n),
        temperature=fields.temperature,
        known=known,
        known_rows=known_rows,
        known_columns=known_columns,
        label_mode=label_mode,
    )


def class_indices(model: ServedModel, label: Any, count: int, field: str = "label") -> list[int] | None:
    """A label (index or case-insensitive class name), or one per image of `count` -> their class indices,
    one or `count` of them (the engine gives one label to every image)."""
    if label is None:
        return None
    config = model.config
    if not config.conditional:
        raise InvalidRequest(f"model {model.name!r} is unconditional: it takes no label", field=field)
    values = label if isinstance(label, list) else [label]
    if len(values) not in (1, count):
        raise InvalidRequest(
            f"got {len(values)} labels for {count} images: give one label, or one per image", field=field
        )
    return [class_index(model, value, field) for value in values]


def class_index(model: ServedModel, value: Any, field: str) -> int:
    try:
        return model.config.class_index(value)
    except ValueError as error:
        raise InvalidRequest(f"model {model.name!r}: {error}", field=field) from None


def check_scoring_cost(model: ServedModel, images: int, labelled: bool, settings: Settings) -> None:
    """The cost cap of one /likelihood request, in forward passes (see scoring_passes): a conditional
    model scored without labels costs one pass per class, so its image count is capped lower."""
    passes = scoring_passes(model.config, images, labelled)
    if passes > settings.max_likelihood_passes:
        marginal = model.config.conditional and not labelled
        hint = "give a label, or send fewer images" if marginal else "send fewer images"
        raise InvalidRequest(
            f"scoring {images} images {'without a label ' if marginal else ''}on model {model.name!r} takes "
            f"{passes} forward passes (of up to {SCORE_CHUNK_IMAGES} images), over the limit of "
            f"{settings.max_likelihood_passes} per request (PIXELCNN_MAX_LIKELIHOOD_PASSES): {hint}",
            field="label" if marginal else "images",
        )
