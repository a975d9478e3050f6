"""OpenAPI descriptions of the routes that read their body by hand (JSON or multipart)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def upload_body(fields_model: type[BaseModel], json_model: type[BaseModel], repeated: bool) -> dict[str, Any]:
    form = fields_model.model_json_schema()
    file = {"type": "string", "format": "binary"}
    form["properties"] = {"image": {"type": "array", "items": file} if repeated else file, **form["properties"]}
    form["required"] = ["image"]
    form.pop("additionalProperties", None)
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": form},
                "application/json": {"schema": json_model.model_json_schema()},
            },
        }
    }
