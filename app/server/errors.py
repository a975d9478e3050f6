"""One error format for every failure: {"error": {"type", "message", "field"?}}.

Status codes: 400 invalid_request (any bad input, including FastAPI's validation errors, so clients need
one rule), 401 unauthorized, 404 not_found, 405 method_not_allowed, 413 payload_too_large,
415 unsupported_media_type, 503 overloaded (with Retry-After) or not_ready, 504 timeout (X-Request-Timeout
or PIXELCNN_REQUEST_TIMEOUT_S passed), 500 engine_error (a prefill, decode step or likelihood pass failed,
e.g. out of memory; the message says which) or internal (a bug, never bad input). Routes raise ApiError
subclasses; the handlers below turn them, and the framework's own errors, into responses and count them in
the failures metric. Under the protocol front ends' paths (/v1, /v2) the same errors are written in those
protocols' formats (PROTOCOL_ERROR_FORMATS).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .head import client_method, with_head

RETRY_AFTER_S = 1
# The id of the request being handled (set by MetricsMiddleware): every error body carries it, so that a
# client's complaint leads to the server's log line.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


class ApiError(Exception):
    status = 400
    type = "invalid_request"
    counted = False  # True where the failure metric was already incremented at the source

    def __init__(self, message: str, *, field: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.type, self.message, self.field)


class InvalidRequest(ApiError):
    pass


class Unauthorized(ApiError):
    status, type = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class NotFound(ApiError):
    status, type = 404, "not_found"


class PayloadTooLarge(ApiError):
    status, type = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, type = 415, "unsupported_media_type"


class TooManyRequests(ApiError):
    """A tenant's cap on requests in progress (PIXELCNN_API_KEYS) is reached."""

    status, type = 429, "too_many_requests"

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}; retry after {RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)})


class DeadlinePassed(ApiError):
    """The request's own deadline (X-Request-Timeout) passed; the engine stopped its work there. 504, as
    deadline-exceeded maps to in HTTP APIs (gRPC's DEADLINE_EXCEEDED): not a 503, which a gateway takes
    for a failing replica, retrying the request elsewhere with a new deadline and marking the replica down."""

    status, type = 504, "timeout"

    @classmethod
    def of(cls, error: Exception) -> DeadlinePassed:
        return cls(f"{error} (X-Request-Timeout); ask for less work or a longer timeout")


class Overloaded(ApiError):
    status, type = 503, "overloaded"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": str(RETRY_AFTER_S)})


class NotReady(ApiError):
    status, type = 503, "not_ready"


class RequestTimedOut(ApiError):
    """The request ran past PIXELCNN_REQUEST_TIMEOUT_S; its engine work was stopped. GenerationRun.close()
    counts it (a stream's timeout never reaches a handler)."""

    status, type, counted = 504, "timeout", True


class EngineFailed(ApiError):
    status, type = 500, "engine_error"


class HttpError(ApiError):
    """An error the framework raised (unknown route, wrong method) or a bug, with its own status."""

    def __init__(self, status: int, type_: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message, headers=dict(headers or {}))
        self.status, self.type = status, type_


class ClientDisconnected(ApiError):
    """The client left before the response was ready; nobody reads this answer (499 in nginx terms).
    Counted where it is noticed (GenerationRun.close(), since a cancelled stream never reaches a handler;
    jobs.score)."""

    status, type, counted = 499, "client_disconnected", True


def error_body(type_: str, message: str, field: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type_, "message": message}
    if field:
        error["field"] = field
    request_id = REQUEST_ID.get()
    if request_id:
        error["request_id"] = request_id
    return {"error": error}


def from_engine_error(error: Exception, model: str | None) -> ApiError | None:
    """The API error for an engine error (app.engine.types), wherever it surfaces: raised by submit or
    score, or delivered while a result is awaited or a stream runs (then as an SSE `error` event). None for
    anything else, which is a bug (internal). `model`: the model's name, when known."""
    from app.engine.types import (
        DeadlineExceededError,
        EngineStoppedError,
        GenerationError,
        QueueFullError,
        ScoringError,
    )

    name = f"model {model!r}" if model else "the model"
    if isinstance(error, DeadlineExceededError):
        return DeadlinePassed.of(error)
    if isinstance(error, QueueFullError):
        return Overloaded(f"{name} has a full queue ({error}); retry after {RETRY_AFTER_S} s")
    if isinstance(error, EngineStoppedError):
        return NotReady(f"{name} is not serving ({error}); retry")
    if isinstance(error, GenerationError | ScoringError):
        return EngineFailed(str(error))
    if isinstance(error, ValueError):  # the engine's own checks: its message is written for the client
        return InvalidRequest(str(error))
    return None


def openai_error_body(error: ApiError) -> dict[str, Any]:
    """OpenAI's format: the SDKs pick the exception class by status and show `message`."""
    kind = "server_error" if error.status >= 500 else "invalid_request_error"
    return {"error": {"message": error.message, "type": kind, "param": error.field, "code": error.type}}


def inference_v2_error_body(error: ApiError) -> dict[str, Any]:
    """The Open Inference Protocol's format: tritonclient raises InferenceServerException(body["error"])."""
    return {"error": error.message}


# Protocol front ends answer every error under their path prefix in their protocol's format (the clients
# written for them parse nothing else); all other paths keep the server's own format.
PROTOCOL_ERROR_FORMATS = {"/v1/": openai_error_body, "/v2": inference_v2_error_body}


def error_response(error: ApiError, path: str = "") -> JSONResponse:
    body = next((fmt(error) for prefix, fmt in PROTOCOL_ERROR_FORMATS.items() if path.startswith(prefix)), None)
    return JSONResponse(body or error.body(), status_code=error.status, headers=error.headers)


def not_json_message(content_type: str) -> str:
    """A body that was not sent as JSON (typically `curl -d` without a header, which sends a form)."""
    got = f"this request's Content-Type is {content_type!r}" if content_type else "this request has no Content-Type"
    return (
        f"the request body must be a JSON object sent with Content-Type: application/json ({got}; "
        "curl -d sends a form unless given -H 'Content-Type: application/json')"
    )


def shown(value: object, limit: int = 60) -> str:
    """repr(value) for a message, cut to `limit` characters: an error never echoes a client's megabytes."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


# Validation errors listed in one message at most; the rest are counted (a body of 100,000 unknown fields gets
# a short answer, not one longer than itself).
LISTED_ERRORS = 5


def json_error(error: BaseException, what: str = "the request body") -> InvalidRequest:
    """Why `what` could not be read as JSON, from json.loads's exception, the same words on every route."""
    if isinstance(error, RecursionError):
        return InvalidRequest(f"{what} is JSON nested too deeply; expected a flat object")
    if isinstance(error, UnicodeDecodeError):
        return InvalidRequest(f"{what} is not UTF-8 text, as JSON must be (and it must not be compressed)")
    if isinstance(error, json.JSONDecodeError):
        return InvalidRequest(f"{what} is not valid JSON ({error.msg} at character {error.pos})")
    if "integer string conversion" in str(error):  # valid JSON Python will not convert: a very long integer
        return InvalidRequest(f"{what} has a number of more than {sys.get_int_max_str_digits()} digits")
    return InvalidRequest(f"{what} could not be read ({error})")


def loads(data: bytes | str, what: str = "the request body") -> Any:
    """json.loads, its failures InvalidRequest (json_error)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise json_error(error, what) from None


def from_validation_errors(errors: list[dict[str, Any]], content_type: str | None = None) -> InvalidRequest:
    """Pydantic's error list -> one readable message naming the field(s) and what was expected.
    `content_type`: the request's media type ("" without the header; None: a body already read as JSON),
    named when a JSON object was expected and the body was not sent as JSON."""
    parts, first_field = [], None
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "form")]
        field = ".".join(loc)[:60] or None
        message = error.get("msg", "invalid value")
        if error.get("type") == "json_invalid":  # loc is a character position
            reason = error.get("ctx", {}).get("error")
            position = error.get("loc", ())[-1]
            message, field = "the request body is not valid JSON", None
            if reason and isinstance(position, int):
                message += f" ({reason} at character {position})"
        elif error.get("type") in ("model_type", "model_attributes_type", "dict_type") and not field:
            json_sent = content_type is None or content_type == "application/json" or content_type.endswith("+json")
            message = "the request body must be a JSON object" if json_sent else not_json_message(content_type or "")
        elif error.get("type") == "extra_forbidden":
            message = "unknown field"
        elif error.get("type") == "value_error":
            message = message.removeprefix("Value error, ")
        elif error.get("type") == "missing" and not field:
            message = "a JSON request body is required"
        first_field = first_field or field
        parts.append(f"{field}: {message}" if field else message)
    if len(parts) > LISTED_ERRORS:
        parts[LISTED_ERRORS:] = [f"and {len(parts) - LISTED_ERRORS} more"]
    return InvalidRequest("; ".join(parts) or "invalid request", field=first_field)


def from_pydantic(error: ValidationError) -> InvalidRequest:
    return from_validation_errors([dict(e) for e in error.errors(include_url=False)])


_HTTP_TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def install_error_handlers(app: FastAPI) -> None:
    from app.engine.types import (
        DeadlineExceededError,
        EngineStoppedError,
        GenerationError,
        QueueFullError,
        ScoringError,
    )

    def count(request: Request, type_: str) -> None:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.failures.labels(reason=type_).inc()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        if not error.counted:
            count(request, error.type)
        return error_response(error, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        return await api_error(request, from_validation_errors([dict(e) for e in error.errors()], content_type))

    @app.exception_handler(DeadlineExceededError)
    @app.exception_handler(QueueFullError)
    @app.exception_handler(EngineStoppedError)
    @app.exception_handler(GenerationError)
    @app.exception_handler(ScoringError)
    async def engine_error(request: Request, error: Exception) -> JSONResponse:
        mapped = from_engine_error(error, getattr(request.state, "model", None))
        assert mapped is not None  # registered for the engine's errors only
        return await api_error(request, mapped)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400 and isinstance(error.__cause__, ValueError | RecursionError):
            # FastAPI's "There was an error parsing the body" for a JSON body it could not decode.
            return await api_error(request, json_error(error.__cause__))
        type_ = _HTTP_TYPES.get(error.status_code, "http_error")
        message = str(error.detail)
        if error.status_code == 404:
            message = f"no route {client_method(request)} {request.url.path}; see /docs for the API"
        headers = error.headers
        if error.status_code == 405:  # Starlette's Allow header lists the path's methods
            allowed = with_head((headers or {}).get("Allow", ""))
            headers = {**(headers or {}), "Allow": allowed}
            message = f"{client_method(request)} is not allowed on {request.url.path}; allowed: {allowed}"
        return await api_error(request, HttpError(error.status_code, type_, message, headers))
