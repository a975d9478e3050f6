"""The caller's side of a submitted request: an async iterator over what the engine delivers to it."""

from __future__ import annotations

import asyncio

from .fan_in import Delivery, TrackedRequest
from .types import EngineStoppedError, RowEvent, SampleResult


class _Cancelled:
    """Queued by Stream.cancel() so that a consumer waiting for the next item wakes up."""


_CANCELLED = _Cancelled()
StreamItem = Delivery | _Cancelled


class Stream:
    """Async iterator over a request's RowEvents (when submitted with rows=True), then its SampleResult.
    Cancelling ends the iteration, also for a consumer already waiting for the next item."""

    def __init__(self, request: TrackedRequest, queue: asyncio.Queue[StreamItem]) -> None:
        self._request = request
        self._queue = queue
        self._finished = False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> RowEvent | SampleResult:
        if self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, _Cancelled):
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if isinstance(item, SampleResult):
            self._finished = True
        return item

    @property
    def time_to_first_row_s(self) -> float | None:
        """Seconds from submission until the first generated row was final; None before that."""
        first = self._request.first_row_at
        return None if first is None else first - self._request.submitted

    async def cancel(self) -> None:
        """Stop the work: the request leaves the batch at the next row boundary."""
        if not self._finished:
            self._request.cancelled = True
            self._finished = True
            self._request.withdraw(self._request)  # waiting shards leave the queue now, not at its head
            self._queue.put_nowait(_CANCELLED)

    async def aclose(self) -> None:
        await self.cancel()

    async def result(self) -> SampleResult:
        """Consume the rows and return the final result."""
        async for item in self:
            if isinstance(item, SampleResult):
                return item
        raise EngineStoppedError("the stream ended without a result")
