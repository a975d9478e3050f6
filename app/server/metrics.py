"""Prometheus metrics, in a CollectorRegistry of each app's own (so two apps in one process never clash).

Request metrics come from an ASGI middleware (route template, not raw path, to bound label cardinality);
engine gauges (queue size, active images, batch sizes) are read from `engine.stats()` (an EngineStats) at
scrape time, so they cost nothing between scrapes.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.engine.types import EngineStats, TimeSnapshot

from .connections import REFUSED_STATUS, REQUEST_ID_STATE
from .errors import REQUEST_ID, HttpError, error_response
from .tenants import TENANT_STATE

if TYPE_CHECKING:
    from .registry import ModelRegistry

access_log = logging.getLogger("pixelcnn.access")
log = logging.getLogger("pixelcnn.server")
REQUEST_ID_HEADER = b"x-request-id"
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")  # a caller's (or gateway's) id is kept if it looks sane

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open fds (Linux)
        self.requests = Counter("pixelcnn_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.request_duration = Histogram(
            "pixelcnn_request_duration_seconds",
            "HTTP request duration, streamed body included",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_row = Histogram(
            "pixelcnn_time_to_first_row_seconds",
            "from the request reaching the engine to its first generated row",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rows = Counter("pixelcnn_rows", "image rows generated (a row of n images counts n)", ["model"], registry=r)
        self.images = Counter("pixelcnn_images_generated", "images sampled or completed", ["model"], registry=r)
        self.scored = Counter("pixelcnn_images_scored", "images whose likelihood was computed", ["model"], registry=r)
        self.request_images = Histogram(
            "pixelcnn_request_images", "images asked for per request", ["route"], buckets=COUNT_BUCKETS, registry=r
        )
        self.failures = Counter("pixelcnn_failures", "failed requests by reason (error type)", ["reason"], registry=r)
        self.tenant_requests = Counter(
            "pixelcnn_tenant_requests",
            "POST requests by tenant (the names of PIXELCNN_API_KEYS, so a bounded set) and status",
            ["tenant", "status"],
            registry=r,
        )

    def count_refused(self, status: int, reason: str, reached_app: bool) -> None:
        """A request the connection guard answered itself: 431 (too large a head), 408 (too slow)."""
        self.failures.labels(reason=reason).inc()
        if not reached_app:  # else MetricsMiddleware counts it, under its route
            self.requests.labels(route="unmatched", method="other", status=str(status)).inc()

    def watch(self, get_registry: Callable[[], ModelRegistry | None]) -> None:
        self.registry.register(EngineCollector(get_registry))


class EngineCollector(Collector):
    """Engine state at scrape time: queue size, active images, batch sizes, any other numeric stat."""

    def __init__(self, get_registry: Callable[[], ModelRegistry | None]) -> None:
        self.get_registry = get_registry

    def collect(self) -> Iterable[Metric]:
        registry = self.get_registry()
        served = list(registry.models.values()) if registry is not None else []
        loaded = GaugeMetricFamily(
            "pixelcnn_model_loaded", "1 for each loaded model, its engine running or not", labels=["model", "running"]
        )
        queue = GaugeMetricFamily("pixelcnn_queue_size", "requests waiting to join the batch", labels=["model"])
        active = GaugeMetricFamily("pixelcnn_active_images", "images in the running batch", labels=["model"])
        batches = HistogramMetricFamily("pixelcnn_batch_size", "images per engine decode step", labels=["model"])
        recent_mean = GaugeMetricFamily(
            "pixelcnn_batch_size_recent_mean",
            "mean images per decode step over the engine's recent window",
            labels=["model"],
        )
        timings: dict[str, HistogramMetricFamily] = {
            "queue_wait_seconds": HistogramMetricFamily(
                "pixelcnn_queue_wait_seconds",
                "from a generation request's arrival to its joining a decode batch",
                labels=["model"],
            ),
            "row_decode_seconds": HistogramMetricFamily(
                "pixelcnn_row_decode_seconds",
                "one decode step: a row of every image in a lane's batch",
                labels=["model"],
            ),
        }
        extra: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        counters = EngineStats.counter_names()
        for model in served:
            loaded.add_metric([model.name, str(model.engine.running).lower()], 1)
            stats = model.engine.stats()
            queue.add_metric([model.name], float(stats.queue_size))
            active.add_metric([model.name], float(stats.active_images))
            if stats.batch_sizes_seen:  # cumulative {size: decode steps}
                buckets, total = _histogram(stats.batch_sizes_seen)
                batches.add_metric([model.name], buckets, total)
            for key, family in timings.items():
                histogram: TimeSnapshot = getattr(stats, key)
                family.add_metric([model.name], *_time_buckets(histogram))
            recent = stats.recent_batch_sizes  # a window of the last steps' sizes
            if recent:
                recent_mean.add_metric([model.name], sum(recent) / len(recent))
            for key, value in stats.numbers().items():
                if key in ("queue_size", "active_images"):
                    continue
                name = f"pixelcnn_engine_{key}"
                if name not in extra:
                    # Counts that only grow are counters (pixelcnn_engine_<key>_total), so that rate() and
                    # increase() work on them; every other numeric stat is a gauge.
                    kind = CounterMetricFamily if key in counters else GaugeMetricFamily
                    extra[name] = kind(name, f"engine.stats().{key}", labels=["model"])
                extra[name].add_metric([model.name], float(value))
        yield from (loaded, queue, active, batches, recent_mean, *timings.values(), *extra.values())


def _time_buckets(histogram: TimeSnapshot) -> tuple[list[tuple[str, float]], float]:
    """The engine's bounds, counts per bound (+ one above) and sum -> cumulative Prometheus buckets, sum."""
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for bound, count in zip(histogram.bounds, histogram.counts):
        cumulative += count
        buckets.append((repr(float(bound)), cumulative))
    buckets.append(("+Inf", cumulative + histogram.counts[-1]))
    return buckets, float(histogram.sum_s)


def _histogram(counts: Mapping[int, int]) -> tuple[list[tuple[str, float]], float]:
    """{batch size: steps} -> cumulative Prometheus buckets and the sum of sizes."""
    sizes = {int(size): int(n) for size, n in counts.items()}
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for bound in COUNT_BUCKETS:
        cumulative = sum(n for size, n in sizes.items() if size <= bound)
        buckets.append((str(bound), cumulative))
    buckets.append(("+Inf", sum(sizes.values())))
    return buckets, float(sum(size * n for size, n in sizes.items()))


# Methods that get their own metrics label; any other (a client may send any token) counts as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
CLIENT_LEFT = 499  # nginx's status for a request whose client went away before its response was complete


def route_label(scope: Scope, outer_root_path: str) -> str:
    """A bounded label for the route that served the request: the route template ("/models/{name}"), the
    mount point of a mounted app ("/static"), the path of a fixed framework route ("/openapi.json",
    "/docs"), or "unmatched"."""
    route = scope.get("route")
    if route is not None:
        return getattr(route, "path", "unmatched")
    if scope.get("endpoint") is None:
        return "unmatched"
    mounted = scope.get("root_path", "")[len(outer_root_path) :]
    return mounted or scope["path"]  # a Route without an APIRoute has no parameters: its path is fixed


class MetricsMiddleware:
    """Every HTTP request: counted by route label, method and status, timed to the last byte, given a
    request id (the caller's X-Request-ID if sane, else a new one; echoed in the response header and in
    every error body) and logged as one JSON access line (route, status, duration, model, images, id).
    A client that left before its response was complete is logged and counted as 499; a request the
    connection guard answered itself (408 mid-body) with that status; an unhandled error as a 500
    `internal` error body with the request id, its traceback logged."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees if the app raises before answering
        response_started = response_complete = client_left = False
        given = dict(scope.get("headers", ())).get(REQUEST_ID_HEADER, b"")
        request_id = given.decode() if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        state = scope.setdefault("state", {})  # routes note the model and the image count in request.state
        state[REQUEST_ID_STATE] = request_id
        outer_root_path = scope.get("root_path", "")

        async def receive_and_watch() -> Message:
            nonlocal client_left
            message = await receive()
            if message["type"] == "http.disconnect" and not response_complete:
                client_left = True
            return message

        async def send_and_watch(message: Message) -> None:
            nonlocal status, response_started, response_complete
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())],
                }
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                response_complete = True
            await send(message)

        try:
            await self.app(scope, receive_and_watch, send_and_watch)
        except Exception as error:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            self.metrics.failures.labels(reason="internal").inc()
            if response_started:
                raise  # too late for an error body: the server closes the connection
            internal = HttpError(500, "internal", f"internal server error ({type(error).__name__})")
            await error_response(internal, scope["path"])(scope, receive, send_and_watch)
        finally:
            REQUEST_ID.reset(token)
            duration = time.perf_counter() - started
            if REFUSED_STATUS in state:
                status = state[REFUSED_STATUS]
            elif client_left and not response_complete:
                status = CLIENT_LEFT
            route = route_label(scope, outer_root_path)
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            labels = dict(route=route, method=method, status=str(status))
            self.metrics.requests.labels(**labels).inc()
            self.metrics.request_duration.labels(**labels).observe(duration)
            tenant = state.get(TENANT_STATE)
            if tenant is not None:
                self.metrics.tenant_requests.labels(tenant=tenant.name, status=str(status)).inc()
            access_log.info(
                json.dumps(
                    {
                        "request_id": request_id,
                        "method": scope["method"][:16],
                        "route": route,
                        "path": scope["path"][:256],
                        "status": status,
                        "duration_s": round(duration, 4),
                        "model": state.get("model"),
                        "images": state.get("images"),
                    }
                )
            )
