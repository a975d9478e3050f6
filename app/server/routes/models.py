"""The loaded models and what they accept (shape, classes), with their training metrics."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.engine import MAX_TEMPERATURE, MIN_TEMPERATURE

from ..deps import RegistryDep, SettingsDep
from ..schemas import ERROR_RESPONSES, MAX_PNG_SCALE, ModelInfo

router = APIRouter(tags=["models"])


@router.get("/models", response_model=list[ModelInfo], summary="loaded models")
async def list_models(registry: RegistryDep) -> list[dict]:
    return [model.describe(name == registry.default) for name, model in sorted(registry.models.items())]


@router.get("/models/{name}", response_model=ModelInfo, responses={404: ERROR_RESPONSES[404]}, summary="one model")
async def get_model(name: str, registry: RegistryDep) -> dict:
    if name not in registry.models:
        raise registry.unknown_model(name)
    return registry.models[name].describe(name == registry.default)


class Range(BaseModel):
    min: float
    max: float


class Limits(BaseModel):
    """What every request must stay within (the same for every model), for clients that check before sending,
    such as the web demo."""

    max_images_per_request: int = Field(description="n of /sample and /complete, images of /likelihood")
    max_upload_bytes: int = Field(description="request bodies above this get 413")
    temperature: Range
    scale: Range


@router.get("/limits", response_model=Limits, summary="the server's request limits")
async def limits(settings: SettingsDep) -> Limits:
    return Limits(
        max_images_per_request=settings.max_images_per_request,
        max_upload_bytes=settings.max_upload_bytes,
        temperature=Range(min=MIN_TEMPERATURE, max=MAX_TEMPERATURE),
        scale=Range(min=1, max=MAX_PNG_SCALE),
    )
