"""/redoc with nothing loaded from another host: fastapi-offline serves ReDoc's script from the package, but
that script draws its "API docs by Redocly" logo from cdn.redoc.ly. This page serves the same script with
the logo inlined (a data: URI), so the docs work behind a gateway without internet and call no third party."""

from __future__ import annotations

import base64
from functools import cache
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse, Response

router = APIRouter(include_in_schema=False)

BUNDLE = Path(fastapi_offline.__file__).parent / "static" / "redoc.standalone.js"
CDN_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
# A plain mark in the logo's place (the link to Redocly beside it stays a link, which loads nothing).
LOGO_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16"><circle cx="8" cy="8" r="7" fill="#888"/></svg>'
)
SCRIPT_PATH = "/redoc/redoc.standalone.js"


@cache
def offline_bundle() -> bytes:
    logo = "data:image/svg+xml;base64," + base64.b64encode(LOGO_SVG).decode()
    return BUNDLE.read_bytes().replace(CDN_LOGO.encode(), logo.encode())


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{SCRIPT_PATH}",
        redoc_favicon_url=f"{root}/static-offline-docs/favicon.png",
        with_google_fonts=False,
    )


@router.get(SCRIPT_PATH)
async def redoc_script() -> Response:
    return Response(offline_bundle(), media_type="text/javascript", headers={"Cache-Control": "max-age=3600"})
