"""HEAD on every GET route: answered as the GET would be, headers only (FastAPI's GET routes refuse HEAD
with 405; curl -I, uptime checkers and caches send it)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CLIENT_METHOD = "pixelcnn.client_method"  # the scope key keeping the method the client sent
ROUTING_KEYS = ("route", "endpoint", "root_path")  # what the router writes into the scope it is given


def client_method(request: Request) -> str:
    """The method the client sent: HEAD where this middleware passed the request on as a GET."""
    return str(request.scope.get(CLIENT_METHOD, request.method))


def with_head(allow: str) -> str:
    """A route's Allow list as this server answers it: HEAD wherever GET is (FastAPI lists GET alone)."""
    methods = [m.strip() for m in allow.split(",") if m.strip()]
    if "GET" in methods and "HEAD" not in methods:
        methods.append("HEAD")
    return ", ".join(methods)


class HeadAsGetMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # the rest of the body is dropped; its last message ends the response
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        as_get = {**scope, "method": "GET", CLIENT_METHOD: "HEAD"}
        try:
            await self.app(as_get, receive, headers_only)
        finally:  # the route found, for the metrics and the access log outside (metrics.route_label)
            for key in ROUTING_KEYS:
                if key in as_get:
                    scope[key] = as_get[key]
