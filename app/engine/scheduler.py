"""The batching scheduler: concurrent requests for one model share every decode step.

Continuous batching at row granularity. All images in the running batch share the column index; each
request has its own row index, so a request joins at the next row boundary without waiting for the
others to finish, and a finished or cancelled request leaves at once, freeing its slots. The cached
state of every image is independent of its row index (see cached.py), which is what makes this exact:
a request's images are the same whether it runs alone or beside others.

Decode lanes: each lane is a thread with its own batch and caches (see Engine). The compiled row loop
releases the GIL, so the lanes and the asyncio event loop run side by side. Results reach each
request's asyncio queue through call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from app.model import ModelConfig, SampleResult

from .cached import CachedSampler, DecodeCache
from .protocol import row_uniforms, start_sampling
from .scoring import LikelihoodResult, QueueFullError, Scorer

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    n: int = 1
    seed: int = 0
    labels: list[int] | torch.Tensor | None = None  # None: drawn with the seed (class-conditional models)
    temperature: float = 1.0
    known: np.ndarray | torch.Tensor | None = None  # uint8 (1 or n, C, H, W): image to complete
    known_rows: int = 0  # rows of `known` kept; generation starts at this row


@dataclass
class RowEvent:
    row: int
    pixels: torch.Tensor  # uint8 (n, C, W)


class EngineStoppedError(RuntimeError):
    """The engine stopped (or was never started) before the request finished."""


class GenerationError(RuntimeError):
    """A prefill or decode step failed; the request can be retried."""


@dataclass
class _Job:
    """One request inside the engine."""

    request: GenerationRequest
    generator: torch.Generator
    labels: torch.Tensor | None
    canvas: torch.Tensor  # int64 (n, C, H, W) on the engine's device
    row: int
    deliver: callable
    withdraw: callable  # takes the job out of the engine's waiting queue, if it is still there
    wants_rows: bool  # deliver a RowEvent per row, or only the result (one wake-up of the caller in all)
    log_prob: torch.Tensor = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_row_at: float | None = None  # perf_counter() when the first generated row was final

    @property
    def n(self) -> int:
        return self.request.n


_CANCELLED = object()  # queued by Stream.cancel() so that a consumer waiting for the next item wakes up


class Stream:
    """Async iterator over a request's RowEvents (when submitted with rows=True), then its SampleResult.
    Cancelling ends the iteration, also for a consumer already waiting for the next item."""

    def __init__(self, job: _Job, queue: asyncio.Queue) -> None:
        self._job = job
        self._queue = queue
        self._finished = False

    def __aiter__(self) -> "Stream":
        return self

    async def __anext__(self) -> RowEvent | SampleResult:
        if self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _CANCELLED:
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
        first = self._job.first_row_at
        return None if first is None else first - self._job.submitted

    async def cancel(self) -> None:
        """Stop the work: the request leaves the batch at the next row boundary."""
        if not self._finished:
            self._job.cancelled = True
            self._finished = True
            self._job.withdraw(self._job)  # a waiting request leaves the queue now, not at its head
            self._queue.put_nowait(_CANCELLED)

    async def aclose(self) -> None:
        await self.cancel()

    async def result(self) -> SampleResult:
        """Consume the rows and return the final result."""
        async for item in self:
            if isinstance(item, SampleResult):
                return item
        raise EngineStoppedError("the stream ended without a result")


TIME_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class TimeHistogram:
    """Cumulative counts of durations per upper bound (seconds) and their sum; what a Prometheus
    histogram exports, kept here so that the engine needs no metrics library. Changed under a lock."""

    def __init__(self, bounds: tuple[float, ...] = TIME_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.total_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if seconds <= b), len(self.bounds))] += 1
        self.total_s += seconds

    def snapshot(self) -> dict:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.total_s}


class _Lane:
    """One decode thread and the batch it runs: its requests and their caches, which only it touches."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()
        self.active: list[_Job] = []
        self.state: DecodeCache | None = None
        self.images = 0  # images in `active`; changed under the engine's lock, read by other lanes
        # Decode statistics, changed under the engine's lock: named counts, and decode steps per batch size.
        self.counters: collections.Counter[str] = collections.Counter()
        self.batch_sizes: collections.Counter[int] = collections.Counter()


class Engine:
    """Continuous batching over `lanes` decode threads.

    Each lane runs its own batch, joined by the waiting requests at its row boundaries, up to a fair
    share of the images each. The row loop is compiled and releases the GIL, so on a CPU with several
    cores the lanes decode in parallel: 16 requests in 2 lanes of 8 finish sooner than one batch of 16,
    whose step costs real arithmetic on one core. On a GPU one lane (one big batch) is the right choice.
    """

    def __init__(
        self, model: nn.Module, max_batch_images: int = 64, max_queue: int = 64, lanes: int = 1,
        batch_wait_s: float = 0.002,
    ) -> None:
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {batch_wait_s}")
        self.model = model.eval()
        self.config: ModelConfig = model.config
        self.sampler = CachedSampler(model)
        self.device = self.sampler.device
        self.max_batch_images = max_batch_images  # per decode step, i.e. per lane
        self.max_queue = max_queue
        # An idle lane that finds work first lets a burst finish arriving: it starts once no request has
        # come for batch_wait_s (at most 5 x batch_wait_s in all), so requests sent together start together
        # instead of trickling in one row apart. A lone request pays batch_wait_s once.
        self.batch_wait_s = batch_wait_s
        self._last_submit = 0.0  # perf_counter() of the latest submit
        self.scorer = Scorer(self.model, max_in_flight=max_queue)
        self._waiting: collections.deque[_Job] = collections.deque()
        self._lock = threading.Lock()
        self._lanes = [_Lane(index) for index in range(lanes)]
        self._stopping = False
        self._counters = collections.Counter()  # changed under the lock
        self._batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)  # under the lock
        self._queue_wait = TimeHistogram()  # submit -> joining a lane's batch, under the lock
        self._row_time = TimeHistogram()  # one decode step (a row of every image in a lane), under the lock

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the decode lanes; CUDA graphs of every batch bucket are captured first, so nothing else
        touches the device while they are recorded and no request ever waits for a capture."""
        if self.running:
            return
        await asyncio.to_thread(self.sampler.capture_graphs)
        self._stopping = False
        for lane in self._lanes:
            lane.thread = threading.Thread(target=self._run, args=(lane,), name=f"pixelcnn-decode-{lane.index}",
                                           daemon=True)
            lane.thread.start()

    async def stop(self) -> None:
        """Stop the lanes after their current row; every request not finished gets EngineStoppedError."""
        threads = [lane.thread for lane in self._lanes if lane.thread is not None]
        if not threads:
            return
        with self._lock:
            self._stopping = True
        for lane in self._lanes:
            lane.wake.set()
        for thread in threads:
            await asyncio.to_thread(thread.join)
        with self._lock:
            leftover = list(self._waiting)
            self._waiting.clear()
            for lane in self._lanes:
                leftover += lane.active
                lane.thread, lane.active, lane.state, lane.images = None, [], None, 0
        for job in leftover:
            job.deliver(EngineStoppedError("the server is shutting down"))

    @property
    def running(self) -> bool:
        return any(lane.thread is not None and lane.thread.is_alive() for lane in self._lanes)

    def stats(self) -> dict:
        with self._lock:
            waiting = len(self._waiting)
            active = [job for lane in self._lanes for job in lane.active]
            scoring = self.scorer.in_flight
            counters, batch_sizes = collections.Counter(self._counters), collections.Counter()
            for lane in self._lanes:  # update(), not +: keeps the counts that are still 0
                counters.update(lane.counters)
                batch_sizes.update(lane.batch_sizes)
            rows_per_lane = [lane.counters["rows_decoded"] for lane in self._lanes]
            sizes = list(self._batch_sizes)
            timings = {"queue_wait_seconds": self._queue_wait.snapshot(), "row_decode_seconds": self._row_time.snapshot()}
        return {
            "lanes": len(self._lanes),
            "queue_size": waiting,
            "likelihood_in_flight": scoring,
            "active_requests": len(active),
            "active_images": sum(job.n for job in active),
            "max_batch_images": self.max_batch_images,
            "last_batch_size": sizes[-1] if sizes else 0,
            "max_batch_size_seen": max(sizes, default=0),
            "recent_batch_sizes": sizes[-50:],
            "batch_sizes_seen": dict(batch_sizes),  # decode steps per batch size, all lanes
            "histograms": timings,
            "rows_decoded_per_lane": rows_per_lane,
            **dict(counters),
            "rejected_queue_full": counters["rejected_queue_full"] + self.scorer.rejected,
            "likelihood_errors": self.scorer.failed,
        }

    # ---- requests --------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, rows: bool = True) -> Stream:
        """Queue a request; raises ValueError for a bad request and QueueFullError when the queue is full.

        rows=False delivers only the result: a caller that does not stream is then woken once, not once
        per row, which keeps the event loop (and the GIL) free for the decode lanes."""
        if not 1 <= request.n <= self.max_batch_images:
            raise ValueError(f"n must be between 1 and {self.max_batch_images}, got {request.n}")
        generator, labels, canvas = start_sampling(
            self.config, request.n, request.labels, request.temperature, request.seed,
            request.known, request.known_rows, self.device,
        )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        job = _Job(request, generator, labels, canvas, request.known_rows, deliver, self._withdraw, rows)
        job.log_prob = torch.zeros(request.n, dtype=torch.float64)
        with self._lock:
            if self._stopping or not self.running:
                raise EngineStoppedError("the engine is not running")
            if len(self._waiting) >= self.max_queue:
                self._counters["rejected_queue_full"] += 1
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting)")
            self._waiting.append(job)
            self._counters["requests_submitted"] += 1
            self._last_submit = time.perf_counter()
        for lane in self._lanes:  # the least loaded lane takes it; an idle lane is always least loaded
            lane.wake.set()
        return Stream(job, queue)

    async def generate(self, request: GenerationRequest) -> SampleResult:
        return await self.submit(request, rows=False).result()

    def _withdraw(self, job: _Job) -> None:
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                self._counters["requests_cancelled"] += 1

    async def likelihood(self, images, labels=None) -> LikelihoodResult:
        """Teacher-forced NLL (see Scorer.score)."""
        return await self.scorer.score(images, labels)

    # ---- decode loop (one thread per lane) ---------------------------------------------------------------
    def _run(self, lane: _Lane) -> None:
        while not self._stopping:
            try:
                if not lane.active and self._waiting:
                    self._let_the_burst_arrive()
                self._admit(lane)
                if not lane.active:
                    lane.wake.wait(timeout=0.5)
                    lane.wake.clear()
                    continue
                self._decode_one_row(lane)
            except Exception as error:  # never leave a client hanging: fail the batch, keep serving
                log.exception("decode step failed")
                with self._lock:
                    self._counters["decode_errors"] += 1
                    failed, lane.active, lane.state, lane.images = lane.active, [], None, 0
                for job in failed:
                    job.deliver(GenerationError(f"generation failed ({type(error).__name__}: {error})"))

    def _let_the_burst_arrive(self) -> None:
        deadline = time.perf_counter() + 5 * self.batch_wait_s
        while not self._stopping:
            now = time.perf_counter()
            quiet_at = min(self._last_submit + self.batch_wait_s, deadline)
            if now >= quiet_at:
                return
            time.sleep(quiet_at - now)

    def _admit(self, lane: _Lane) -> None:
        """Move waiting requests into this lane while they fit, up to its fair share of all the images
        (running and waiting), and beyond that only while it is the least loaded lane. FIFO, so none
        starves: a lane that leaves a request to a less loaded one lets it take the request within a row."""
        joined = []
        with self._lock:
            others = [other.images for other in self._lanes if other is not lane]
            total = lane.images + sum(others) + sum(job.n for job in self._waiting if not job.cancelled)
            fair_share = -(-total // len(self._lanes))
            while self._waiting:
                job = self._waiting[0]
                if job.cancelled:
                    self._waiting.popleft()
                    self._counters["requests_cancelled"] += 1
                    continue
                least_loaded = lane.images <= min(others, default=lane.images)
                if job.n > self.max_batch_images - lane.images or not (lane.images < fair_share or least_loaded):
                    break
                self._waiting.popleft()
                lane.images += job.n
                self._queue_wait.observe(time.perf_counter() - job.submitted)
                joined.append(job)
        if not joined:
            return
        states = [lane.state] if lane.state is not None else []
        pending = list(joined)
        try:
            self._prefill(lane, pending, states)
        finally:  # whatever was not handled fails with the batch in _run, never left waiting
            lane.active.extend(pending)
        lane.state = DecodeCache.concat(states) if states else None

    def _prefill(self, lane: _Lane, pending: list[_Job], states: list[DecodeCache]) -> None:
        """Prefill each joining request, taking it off `pending` once it is active, done or failed."""
        for job in list(pending):
            pending.remove(job)
            try:  # prefill: one pass over the known rows fills this request's caches
                state = self.sampler.prefill(job.canvas, job.labels, job.row)
            except Exception as error:  # this request fails; the others, running or joining, go on
                log.exception("prefill failed")
                with self._lock:
                    lane.images -= job.n
                    self._counters["prefill_errors"] += 1
                job.deliver(GenerationError(f"prefill failed ({type(error).__name__}: {error})"))
                continue
            if job.row >= self.config.height:  # nothing to generate (all rows known)
                with self._lock:
                    lane.images -= job.n
                    self._counters["requests_completed"] += 1
                job.deliver(SampleResult(job.canvas.to(torch.uint8).cpu(), job.labels, job.log_prob))
                continue
            states.append(state)
            lane.active.append(job)  # from here a failure (even of the merge) reaches it via _run

    def _decode_one_row(self, lane: _Lane) -> None:
        c, w = self.config.image_channels, self.config.width
        uniforms = torch.cat([row_uniforms(job.generator, job.n, c, w) for job in lane.active])
        temperatures = torch.cat(
            [torch.full((job.n, 1), float(job.request.temperature), dtype=torch.float64) for job in lane.active]
        )
        step_started = time.perf_counter()
        rows, log_prob = self.sampler.decode_row(lane.state, uniforms, temperatures)
        step_s = time.perf_counter() - step_started
        rows_cpu, log_prob = rows.to(torch.uint8).cpu(), log_prob.cpu()
        counts = collections.Counter(rows_decoded=1)

        keep, still_active, finished, offset = [], [], [], 0
        for job in lane.active:
            part = slice(offset, offset + job.n)
            offset += job.n
            if job.cancelled:
                counts["requests_cancelled"] += 1
                continue
            job.canvas[:, :, job.row] = rows[part]
            job.log_prob += log_prob[part]
            if job.first_row_at is None:
                job.first_row_at = time.perf_counter()
            if job.wants_rows:
                job.deliver(RowEvent(job.row, rows_cpu[part].clone()))
            job.row += 1
            if job.row == self.config.height:
                finished.append(job)
                continue
            keep.extend(range(part.start, part.stop))
            still_active.append(job)
        if len(still_active) != len(lane.active):
            lane.state = lane.state.select(torch.tensor(keep, dtype=torch.long, device=self.device)) if keep else None
        counts["requests_completed"] += len(finished)
        with self._lock:
            lane.active = still_active
            lane.images = sum(job.n for job in still_active)
            lane.counters.update(counts)
            lane.batch_sizes[uniforms.shape[0]] += 1
            self._batch_sizes.append(uniforms.shape[0])
            self._row_time.observe(step_s)
        # Results last: whoever receives one sees an engine that has already let go of the request.
        for job in finished:
            job.deliver(SampleResult(job.canvas.to(torch.uint8).cpu(), job.labels, job.log_prob.clone()))
