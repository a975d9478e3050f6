"""The loaded models and what they accept (shape, classes), with their training metrics."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import RegistryDep
from ..schemas import ERROR_RESPONSES, ModelInfo

router = APIRouter(tags=["models"])


@router.get("/models", response_model=list[ModelInfo], summary="loaded models")
async def list_models(registry: RegistryDep) -> list[dict]:
    return [model.describe(name == registry.default) for name, model in sorted(registry.models.items())]


@router.get("/models/{name}", response_model=ModelInfo, responses={404: ERROR_RESPONSES[404]}, summary="one model")
async def get_model(name: str, registry: RegistryDep) -> dict:
    if name not in registry.models:
        raise registry.unknown_model(name)
    return registry.models[name].describe(name == registry.default)
