"""Liveness and readiness, for load balancers and container HEALTHCHECKs."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import RegistryDep
from ..errors import error_body

router = APIRouter(tags=["health"])


@router.get("/health", summary="the process is up (always 200)")
async def health() -> dict:
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="models are loaded and their engines run",
    responses={503: {"description": "not ready; `reason` says why"}},
)
async def ready(registry: RegistryDep) -> JSONResponse:
    reason = registry.not_ready_reason
    if reason is not None:
        body: dict[str, object] = {
            "status": "not_ready",
            "reason": reason,
            "models": sorted(registry.models),
            "problems": registry.problems,
        }
        return JSONResponse({**body, **error_body("not_ready", reason)}, status_code=503)
    body = {"status": "ready", "models": sorted(registry.models), "default": registry.default}
    if registry.problems:  # e.g. one broken model folder beside working ones: ready, but say so
        body["problems"] = registry.problems
    return JSONResponse(body)
