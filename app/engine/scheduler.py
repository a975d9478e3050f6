"""The batching scheduler: concurrent requests for one model share every decode step.

Continuous batching at row granularity. All images in the running batch share the column index; each
request has its own row index, so a request joins at the next row boundary without waiting for the
others to finish, and a finished or cancelled request leaves at once, freeing its slots. The cached
state of every image is independent of its row index (see cached.py), which is what makes this exact:
a request's images are the same whether it runs alone or beside others.

Decode lanes: each lane is a thread with its own batch and caches (lanes.py). The compiled row loop
releases the GIL, so the lanes and the asyncio event loop run side by side. Results reach each
request's asyncio queue through call_soon_threadsafe.

A request of several images is split into shards, one per lane (at most one image each), which join
lanes like requests of their own: every image has its own random stream (protocol.py), so where an image
is drawn changes nothing; fan_in.py gathers their rows and ending into the caller's Stream (stream.py).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time

from app.model import ModelConfig, PixelCNNModel

from .admission import MIXED_PRIORITIES_HOLD_S
from .cached import CachedSampler
from .fan_in import Delivery, Shard, TrackedRequest
from .lanes import Lane, LaneLoop
from .protocol import ImagesIn, LabelsIn, forced_row, start_sampling
from .scoring import SCORING_NICE, Scorer
from .stats import TimeHistogram
from .stream import Stream, StreamItem
from .types import (
    EngineStats,
    EngineStoppedError,
    GenerationRequest,
    LikelihoodResult,
    QueueFullError,
    SampleResult,
)
from .wavefront import Wavefront


class Engine(LaneLoop):
    """Continuous batching over `lanes` decode threads.

    Each lane runs its own batch, joined by the waiting requests at its row boundaries, up to a fair
    share of the images each. The row loop is compiled and releases the GIL, so on a CPU with several
    cores the lanes decode in parallel: 16 requests in 2 lanes of 8 finish sooner than one batch of 16,
    whose step costs real arithmetic on one core. On a GPU one lane (one big batch) is the right choice.
    """

    def __init__(
        self,
        model: PixelCNNModel,
        max_batch_images: int = 64,
        max_queue: int = 64,
        lanes: int = 1,
        step_images: int | None = None,
        batch_wait_s: float = 0.002,
        fault_every_steps: int = 0,
        wavefront: bool | None = True,
        scoring_nice: int = SCORING_NICE,
    ) -> None:
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {batch_wait_s}")
        self.model = model.eval()
        self.config: ModelConfig = model.config
        self.sampler = CachedSampler(model)
        self.device = self.sampler.device
        self.max_batch_images = max_batch_images  # held by one lane, and the most one request may ask for
        # The most images one decode step draws a row of (admission.py): a lane's other images wait their
        # turn, so a higher-priority arrival waits for one such step at most. On a CPU a row costs the same
        # per image from 16 images up (BENCHMARKS.md), so smaller steps cost no throughput there; a GPU
        # wants the biggest batch it can get.
        if step_images is None:
            step_images = max_batch_images if self.device.type == "cuda" else min(16, max_batch_images)
        if step_images < 1:
            raise ValueError(f"step_images must be >= 1, got {step_images}")
        self.step_images = step_images
        # While work of different priorities shares the engine, steps are half as big: the wait of a
        # higher-priority arrival for the step in flight halves, for about 4% more CPU per image on a CPU
        # (BENCHMARKS.md), paid only then. Mixing is noticed at submit and holds MIXED_PRIORITIES_HOLD_S.
        self.mixed_step_images = max(1, step_images // 2)
        self._mixed_until = 0.0  # time.monotonic() until which priorities count as mixed
        self.max_queue = max_queue
        # An idle lane that finds work first lets a burst finish arriving: it starts once no request has
        # come for batch_wait_s (at most 5 x batch_wait_s in all), so requests sent together start together
        # instead of trickling in one row apart. A lone request pays batch_wait_s once.
        self.batch_wait_s = batch_wait_s
        self._last_submit = 0.0  # perf_counter() of the latest submit
        # A request's passes side by side, below the lanes' CPU priority (scoring.lower_thread_priority).
        self.scorer = Scorer(self.model, max_in_flight=max_queue, threads=lanes, nice=scoring_nice)
        self._waiting: collections.deque[Shard] = collections.deque()
        self._lock = threading.Lock()
        self._lanes = [Lane(index) for index in range(lanes)]
        self._stopping = False
        self._counters: collections.Counter[str] = collections.Counter()  # changed under the lock
        self._batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)  # under the lock
        self._queue_wait = TimeHistogram()  # submit -> joining a lane's batch, under the lock
        self._row_time = TimeHistogram()  # one decode step (a row of every image in a lane), under the lock
        # Soak and tests only: every Nth decode step fails, as a real fault would (0: never).
        self.fault_every_steps = fault_every_steps
        self._steps = itertools.count(1)
        # Wavefront decoding (wavefront.py): a lane whose batch is one request, while nothing waits, draws its
        # rows in one call of the C kernel, on as many threads as there are lanes if the others are idle, else
        # on its own; any submit sets the lanes' stop flags, and the lane goes back to row-by-row batching
        # after the rows in flight (LaneLoop._wavefront_lanes). `wavefront`: use it where it applies (True),
        # never (False: row by row), or on several threads only where that measures faster at start (None,
        # what the server does: _tune_wavefront).
        self.wavefront = Wavefront.for_row_loop(self.sampler.row_loop) if wavefront is not False else None
        self._wavefront_most_threads = 1 if self.wavefront is None else min(lanes, self.wavefront.useful_lanes)
        self._measure_wavefront = wavefront is None and self._wavefront_most_threads > 1

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the decode lanes; CUDA graphs of every batch bucket are captured first, so nothing else
        touches the device while they are recorded and no request ever waits for a capture."""
        if self.running:
            return
        await asyncio.to_thread(self.sampler.capture_graphs)
        if self._measure_wavefront:
            self._measure_wavefront = False
            if not await asyncio.to_thread(self._tune_wavefront):
                self._wavefront_most_threads = 1  # its rows still in one call, on the lane's own thread
        self._stopping = False
        for lane in self._lanes:
            lane.thread = threading.Thread(
                target=self._run, args=(lane,), name=f"pixelcnn-decode-{lane.index}", daemon=True
            )
            lane.thread.start()

    async def stop(self) -> None:
        """Stop the lanes after their current row; every request not finished gets EngineStoppedError."""
        threads = [lane.thread for lane in self._lanes if lane.thread is not None]
        if not threads:
            return
        with self._lock:
            self._stopping = True
            self._stop_wavefronts()  # an image's remaining rows would outlast the shutdown's drain
        for lane in self._lanes:
            lane.wake.set()
        for thread in threads:
            await asyncio.to_thread(thread.join)
        with self._lock:
            leftover = list(self._waiting)
            self._waiting.clear()
            for lane in self._lanes:
                leftover += lane.active + [shard for group in lane.groups for shard in group.shards]
                lane.thread, lane.active, lane.state, lane.images, lane.groups = None, [], None, 0, []
        for shard in leftover:
            shard.owner.fail(EngineStoppedError("the server is shutting down"))
        self.scorer.close()

    @property
    def numerics(self) -> str:
        """The sampler's numerics fingerprint (RowLoop.numerics): what a seeded request's bytes depend on."""
        return self.sampler.numerics

    @property
    def lone_request_threads(self) -> int:
        """Threads that draw a lone request on an idle engine: more than one by wavefront (0: row by row)."""
        return 0 if self.wavefront is None else self._wavefront_most_threads

    @property
    def running(self) -> bool:
        return any(lane.thread is not None and lane.thread.is_alive() for lane in self._lanes)

    def stats(self) -> EngineStats:
        with self._lock:
            waiting = self._waiting_requests()
            active = [shard for lane in self._lanes for shard in lane.active]
            active += [shard for lane in self._lanes for group in lane.groups for shard in group.shards]
            counters: collections.Counter[str] = collections.Counter(self._counters)
            batch_sizes: collections.Counter[int] = collections.Counter()
            for lane in self._lanes:
                counters.update(lane.counters)
                batch_sizes.update(lane.batch_sizes)
            rows_per_lane = [lane.counters["rows_decoded"] for lane in self._lanes]
            sizes = list(self._batch_sizes)
            queue_wait, row_time = self._queue_wait.snapshot(), self._row_time.snapshot()
            scoring = self.scorer.in_flight
        return EngineStats(
            lanes=len(self._lanes),
            queue_size=waiting,
            likelihood_in_flight=scoring,
            active_requests=len({id(shard.owner) for shard in active}),
            active_images=sum(shard.n for shard in active),
            max_batch_images=self.max_batch_images,
            last_batch_size=sizes[-1] if sizes else 0,
            max_batch_size_seen=max(sizes, default=0),
            recent_batch_sizes=sizes[-50:],
            batch_sizes_seen=dict(batch_sizes),
            queue_wait_seconds=queue_wait,
            row_decode_seconds=row_time,
            rows_decoded_per_lane=rows_per_lane,
            wavefront_threads=sum(lane.wavefront_threads for lane in self._lanes),
            requests_submitted=counters["requests_submitted"],
            requests_completed=counters["requests_completed"],
            requests_cancelled=counters["requests_cancelled"],
            rows_decoded=counters["rows_decoded"],
            rows_wavefront=counters["rows_wavefront"],
            wavefront_stopped=counters["wavefront_stopped"],
            rejected_queue_full=counters["rejected_queue_full"] + self.scorer.rejected,
            decode_errors=counters["decode_errors"],
            prefill_errors=counters["prefill_errors"],
            likelihood_errors=self.scorer.failed,
            likelihood_cancelled=self.scorer.cancelled,
            likelihood_passes=self.scorer.passes,
            requests_expired=counters["requests_expired"] + self.scorer.expired,
            rows_past_deadline=counters["rows_past_deadline"],
            shards_parked=counters["shards_parked"],
        )

    # ---- requests --------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, rows: bool = True) -> Stream:
        """Queue a request; raises ValueError for a bad request and QueueFullError when the queue is full.

        rows=False delivers only the result: a caller that does not stream is then woken once, not once
        per row, which keeps the event loop (and the GIL) free for the decode lanes."""
        if not 1 <= request.n <= self.max_batch_images:
            raise ValueError(f"n must be between 1 and {self.max_batch_images}, got {request.n}")
        streams, labels, canvas, infer = start_sampling(
            self.config,
            request.n,
            request.labels,
            request.temperature,
            request.seed,
            request.known,
            request.known_rows,
            self.device,
            request.label_mode,
            request.known_columns,
        )
        with self._lock:  # checked, then refused before the rest is prepared: under a flood most arrivals end here
            if self._priorities_present() - {request.priority}:  # before its shards are cut to the step size
                self._mixed_until = time.monotonic() + MIXED_PRIORITIES_HOLD_S
            self._room_for(request.priority)
        forced = forced_row(canvas, request.known_rows, request.known_columns)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamItem] = asyncio.Queue()

        def deliver(item: Delivery) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        # One shard per lane, so that an idle engine draws a big request on every core, and at most
        # step_images images each (a shard is never cut across steps); a completion with nothing to
        # generate is answered by its prefill alone.
        steps = -(-request.n // self._step_images_now())
        parts = 1 if request.known_rows >= self.config.height else min(max(len(self._lanes), steps), request.n)
        owner = TrackedRequest(request, labels, canvas, parts, deliver, self._withdraw, rows)
        bounds = [request.n * k // parts for k in range(parts + 1)]
        shards = [
            Shard(
                owner,
                a,
                b,
                streams[a:b],
                None if labels is None else labels[a:b],
                canvas[a:b],
                request.known_rows,
                infer_labels=infer,
                forced=None if forced is None else forced[a:b],
            )
            for a, b in itertools.pairwise(bounds)
        ]
        with self._lock:
            if self._stopping or not self.running:
                raise EngineStoppedError("the engine is not running")
            displaced = self._room_for(request.priority)
            if displaced is not None:
                self._counters["rejected_queue_full"] += 1
                self._waiting = collections.deque(shard for shard in self._waiting if shard.owner is not displaced)
            self._waiting.extend(shards)
            self._stop_wavefronts()  # to batch the new request with the running one
            self._counters["requests_submitted"] += 1
            self._last_submit = time.perf_counter()
        if displaced is not None:
            displaced.fail(QueueFullError("the queue is full and higher-priority work took this request's place"))
        for lane in self._lanes:  # the least loaded lane takes it; an idle lane is always least loaded
            lane.wake.set()
        return Stream(owner, queue)

    def _priorities_present(self) -> set[int]:
        """The priorities of the work waiting or in a lane; under the lock."""
        in_lanes = (shard for lane in self._lanes for shard in lane.shards())
        return {shard.owner.request.priority for shard in itertools.chain(self._waiting, in_lanes)}

    def _room_for(self, priority: int) -> TrackedRequest | None:
        """Room in the queue for a request of `priority`: None when there is some, else the waiting request
        it would push out; QueueFullError when there is neither. Under the lock."""
        if self._waiting_requests() < self.max_queue:
            return None
        displaced = self._displaceable(priority)
        if displaced is None:
            self._counters["rejected_queue_full"] += 1
            raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting)")
        return displaced

    def _displaceable(self, priority: int) -> TrackedRequest | None:
        """The waiting request a new one of `priority` may push out of a full queue: the latest of the
        lowest priority below it (none: the new one is refused). Under the lock."""
        lower = [shard.owner for shard in self._waiting if shard.owner.request.priority < priority]
        if not lower:
            return None
        lowest = min(owner.request.priority for owner in lower)
        return [owner for owner in lower if owner.request.priority == lowest][-1]

    async def generate(self, request: GenerationRequest) -> SampleResult:
        return await self.submit(request, rows=False).result()

    def _stop_wavefronts(self) -> None:
        """Every lane's wavefront in flight stops after the rows it is drawing (a lane starting one clears its
        flag under the lock first, LaneLoop._wavefront_lanes). Under the lock."""
        for lane in self._lanes:
            lane.stop_wavefront.value = 1

    def _waiting_requests(self) -> int:
        """Requests with a shard in the queue; under the lock."""
        return len({id(shard.owner) for shard in self._waiting})

    def _withdraw(self, owner: TrackedRequest) -> None:
        with self._lock:
            self._stop_wavefronts()  # a cancelled request's rows would go nowhere (others resume at once)
            left = [shard for shard in self._waiting if shard.owner is not owner]
            if len(left) != len(self._waiting):
                self._waiting = collections.deque(left)
                self._count_cancelled(owner, self._counters)

    async def likelihood(
        self, images: ImagesIn, labels: LabelsIn = None, deadline: float | None = None
    ) -> LikelihoodResult:
        """Teacher-forced NLL (see Scorer.score); no pass begins after `deadline` (time.monotonic())."""
        return await self.scorer.score(images, labels, deadline)
