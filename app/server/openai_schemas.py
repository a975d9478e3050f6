"""Request models of the OpenAI Images API front end (routes/openai_images.py).

The fields are OpenAI's (the `openai` SDK's ImageGenerateParams and ImageEditParams), plus `seed` and
`temperature`, which clients send as extra body fields and which mean what they mean on /sample. Fields
that only steer OpenAI's own models (quality, style, moderation, user, ...) are accepted and have no effect;
unknown fields are rejected, as on every other route.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.engine import MAX_TEMPERATURE, MIN_TEMPERATURE

from .schemas import MAX_SEED, in_range, json_bool, json_typed

MAX_PARTIAL_IMAGES = 3  # OpenAI's limit


class OpenAIImageFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(
        "",
        description="a class name of the model (case-insensitive, as `label` on /sample), or empty: an unconditional "
        "model, or a class drawn with the seed",
    )
    model: str | None = Field(None, description="model name (GET /v1/models); absent: the default model")
    n: int = Field(1, ge=1, description="images to generate, 1..max_images_per_request")
    size: str | None = Field(None, description='the model\'s size as "WIDTHxHEIGHT" (e.g. "28x28"), or "auto"')
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json only: this server keeps no images to serve at a URL"
    )
    output_format: Literal["png", "jpeg", "webp"] = Field(
        "png", description="png (exact), webp (lossless unless output_compression is given) or jpeg"
    )
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality, 0..100")
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="auto or opaque: the images have no transparency"
    )
    stream: bool = Field(False, description="Server-Sent Events: partial images, then the completed image")
    partial_images: int = Field(0, ge=0, le=MAX_PARTIAL_IMAGES, description="partial frames while streaming, 0..3")
    quality: str | None = Field(None, description="accepted, no effect")
    style: str | None = Field(None, description="accepted, no effect")
    moderation: str | None = Field(None, description="accepted, no effect")
    user: str | None = Field(None, description="accepted, no effect")
    safety_identifier: str | None = Field(None, description="accepted, no effect")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="extension (extra body field), as on /sample: the same seed, the same images",
    )
    temperature: float = Field(
        1.0,
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        allow_inf_nan=False,
        description=f"extension (extra body field), as on /sample: {MIN_TEMPERATURE}..{MAX_TEMPERATURE}",
    )

    _stream = field_validator("stream", mode="before")(json_bool)
    _integers = field_validator("n", "seed", "partial_images", "output_compression", mode="before")(
        json_typed("an integer")
    )
    _number = field_validator("temperature", mode="before")(json_typed("a number"))
    _n = field_validator("n", mode="wrap")(in_range(1))
    _partial = field_validator("partial_images", mode="wrap")(in_range(0, MAX_PARTIAL_IMAGES))
    _compression = field_validator("output_compression", mode="wrap")(in_range(0, 100))
    _temperature = field_validator("temperature", mode="wrap")(in_range(MIN_TEMPERATURE, MAX_TEMPERATURE))
    _seed = field_validator("seed", mode="wrap")(in_range(0, MAX_SEED))


class OpenAIImageGenerationRequest(OpenAIImageFields):
    """POST /v1/images/generations (JSON)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"prompt": "sneaker", "n": 2, "size": "28x28", "seed": 1}]}
    )


class OpenAIImage(BaseModel):
    b64_json: str


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    output_format: str
    size: str
    background: str


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class OpenAIModelList(BaseModel):
    object: Literal["list"]
    data: list[OpenAIModel]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIError, "description": description}
    for status, description in {
        400: "invalid input",
        401: "missing or wrong API key",
        404: "unknown model",
        413: "body over max_upload_bytes",
        415: "an edit that is not multipart/form-data",
        503: "queue full (Retry-After) or not ready",
    }.items()
}
