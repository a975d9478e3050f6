"""Request and response models: the request models validate input, the response models document output.

Unknown request fields are rejected (extra="forbid") so a misspelt "temprature" is an error, not a
silently ignored option.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from app.engine import MAX_TEMPERATURE, MIN_TEMPERATURE

MAX_SEED = 2**63 - 1
MAX_PNG_SCALE = 16  # a 64-image grid at 16x is about 3900 px square: any larger is no easier to look at
Label = StrictInt | StrictStr  # strict: JSON true is not class 1, 1.0 is not a class index
LABEL_TYPE_ERROR = "must be a class index (integer), a class name (string), or a list of them"


def check_label_type(value: object, handler: ValidatorFunctionWrapHandler) -> object:
    """One clear message instead of pydantic's error per union member."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(LABEL_TYPE_ERROR) from None


def in_range(low: float, high: float | None = None) -> Callable[[object, ValidatorFunctionWrapHandler], object]:
    """A wrap validator that states the whole range (pydantic's message names only the bound crossed)."""
    expected = f"must be at least {low}" if high is None else f"must be between {low} and {high}"

    def check(value: object, handler: ValidatorFunctionWrapHandler) -> object:
        try:
            return handler(value)
        except ValidationError as error:
            if error.errors()[0]["type"] in ("greater_than_equal", "less_than_equal", "finite_number"):
                raise ValueError(f"{expected}, got {value}") from None
            raise

    return check


def json_bool(value: object, info: ValidationInfo) -> object:
    """A JSON boolean is true or false, not 0 or "yes" (the schema says boolean); multipart form fields are
    text, so there "true"/"false" (and pydantic's other spellings) are parsed as usual."""
    if isinstance(value, bool) or (isinstance(value, str) and (info.context or {}).get("form")):
        return value
    raise ValueError("must be true or false")


def json_typed(kind: str) -> Callable[[object, ValidationInfo], object]:
    """A before-validator: a JSON number is a number, not true/false or a string ("3"), as the schema
    says; multipart form fields are text, so there strings are parsed as usual."""

    def check(value: object, info: ValidationInfo) -> object:
        if isinstance(value, bool) or (isinstance(value, str) and not (info.context or {}).get("form")):
            raise ValueError(f"must be {kind}")
        return value

    return check


class PngScale(BaseModel):
    """The `scale` field of every route that answers with PNGs."""

    scale: int = Field(
        1,
        ge=1,
        le=MAX_PNG_SCALE,
        description=f"enlarge every PNG in the response (the PNG body, or the base64 PNGs of JSON) by this "
        f"whole factor, 1..{MAX_PNG_SCALE}, each pixel a block (nearest neighbour): 8 makes 28x28 224x224",
    )

    _scale_integer = field_validator("scale", mode="before")(json_typed("an integer"))
    _scale = field_validator("scale", mode="wrap")(in_range(1, MAX_PNG_SCALE))


LabelField = Field(
    None,
    description="class index or name (case-insensitive), or one per image; conditional models only; "
    "absent: drawn uniformly per image",
    examples=["sneaker", 7, ["Ankle boot", "bag"]],
)


class GenerationFields(PngScale):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model name (GET /models); absent: the default model")
    n: int = Field(1, ge=1, description="images to generate, 1..max_images_per_request")
    label: Label | list[Label] | None = LabelField
    temperature: float = Field(
        1.0,
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        allow_inf_nan=False,
        description=f"softmax temperature, {MIN_TEMPERATURE}..{MAX_TEMPERATURE}; below 1 is sharper, at "
        f"{MIN_TEMPERATURE} nearly the most likely image, at {MAX_TEMPERATURE} nearly uniform noise",
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="0..2^63-1; absent: drawn and returned, so any result can be replayed"
    )
    stream: bool = Field(False, description="stream rows as Server-Sent Events (same as Accept: text/event-stream)")

    _label = field_validator("label", mode="wrap")(check_label_type)
    _stream = field_validator("stream", mode="before")(json_bool)
    _integers = field_validator("n", "seed", mode="before")(json_typed("an integer"))
    _number = field_validator("temperature", mode="before")(json_typed("a number"))
    _n = field_validator("n", mode="wrap")(in_range(1))
    _temperature = field_validator("temperature", mode="wrap")(in_range(MIN_TEMPERATURE, MAX_TEMPERATURE))
    _seed = field_validator("seed", mode="wrap")(in_range(0, MAX_SEED))


class SampleRequest(GenerationFields):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"n": 4, "label": "sneaker", "seed": 1}]})


class CompleteFields(GenerationFields):
    rows: int | None = Field(None, ge=0, description="rows of the given image to keep, 0..H-1; absent: H // 2")
    pixels: int | None = Field(
        None,
        ge=0,
        description="instead of rows: pixels of the given image to keep in raster order (row by row, left to "
        "right), 0..H*W-1, so the kept part may end mid-row (rows=r is pixels=r*W)",
    )
    label_mode: Literal["posterior", "prior"] = Field(
        "posterior",
        description="without `label`, how a conditional model picks each completion's class: `posterior` "
        "draws it from p(class | kept rows), which the response reports as class_probabilities (exact "
        "sampling from the class-marginal model given the kept rows); `prior` draws it uniformly, ignoring "
        "what the kept rows show (as before 2026-12-04)",
    )

    _rows = field_validator("rows", "pixels", mode="wrap")(in_range(0))
    _rows_integer = field_validator("rows", "pixels", mode="before")(json_typed("an integer"))


class CompleteRequest(CompleteFields):
    """JSON form of POST /complete; the multipart form has the same fields and an `image` file."""

    image: str = Field(description="base64 image file (PNG, JPEG, BMP, WebP, GIF, TIFF), optionally a data: URL")


class LikelihoodFields(PngScale):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    label: Label | list[Label] | None = Field(
        None,
        description="class to condition on (one, or one per image); absent on a conditional model: "
        "the marginal likelihood over classes, with class_probabilities",
    )
    per_pixel: bool = Field(False, description="add per_pixel_nll and heatmap_png to each result")

    _label = field_validator("label", mode="wrap")(check_label_type)
    _per_pixel = field_validator("per_pixel", mode="before")(json_bool)


class LikelihoodRequest(LikelihoodFields):
    """JSON form of POST /likelihood; the multipart form repeats an `image` file field instead."""

    images: list[str] | None = Field(None, description="base64 image files")
    image: str | None = Field(None, description="one base64 image file (instead of images)")


# Responses (documentation only: routes build plain dicts).


class ImageOut(BaseModel):
    png: str = Field(description="base64 PNG of the image, enlarged `scale` times")
    label: int | None
    label_name: str | None
    log_prob: float = Field(description="log p of the generated sub-pixels at temperature 1, nats")
    class_probabilities: dict[str, float] | None = Field(
        None,
        description="/complete without label (label_mode posterior): p(class | kept rows), from which "
        "`label` was drawn",
    )


class GenerationResponse(BaseModel):
    model: str
    seed: int
    shape: list[int] = Field(description="[C, H, W]")
    images: list[ImageOut]
    log_prob: list[float]
    bits_per_dim: list[float] = Field(description="-log_prob / (generated sub-pixels * ln 2)")
    rows: int = Field(description="image height H")
    known_rows: int | None = Field(None, description="/complete only: rows kept from the given image")
    temperature: float
    elapsed_s: float
    numerics: str = Field(
        description="which arithmetic drew the images and whether the same seed gives the same bytes on every "
        "machine: 'c-kernel/VERSION; portable' (any x86-64 CPU with that kernel version), or "
        "'ROW_LOOP/DEVICE/DTYPE; local' (this machine only); also the X-Numerics header",
        examples=["c-kernel/3; portable"],
    )


class ClassOut(BaseModel):
    index: int
    name: str


class ModelInfo(BaseModel):
    name: str
    arch: str
    shape: list[int]
    conditional: bool
    classes: list[ClassOut]
    parameters: int
    metrics: dict | None
    default: bool
    baseline: bool = Field(False, description="shipped only to compare with (metrics.json role: baseline)")
    note: str | None = Field(None, description="what the model is, in a sentence (metrics.json note)")


class LikelihoodOut(BaseModel):
    nll_nats: float
    bits_per_dim: float
    label: int | None = Field(description="class used: the given one, or the most likely one")
    label_name: str | None
    class_probabilities: dict[str, float] | None = Field(None, description="p(class | image), no label given")
    per_pixel_nll: list | None = Field(None, description="H x W (grayscale) or C x H x W (RGB) nats")
    heatmap_png: str | None = Field(
        None, description="base64 PNG: per-pixel NLL, black (0) -> red -> yellow -> white (max), enlarged `scale` times"
    )


class LikelihoodResponse(BaseModel):
    model: str
    results: list[LikelihoodOut]


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid_request: invalid input (never 422)"},
    401: {"model": ErrorResponse, "description": "unauthorized: missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "not_found: unknown model"},
    413: {"model": ErrorResponse, "description": "payload_too_large: body over max_upload_bytes"},
    415: {"model": ErrorResponse, "description": "unsupported_media_type: a compressed body (Content-Encoding)"},
    500: {"model": ErrorResponse, "description": "engine_error: the model failed on this request"},
    503: {"model": ErrorResponse, "description": "overloaded: queue full (Retry-After), or not_ready"},
    504: {
        "model": ErrorResponse,
        "description": "timeout: X-Request-Timeout or the server's limit (request_timeout_s) passed; its work stopped",
    },
}
# /complete and /likelihood take multipart or JSON; anything else is refused.
UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    415: {
        "model": ErrorResponse,
        "description": "unsupported_media_type: neither multipart/form-data nor JSON, or a compressed body",
    }
}
