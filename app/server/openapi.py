"""The OpenAPI schema as the server really answers: FastAPI documents a 422 for every route with parameters
or a body, but this server maps validation errors to 400 (errors.py); and every path answers 405 to a
method it does not take. Both in the error format of the path's protocol (native, /v1 OpenAI, /v2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

NATIVE_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def error_content(operation: dict[str, Any]) -> dict[str, Any]:
    """The error body this operation documents already (its protocol's format), else the native one."""
    for status, response in operation.get("responses", {}).items():
        if status.startswith(("4", "5")) and status != "422" and "content" in response:
            content: dict[str, Any] = response["content"]
            return content
    return NATIVE_ERROR


def as_served(schema: dict[str, Any]) -> dict[str, Any]:
    """422 -> 400 (invalid_request), plus 405 on every operation; FastAPI's validation-error schemas go."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            content = error_content(operation)
            # A path parameter alone (a model name) cannot be invalid: it is found or 404.
            validated = "requestBody" in operation or any(p["in"] != "path" for p in operation.get("parameters", []))
            if responses.pop("422", None) is not None and validated:
                responses.setdefault("400", {"description": "invalid_request: invalid input", "content": content})
            responses.setdefault(
                "405", {"description": "method_not_allowed: the path takes another method", "content": content}
            )
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema


def served_openapi(app: FastAPI, keep_security: bool) -> Callable[[], dict[str, Any]]:
    """app.openapi: the schema as served; without PIXELCNN_API_KEY also minus the bearer-token requirement
    (no route asks for one then, and the schema must say what the server really accepts: clients and
    fuzzers read it)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = as_served(FastAPI.openapi(app))
            if not keep_security:
                for operations in schema.get("paths", {}).values():
                    for operation in operations.values():
                        operation.pop("security", None)
                schema.get("components", {}).pop("securitySchemes", None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi
