"""GET /: the web demo (sample, complete, likelihood), a static page that calls the public API.

Its HTML, one JavaScript module, one stylesheet and the example images ship in the package under
app/server/static and are served from /static: no build step, and nothing is loaded from another host
(the Content-Security-Policy below holds the browser to that).
"""

from __future__ import annotations

import os
from os import PathLike
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Everything from this server only; data: and blob: for the images the page makes itself.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

DEMO_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"}


class DemoFiles(StaticFiles):
    """The demo's files, each with the page's headers: /static/index.html is the page too, and must not
    be frameable there either."""

    def file_response(
        self, full_path: str | PathLike[str], stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(DEMO_HEADERS)
        return response


router = APIRouter(include_in_schema=False)
router.mount("/static", DemoFiles(directory=STATIC_DIR), name="static")


@router.get("/")
async def demo_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=DEMO_HEADERS)
