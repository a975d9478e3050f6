"""Running requests on an engine: submit with error mapping, iterate rows, and always clean up.

The rule that matters: an engine request whose HTTP client has gone must leave the batch. Every path
(the client's disconnect seen by the run's watcher task, the response task cancelled by the server, the
SSE generator closed, an exception) ends in `GenerationRun.close()`, which cancels the engine request
unless it finished. The cancel runs shielded, because it often happens inside a cancelled task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import anyio
import numpy as np
from fastapi import Request

from app.engine import (
    EngineStoppedError,
    GenerationRequest,
    LikelihoodResult,
    QueueFullError,
    RowEvent,
    SampleResult,
)

from .errors import ApiError, ClientDisconnected, RequestTimedOut, error_body, from_engine_error
from .metrics import ServerMetrics
from .outputs import generation_body, row_data, sse_event
from .registry import ServedModel


class GenerationRun:
    """One generation request's HTTP life: submitted to the model's engine when built (a full queue is a
    503 then), then iterated with `events()` once and closed with `close()` (always, in a finally).

    `stream_rows`: ask the engine for every row (SSE) or only for the result (JSON, PNG). Either way one
    task waits for the client's `http.disconnect` and cancels the engine request when it comes, so a
    client that hangs up frees its batch slots at the next row without any per-row polling."""

    def __init__(
        self,
        model: ServedModel,
        engine_request: GenerationRequest,
        completion: bool,
        request: Request,
        metrics: ServerMetrics,
        stream_rows: bool,
        time_limit_s: float,
        png_scale: int = 1,
    ) -> None:
        self.model = model
        self.engine_request = engine_request
        self.completion = completion  # /complete: the response reports the known rows
        self.request = request
        self.metrics = metrics
        self.stream_rows = stream_rows
        self.png_scale = png_scale  # the request's `scale`, for the PNGs of the body
        self.started = time.perf_counter()
        self.finished = False
        self.failed = False
        self.closed = False
        self.cancelled = False
        self.timed_out = False
        self.time_limit_s = time_limit_s
        self.engine_s: float | None = None  # from submitting to the engine's result
        self.decode_threads = 1  # the result's SampleResult.decode_threads
        try:
            self.stream = model.engine.submit(engine_request, rows=stream_rows)
        except (QueueFullError, EngineStoppedError, ValueError) as error:
            raise api_error(error, model) from None
        loop = asyncio.get_running_loop()
        self.watcher = loop.create_task(self._cancel_on_disconnect())
        self.timer = loop.call_later(time_limit_s, self._time_up)
        self.timeout_cancel: asyncio.Task[None] | None = None  # started by _time_up

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def seed(self) -> int:
        return self.engine_request.seed

    def body(self, result: SampleResult) -> dict[str, Any]:
        """The JSON response (also the `done` event of a stream)."""
        request = self.engine_request
        known_rows = request.known_rows if self.completion else None
        return generation_body(
            self.model,
            result,
            self.seed,
            request.temperature,
            self.elapsed_s,
            known_rows,
            self.png_scale,
            request.known_columns,
        )

    async def _cancel_on_disconnect(self) -> None:
        try:
            while (await self.request.receive())["type"] != "http.disconnect":
                pass
        except asyncio.CancelledError:
            # close() ended the watch. Returning, instead of ending as a cancelled task, keeps no exception:
            # its traceback's frames would tie this run (and its request, stream and tensors) into a
            # reference cycle that only the garbage collector frees, in full collections that paused the
            # event loop for 50-120 ms under a flood (BENCHMARKS.md).
            return
        await self._cancel()  # ends events() too, which then returns without a result

    def _time_up(self) -> None:
        if not self.finished:
            self.timed_out = True
            self.timeout_cancel = asyncio.ensure_future(self._cancel())  # events() ends; result() and sse() say why

    def server_timing(self) -> dict[str, str]:
        """The `Server-Timing` header (W3C; browsers' developer tools show it): the engine's share of the
        request, so a client can tell the server's time from the network's and its own, and how many threads
        drew it (a lone request draws on every idle lane's core: its time is not one core's)."""
        if self.engine_s is None:
            return {}
        threads = f'"{self.decode_threads} thread{"s" if self.decode_threads > 1 else ""}"'
        return {"Server-Timing": f"engine;dur={self.engine_s * 1000:.1f};desc={threads}"}

    def timeout_error(self) -> RequestTimedOut:
        return RequestTimedOut(
            f"the request took longer than the server's limit of {self.time_limit_s:g} s "
            "(PIXELCNN_REQUEST_TIMEOUT_S) and was stopped; ask for fewer images or retry"
        )

    async def _cancel(self) -> None:
        if not (self.finished or self.cancelled):
            self.cancelled = True
            await self.stream.cancel()

    async def events(self) -> AsyncGenerator[RowEvent | SampleResult, None]:
        """Engine events as they come; ends early (without the result) if the client has gone."""
        name, n = self.model.name, self.engine_request.n
        try:
            async for event in self.stream:
                if isinstance(event, SampleResult):
                    self.finished = True
                    self.engine_s, self.decode_threads = self.elapsed_s, event.decode_threads
                    if not self.stream_rows:  # no row events came: account for the rows now
                        self._observe_first_row()
                        generated_rows = self.model.config.height - self.engine_request.known_rows
                        self.metrics.rows.labels(model=name).inc(n * generated_rows)
                    self.metrics.images.labels(model=name).inc(n)
                    yield event
                    return
                if event.row == self.engine_request.known_rows:
                    self._observe_first_row()
                self.metrics.rows.labels(model=name).inc(n)
                yield event
        except Exception:
            self.failed = True
            raise

    def _observe_first_row(self) -> None:
        waited = self.stream.time_to_first_row_s
        if waited is not None:
            self.metrics.first_row.labels(model=self.model.name).observe(waited)

    async def close(self) -> None:
        """Cancel the engine request unless it finished. Unfinished without an error means the client went
        away (noticed by the watcher, or the server cancelled the response task): counted as such."""
        if self.closed:
            return
        self.closed = True
        self.watcher.cancel()
        self.timer.cancel()
        if not self.finished:
            if self.timed_out:
                self.metrics.failures.labels(reason=RequestTimedOut.type).inc()
            elif not self.failed:
                self.metrics.failures.labels(reason=ClientDisconnected.type).inc()
            with anyio.CancelScope(shield=True):
                await self._cancel()

    async def result(self) -> SampleResult:
        """Run to the end (the non-streamed responses)."""
        try:
            async with aclosing(self.events()) as events:
                async for event in events:
                    if isinstance(event, SampleResult):
                        return event
            if self.timed_out:
                raise self.timeout_error()
            raise ClientDisconnected("the client disconnected; the generation was cancelled")
        finally:
            await self.close()

    async def sse(self) -> AsyncIterator[str]:
        """`row` events, then `done` with the full JSON body, or `error` with the error object (the status
        line has gone out by then, so an event is the only way to report a failure)."""
        try:
            async with aclosing(self.events()) as events:
                async for event in events:
                    if isinstance(event, SampleResult):
                        yield sse_event("done", self.body(event))
                    else:
                        yield sse_event("row", row_data(event.row, event.pixels))
            if self.timed_out:
                yield sse_event("error", self.timeout_error().body())
        except Exception as error:  # noqa: BLE001 - reported to the client as an event
            self.metrics.failures.labels(reason="stream_error").inc()
            yield sse_event("error", stream_error_body(error, self.model.name))
        finally:
            await self.close()


def stream_error_body(error: Exception, model: str | None = None) -> dict[str, Any]:
    """The error object of a failure after the response has started (an SSE `error` event): the engine's
    errors mapped as everywhere else (errors.from_engine_error), anything else an internal error."""
    mapped = from_engine_error(error, model)
    return mapped.body() if mapped else error_body("internal", f"generation failed ({type(error).__name__}: {error})")


def api_error(error: QueueFullError | EngineStoppedError | ValueError, model: ServedModel) -> ApiError:
    mapped = from_engine_error(error, model.name)
    assert mapped is not None  # every one of these errors has its API error
    return mapped


async def until_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body has been read by then, so only a disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def score(
    model: ServedModel,
    images: np.ndarray,
    labels: list[int] | None,
    request: Request,
    metrics: ServerMetrics,
    deadline: float | None = None,
) -> LikelihoodResult:
    """engine.likelihood with its errors mapped to the API's; stopped when the client goes away (its slot
    freed at once, its scoring thread stopped before the next pass): ClientDisconnected, counted here."""
    scoring = asyncio.ensure_future(model.engine.likelihood(images, labels, deadline))
    watcher = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait([scoring, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (watcher, scoring):
            task.cancel()
        await asyncio.wait([watcher, scoring])  # quick: a cancelled score returns before its thread ends
    if scoring.cancelled():
        metrics.failures.labels(reason=ClientDisconnected.type).inc()
        raise ClientDisconnected("the client disconnected; the likelihood pass was stopped")
    try:
        return scoring.result()
    except (QueueFullError, ValueError) as error:
        raise api_error(error, model) from None
