"""Request body checks before any route parses a byte: its size (413) and its coding (415).

A declared Content-Length over the limit is refused at once; a chunked body is counted while it is read
and refused as soon as it passes the limit, so a client cannot make the server buffer more than
`max_upload_bytes`. The accepted body is replayed to the app unchanged. A compressed body
(Content-Encoding other than identity) is refused on every route alike: no route inflates one.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, PayloadTooLarge, UnsupportedMediaType, error_response
from .metrics import ServerMetrics


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, metrics: ServerMetrics | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def _refuse(self, error: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer `error` (counted in the failures metric) instead of passing the request on."""
        if self.metrics is not None:
            self.metrics.failures.labels(reason=error.type).inc()
        await error_response(error, scope["path"])(scope, receive, send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is larger than the limit of {self.max_bytes} bytes (PIXELCNN_MAX_UPLOAD_BYTES)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        coding = headers.get(b"content-encoding", b"identity").strip().lower()
        if any(part.strip() not in (b"", b"identity") for part in coding.split(b",")):
            refused = UnsupportedMediaType(
                f"Content-Encoding {coding.decode('latin-1')[:40]!r} is not supported: send the body uncompressed"
            )
            await self._refuse(refused, scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(self._too_large(), scope, receive, send)
            return

        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(self._too_large(), scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls: disconnect detection during streaming

        await self.app(scope, replay, send)
