"""Faults a soak plants on purpose (settings `fault_*`, off by default; never set them in production):
`LeakPerRequestMiddleware` keeps PIXELCNN_FAULT_LEAK_BYTES_PER_REQUEST bytes per request for the life of
the process, so that `pixelcnn bench soak` can show that its RSS check catches a real leak.
(PIXELCNN_FAULT_EVERY_STEPS, the decode fault, lives in the engine: app/engine/lanes.py.)"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class LeakPerRequestMiddleware:
    def __init__(self, app: ASGIApp, bytes_per_request: int) -> None:
        self.app = app
        self.bytes_per_request = bytes_per_request
        self.kept: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Filled with a non-zero byte: every page written, so it counts in the resident set.
            self.kept.append(b"\xa5" * self.bytes_per_request)
        await self.app(scope, receive, send)
