"""Connection hygiene, enforced by the server itself (not only by a gateway in front of it).

uvicorn's HTTP protocol has no limit on the size or number of request headers, no time limit on a request
head or body, and no idle timeout before a connection's first request. A hostile client could hold a
file descriptor forever (slow headers, a body promised but never sent, an idle socket) or make the parser
buffer an 80 MB header while every other client waited. `guarded_protocol` returns uvicorn's httptools
protocol with those limits:

- a request head (request line and headers) over `max_header_bytes`, or with more than `max_header_count`
  headers: 431, then the connection is closed, before the oversized head is parsed;
- a request head not complete `header_timeout_s` after its first byte: 408, closed;
- a request body not complete `body_timeout_s` after its head: 408 (if the response has not started), closed;
- a connection with no request in progress: closed after `keep_alive_timeout_s` without a byte, also
  before its first request (uvicorn only arms that timer after a response).

A request answered 408 after its head reached the app is marked in its ASGI scope (REFUSED_STATUS), so the
access log and the metrics record 408 for it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

# Key in the ASGI scope's "state" where the protocol notes a status it answered itself (408 mid-body).
REFUSED_STATUS = "pixelcnn.refused_status"
# Key in the same "state" where the request id is kept, for the protocol's own error bodies.
REQUEST_ID_STATE = "pixelcnn.request_id"


@dataclass(frozen=True)
class ConnectionLimits:
    """What Settings.connection_limits() gives (PIXELCNN_MAX_HEADER_BYTES and so on)."""

    max_header_bytes: int
    max_header_count: int
    header_timeout_s: float
    body_timeout_s: float
    keep_alive_timeout_s: float


class _HeadLimitExceeded(Exception):
    """Raised in the parser's header callback once the head has too many headers."""


# (status, error type, whether the request had reached the app): counted by the caller's metrics.
Refused = Callable[[int, str, bool], None]


def guarded_protocol(limits: ConnectionLimits, on_refused: Refused | None = None) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with `limits` (pass it as uvicorn.Config(http=...)). `on_refused`
    is told of each 408/431 the protocol sends itself."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.timeout_keep_alive = limits.keep_alive_timeout_s  # type: ignore[assignment]
            self.reading_head = True  # between requests, or inside a request's head
            self.head_bytes = 0
            self.header_count = 0
            self.refusal: tuple[int, str, str] | None = None  # set before a parser error that means 431
            self.head_timer: asyncio.TimerHandle | None = None
            self.body_timer: asyncio.TimerHandle | None = None

        # -- connection -----------------------------------------------------------------------------------
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # Idle before its first request, too (uvicorn arms this timer only after a response).
            self.timeout_keep_alive_task = self.loop.call_later(
                limits.keep_alive_timeout_s, self.timeout_keep_alive_handler
            )

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_timers()
            super().connection_lost(exc)

        def _cancel_timers(self) -> None:
            for timer in (self.head_timer, self.body_timer):
                if timer is not None:
                    timer.cancel()
            self.head_timer = self.body_timer = None

        def data_received(self, data: bytes) -> None:
            if not self.reading_head:
                super().data_received(data)
                return
            if self.head_timer is None and data:
                self.head_timer = self.loop.call_later(limits.header_timeout_s, self._head_too_slow)
            room = limits.max_header_bytes - self.head_bytes
            if len(data) <= room:
                self.head_bytes += len(data)
                super().data_received(data)
                return
            # Parse only what the limit allows: a head within it ends inside these bytes.
            super().data_received(data[:room])
            if self.transport.is_closing():
                return
            if self.reading_head:
                self.refuse(
                    431, "headers_too_large", f"the request head is larger than {limits.max_header_bytes} bytes"
                )
                return
            self.data_received(data[room:])

        # -- parser callbacks -----------------------------------------------------------------------------
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.header_count = 0

        def on_header(self, name: bytes, value: bytes) -> None:
            self.header_count += 1
            if self.header_count > limits.max_header_count:
                self.refusal = (431, "headers_too_large", f"more than {limits.max_header_count} request headers")
                raise _HeadLimitExceeded
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self.reading_head = False
            self.head_bytes = 0
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None
            self.body_timer = self.loop.call_later(limits.body_timeout_s, self._body_too_slow)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self.reading_head = True
            if self.body_timer is not None:
                self.body_timer.cancel()
                self.body_timer = None
            super().on_message_complete()

        def send_400_response(self, msg: str) -> None:
            if self.refusal is not None:  # the parser error was ours: a header limit
                self.refuse(*self.refusal)
                return
            super().send_400_response(msg)

        # -- timeouts -------------------------------------------------------------------------------------
        def _head_too_slow(self) -> None:
            self.head_timer = None
            if self.reading_head:
                self.refuse(408, "request_timeout", f"the request head took longer than {limits.header_timeout_s:g} s")

        def _body_too_slow(self) -> None:
            self.body_timer = None
            self.refuse(408, "request_timeout", f"the request body took longer than {limits.body_timeout_s:g} s")

        def refuse(self, status: int, type_: str, message: str) -> None:
            """Answer `status` with an error body and close, unless a response is already under way (then
            only close: its client cannot be told)."""
            self._cancel_timers()
            if self.transport.is_closing():
                return
            cycle = self.cycle
            request_id = None
            reached_app = cycle is not None and not cycle.response_complete
            if reached_app:
                assert cycle is not None
                if cycle.response_started:
                    self.transport.close()
                    return
                state = cycle.scope["state"]
                state[REFUSED_STATUS] = status
                request_id = state.get(REQUEST_ID_STATE)
                cycle.disconnected = True  # the app's receive() sees a disconnect; its sends are dropped
                cycle.message_event.set()
            error: dict[str, str] = {"type": type_, "message": message}
            if request_id:
                error["request_id"] = request_id
            body = json.dumps({"error": error}).encode()
            self.transport.write(
                b"".join(
                    [
                        STATUS_LINE[status],
                        b"content-type: application/json\r\n",
                        b"content-length: %d\r\n" % len(body),
                        b"connection: close\r\n\r\n",
                        body,
                    ]
                )
            )
            self.transport.close()
            if on_refused is not None:
                on_refused(status, type_, reached_app)

    return GuardedHttpToolsProtocol
