"""POST /likelihood: exact log-likelihood of uploaded images (one teacher-forced pass per batch)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ..deps import MetricsDep, RegistryDep, SettingsDep, require_api_key
from ..inputs import check_scoring_cost, class_indices, decode_images, read_upload
from ..jobs import score
from ..outputs import likelihood_body
from ..schemas import (
    ERROR_RESPONSES,
    LikelihoodFields,
    LikelihoodRequest,
    LikelihoodResponse,
)
from ..tenants import request_budget
from .docs import upload_body

router = APIRouter(tags=["likelihood"], dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)


@router.post(
    "/likelihood",
    summary="negative log-likelihood of images",
    responses={200: {"model": LikelihoodResponse}},
    openapi_extra=upload_body(LikelihoodFields, LikelihoodRequest, repeated=True),
)
async def likelihood(
    request: Request, registry: RegistryDep, settings: SettingsDep, metrics: MetricsDep
) -> JSONResponse:
    fields, files = await read_upload(request, settings, LikelihoodFields)
    model = registry.get(fields.model)
    images = decode_images(model, files, settings, "image" if len(files) <= 1 else "images")
    labels = class_indices(model, fields.label, len(images))
    check_scoring_cost(model, len(images), labels is not None, settings)
    request.state.model, request.state.images = model.name, len(images)  # for the access log
    metrics.request_images.labels(route=request.url.path).observe(len(images))
    result = await score(model, images, labels, request, metrics, request_budget(request).deadline)
    metrics.scored.labels(model=model.name).inc(len(images))
    return JSONResponse(likelihood_body(model, result, fields.per_pixel, fields.scale))
