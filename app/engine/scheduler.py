"""The batching scheduler: concurrent requests for one model share every decode step.

Continuous batching at row granularity. All images in the running batch share the column index; each
request has its own row index, so a request joins at the next row boundary without waiting for the
others to finish, and a finished or cancelled request leaves at once, freeing its slots. The cached
state of every image is independent of its row index (see cached.py), which is what makes this exact:
a request's images are the same whether it runs alone or beside others.

Decode lanes: each lane is a thread with its own batch and caches (see Engine). The compiled row loop
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
import logging
import threading
import time

import torch

from app.model import ModelConfig, PixelCNNModel

from .admission import admission_order, expired
from .cache import DecodeCache
from .cached import CachedSampler
from .fan_in import Delivery, Shard, TrackedRequest
from .posterior import infer_labels
from .protocol import ImagesIn, LabelsIn, forced_row, row_uniforms, start_sampling
from .scoring import Scorer
from .stats import TimeHistogram
from .stream import Stream, StreamItem
from .types import (
    DeadlineExceededError,
    EngineStats,
    EngineStoppedError,
    GenerationError,
    GenerationRequest,
    LikelihoodResult,
    QueueFullError,
    SampleResult,
)

log = logging.getLogger(__name__)


class _Lane:
    """One decode thread and the batch it runs: its requests and their caches, which only it touches."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()
        self.active: list[Shard] = []
        self.state: DecodeCache | None = None
        # Shards set aside, each with its own caches, while shards of a higher priority run in this lane:
        # they resume (exactly where they were) once no higher-priority shard is left.
        self.parked: list[tuple[Shard, DecodeCache]] = []
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
        self,
        model: PixelCNNModel,
        max_batch_images: int = 64,
        max_queue: int = 64,
        lanes: int = 1,
        batch_wait_s: float = 0.002,
        fault_every_steps: int = 0,
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
        self._waiting: collections.deque[Shard] = collections.deque()
        self._lock = threading.Lock()
        self._lanes = [_Lane(index) for index in range(lanes)]
        self._stopping = False
        self._counters: collections.Counter[str] = collections.Counter()  # changed under the lock
        self._batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)  # under the lock
        self._queue_wait = TimeHistogram()  # submit -> joining a lane's batch, under the lock
        self._row_time = TimeHistogram()  # one decode step (a row of every image in a lane), under the lock
        # Soak and tests only: every Nth decode step fails, as a real fault would (0: never).
        self.fault_every_steps = fault_every_steps
        self._steps = itertools.count(1)

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the decode lanes; CUDA graphs of every batch bucket are captured first, so nothing else
        touches the device while they are recorded and no request ever waits for a capture."""
        if self.running:
            return
        await asyncio.to_thread(self.sampler.capture_graphs)
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
        for lane in self._lanes:
            lane.wake.set()
        for thread in threads:
            await asyncio.to_thread(thread.join)
        with self._lock:
            leftover = list(self._waiting)
            self._waiting.clear()
            for lane in self._lanes:
                leftover += lane.active + [shard for shard, _ in lane.parked]
                lane.thread, lane.active, lane.state, lane.images, lane.parked = None, [], None, 0, []
        for shard in leftover:
            shard.owner.fail(EngineStoppedError("the server is shutting down"))

    @property
    def numerics(self) -> str:
        """The sampler's numerics fingerprint (RowLoop.numerics): what a seeded request's bytes depend on."""
        return self.sampler.numerics

    @property
    def running(self) -> bool:
        return any(lane.thread is not None and lane.thread.is_alive() for lane in self._lanes)

    def stats(self) -> EngineStats:
        with self._lock:
            waiting = self._waiting_requests()
            active = [shard for lane in self._lanes for shard in lane.active]
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
            requests_submitted=counters["requests_submitted"],
            requests_completed=counters["requests_completed"],
            requests_cancelled=counters["requests_cancelled"],
            rows_decoded=counters["rows_decoded"],
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
        forced = forced_row(canvas, request.known_rows, request.known_columns)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamItem] = asyncio.Queue()

        def deliver(item: Delivery) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        # One shard per lane, so that an idle engine draws a big request on every core; a completion with
        # nothing to generate is answered by its prefill alone.
        parts = 1 if request.known_rows >= self.config.height else min(len(self._lanes), request.n)
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
            displaced = None
            if self._waiting_requests() >= self.max_queue:
                displaced = self._displaceable(request.priority)
                self._counters["rejected_queue_full"] += 1
                if displaced is None:
                    raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting)")
                self._waiting = collections.deque(shard for shard in self._waiting if shard.owner is not displaced)
            self._waiting.extend(shards)
            self._counters["requests_submitted"] += 1
            self._last_submit = time.perf_counter()
        if displaced is not None:
            displaced.fail(QueueFullError("the queue is full and higher-priority work took this request's place"))
        for lane in self._lanes:  # the least loaded lane takes it; an idle lane is always least loaded
            lane.wake.set()
        return Stream(owner, queue)

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

    def _waiting_requests(self) -> int:
        """Requests with a shard in the queue; under the lock."""
        return len({id(shard.owner) for shard in self._waiting})

    def _withdraw(self, owner: TrackedRequest) -> None:
        with self._lock:
            left = [shard for shard in self._waiting if shard.owner is not owner]
            if len(left) != len(self._waiting):
                self._waiting = collections.deque(left)
                self._count_cancelled(owner, self._counters)

    @staticmethod
    def _count_cancelled(owner: TrackedRequest, counts: collections.Counter) -> None:
        """Count a cancelled request once, whichever of its shards leaves first; under the lock."""
        if owner.cancelled and not owner.cancel_counted:
            owner.cancel_counted = True
            counts["requests_cancelled"] += 1

    async def likelihood(
        self, images: ImagesIn, labels: LabelsIn = None, deadline: float | None = None
    ) -> LikelihoodResult:
        """Teacher-forced NLL (see Scorer.score); no pass begins after `deadline` (time.monotonic())."""
        return await self.scorer.score(images, labels, deadline)

    def _expire(self, owner: TrackedRequest, counts: collections.Counter) -> bool:
        """Note that a request's deadline passed; True the first time (the caller then fails it, outside
        the lock). Under the lock."""
        if owner.expired or owner.closed:
            return False
        owner.expired = True
        counts["requests_expired"] += 1
        return True

    @staticmethod
    def _late_error() -> DeadlineExceededError:
        return DeadlineExceededError("the request's deadline passed before it finished; its work was stopped")

    def _drop_gone_and_late(self, lane: _Lane, now: float) -> list[int] | None:
        """Before a decode step (its batch is fixed at `now`): requests past their deadline end
        (DeadlineExceededError) and leave the batch, and the parked shards, with the cancelled ones, so
        no step computes a row for them. Returns the batch rows kept, or None when all are."""
        late: list[TrackedRequest] = []
        kept: list[Shard] = []
        keep: list[int] = []
        offset = 0

        def leaving(shard: Shard) -> bool:  # under the lock
            if expired(shard, now) and self._expire(shard.owner, self._counters):
                late.append(shard.owner)
            if shard.owner.gone or shard.owner.expired:
                self._count_cancelled(shard.owner, self._counters)
                return True
            return False

        with self._lock:
            for shard in lane.active:
                if not leaving(shard):
                    kept.append(shard)
                    keep.extend(range(offset, offset + shard.n))
                offset += shard.n
            if len(kept) != len(lane.active):
                lane.active = kept
                lane.images = sum(shard.n for shard in kept)
            lane.parked = [(shard, cache) for shard, cache in lane.parked if not leaving(shard)]
        for owner in late:
            owner.fail(self._late_error())
        if len(keep) == offset:
            return None
        assert lane.state is not None
        lane.state = lane.state.select(torch.tensor(keep, dtype=torch.long, device=self.device)) if keep else None
        return keep

    def _park(self, lane: _Lane, priority: int) -> None:
        """Set aside the lane's shards below `priority`, each with its caches (this lane's thread only)."""
        if lane.state is None:
            return
        kept: list[Shard] = []
        keep: list[int] = []
        offset = 0
        for shard in lane.active:
            rows = list(range(offset, offset + shard.n))
            offset += shard.n
            if shard.owner.request.priority < priority:
                index = torch.tensor(rows, dtype=torch.long, device=self.device)
                lane.parked.append((shard, lane.state.select(index)))
            else:
                kept.append(shard)
                keep.extend(rows)
        if len(kept) == len(lane.active):
            return
        lane.state = lane.state.select(torch.tensor(keep, dtype=torch.long, device=self.device)) if keep else None
        with self._lock:
            self._counters["shards_parked"] += len(lane.active) - len(kept)
            lane.active = kept
            lane.images = sum(shard.n for shard in kept)

    def _run_by_priority(self, lane: _Lane) -> None:
        """Only the highest priority present in the lane decodes: lower shards are parked, and parked
        shards resume once nothing above them is left (they take no step meanwhile)."""
        if not lane.active and not lane.parked:
            return
        top = max(shard.owner.request.priority for shard in [*lane.active, *(s for s, _ in lane.parked)])
        if any(shard.owner.request.priority < top for shard in lane.active):
            self._park(lane, top)
        resuming = [(shard, cache) for shard, cache in lane.parked if shard.owner.request.priority == top]
        room = self.max_batch_images - lane.images
        back: list[tuple[Shard, DecodeCache]] = []
        for shard, cache in resuming:
            if shard.n <= room:
                back.append((shard, cache))
                room -= shard.n
        if not back:
            return
        lane.state = DecodeCache.concat(([lane.state] if lane.state is not None else []) + [c for _, c in back])
        with self._lock:
            lane.parked = [entry for entry in lane.parked if all(entry[0] is not shard for shard, _ in back)]
            lane.active.extend(shard for shard, _ in back)
            lane.images = sum(shard.n for shard in lane.active)

    # ---- decode loop (one thread per lane) ---------------------------------------------------------------
    def _run(self, lane: _Lane) -> None:
        while not self._stopping:
            try:
                if not lane.active and self._waiting:
                    self._let_the_burst_arrive()
                # Cleared before looking for work: a request submitted after this wakes the wait below,
                # one submitted before is seen by _admit (clearing after the wait could lose it).
                lane.wake.clear()
                self._admit(lane)
                if not lane.active and not lane.parked:
                    lane.wake.wait(timeout=0.5)
                    continue
                self._decode_one_row(lane)
            except Exception as error:  # never leave a client hanging: fail the batch, keep serving
                with self._lock:
                    self._counters["decode_errors"] += 1
                    failed, lane.active, lane.state, lane.images = lane.active, [], None, 0
                for shard in failed:  # first, so that other lanes' shards of these requests stop at once
                    shard.owner.fail(GenerationError(f"generation failed ({type(error).__name__}: {error})"))
                log.exception("decode step failed")

    def _let_the_burst_arrive(self) -> None:
        deadline = time.perf_counter() + 5 * self.batch_wait_s
        while not self._stopping:
            now = time.perf_counter()
            quiet_at = min(self._last_submit + self.batch_wait_s, deadline)
            if now >= quiet_at:
                return
            time.sleep(quiet_at - now)

    def _admit(self, lane: _Lane) -> None:
        """Move waiting shards into this lane while they fit, up to its fair share of all the images
        (running and waiting), and beyond that only while it is the least loaded lane (so the shards of
        a request on an idle engine go one to each lane). FIFO, so none starves: a lane that leaves a
        shard to a less loaded one lets it take the shard within a row."""
        joined = []
        late: list[TrackedRequest] = []
        with self._lock:
            others = [other.images for other in self._lanes if other is not lane]
            total = lane.images + sum(others) + sum(shard.n for shard in self._waiting if not shard.owner.gone)
            fair_share = -(-total // len(self._lanes))
            self._waiting = collections.deque(admission_order(self._waiting))
            head = next((shard for shard in self._waiting if not shard.owner.gone), None)
            outranked = head is not None and any(
                shard.owner.request.priority < head.owner.request.priority for shard in lane.active
            )
        if outranked:  # set the lower-priority shards aside: the waiting one gets their room now
            assert head is not None
            self._park(lane, head.owner.request.priority)
        with self._lock:
            others = [other.images for other in self._lanes if other is not lane]
            now = time.monotonic()
            while self._waiting:
                shard = self._waiting[0]
                if expired(shard, now) and self._expire(shard.owner, self._counters):
                    late.append(shard.owner)
                if shard.owner.gone or shard.owner.expired:  # cancelled, failed in another lane, or late
                    self._waiting.popleft()
                    self._count_cancelled(shard.owner, self._counters)
                    continue
                least_loaded = lane.images <= min(others, default=lane.images)
                within_share = lane.images + shard.n <= fair_share
                # Parked shards keep their places against work of their priority or lower (else parked work
                # could grow without bound and never resume); higher-priority work takes their room.
                held = sum(
                    parked.n
                    for parked, _ in lane.parked
                    if parked.owner.request.priority >= shard.owner.request.priority
                )
                room = self.max_batch_images - lane.images - held
                if shard.n > room or not (within_share or least_loaded):
                    break
                self._waiting.popleft()
                lane.images += shard.n
                if not shard.owner.admitted:
                    shard.owner.admitted = True
                    self._queue_wait.observe(time.perf_counter() - shard.owner.submitted)
                joined.append(shard)
        for owner in late:
            owner.fail(self._late_error())
        if not joined:
            return
        states = [lane.state] if lane.state is not None else []
        pending = list(joined)
        try:
            self._prefill(lane, pending, states)
        finally:  # whatever was not handled fails with the batch in _run, never left waiting
            lane.active.extend(pending)
        lane.state = DecodeCache.concat(states) if states else None

    def _prefill(self, lane: _Lane, pending: list[Shard], states: list[DecodeCache]) -> None:
        """Prefill each joining shard, taking it off `pending` once it is active, done or failed."""
        for shard in list(pending):
            pending.remove(shard)
            try:  # prefill: one pass over the known rows fills this shard's caches
                if shard.infer_labels:  # the class first (step 2 of the protocol), from the kept rows
                    known_columns = shard.owner.request.known_columns
                    shard.labels, class_log_probs = infer_labels(
                        self.model, shard.streams, shard.canvas, shard.row, known_columns
                    )
                    shard.owner.labels_inferred(shard, shard.labels, class_log_probs)
                state = self.sampler.prefill(shard.canvas, shard.labels, shard.row)
            except Exception as error:  # this request fails; the others, running or joining, go on
                with self._lock:
                    lane.images -= shard.n
                    self._counters["prefill_errors"] += 1
                shard.owner.fail(GenerationError(f"prefill failed ({type(error).__name__}: {error})"))
                log.exception("prefill failed")
                continue
            if shard.row >= self.config.height:  # nothing to generate (all rows known): never split
                with self._lock:
                    lane.images -= shard.n
                    self._counters["requests_completed"] += 1
                shard.owner.finish()
                continue
            states.append(state)
            lane.active.append(shard)  # from here a failure (even of the merge) reaches it via _run

    def _decode_one_row(self, lane: _Lane) -> None:
        self._drop_gone_and_late(lane, time.monotonic())
        self._run_by_priority(lane)
        if not lane.active:
            return
        c, w = self.config.image_channels, self.config.width
        uniforms = torch.cat([row_uniforms(shard.streams, c, w) for shard in lane.active])
        temperatures = torch.cat(
            [
                torch.full((shard.n, 1), float(shard.owner.request.temperature), dtype=torch.float64)
                for shard in lane.active
            ]
        )
        # The step's batch is fixed now: a request that became late while the uniforms were drawn leaves
        # it here (its stream advanced, but it is over), so the step computes nothing past a deadline.
        started_at = time.monotonic()
        kept_rows = self._drop_gone_and_late(lane, started_at)
        if kept_rows is not None:
            if not lane.active:
                return
            index = torch.tensor(kept_rows, dtype=torch.long)
            uniforms, temperatures = uniforms[index], temperatures[index]
        forced = None  # kept sub-pixels of a completion whose kept pixels end mid-row, in its first row
        if any(shard.forced is not None for shard in lane.active):
            drawn = -1  # every sub-pixel of the other shards' rows
            forced = torch.cat([torch.full((s.n, c, w), drawn) if s.forced is None else s.forced for s in lane.active])
        if self.fault_every_steps and next(self._steps) % self.fault_every_steps == 0:
            raise RuntimeError(f"injected decode fault (every {self.fault_every_steps} steps)")
        step_started = time.perf_counter()
        assert lane.state is not None  # a lane with active shards has their caches
        rows, log_prob = self.sampler.decode_row(lane.state, uniforms, temperatures, forced)
        step_s = time.perf_counter() - step_started
        rows_cpu, log_prob = rows.to(torch.uint8).cpu(), log_prob.cpu()
        counts = collections.Counter(rows_decoded=1)
        counts["rows_past_deadline"] += sum(shard.n for shard in lane.active if expired(shard, started_at))

        keep: list[int] = []
        still_active: list[Shard] = []
        left: list[TrackedRequest] = []
        done: list[Shard] = []
        offset = 0
        for shard in lane.active:
            part = slice(offset, offset + shard.n)
            offset += shard.n
            if shard.owner.gone:  # cancelled, or ended by another shard's failure
                left.append(shard.owner)
                continue
            shard.owner.row_done(shard, shard.row, rows_cpu[part], log_prob[part])
            shard.row += 1
            shard.forced = None
            if shard.row == self.config.height:
                done.append(shard)
                continue
            keep.extend(range(part.start, part.stop))
            still_active.append(shard)
        if len(still_active) != len(lane.active):
            lane.state = lane.state.select(torch.tensor(keep, dtype=torch.long, device=self.device)) if keep else None
        with self._lock:
            for owner in left:
                self._count_cancelled(owner, counts)
            # A request is finished once its last shard has left its lane, so that (below) whoever receives
            # the result sees an engine that has let go of all of it, in every lane.
            finished = [shard.owner for shard in done if shard.owner.shard_left()]
            counts["requests_completed"] += len(finished)
            lane.active = still_active
            lane.images = sum(shard.n for shard in still_active)
            lane.counters.update(counts)
            lane.batch_sizes[uniforms.shape[0]] += 1
            self._batch_sizes.append(uniforms.shape[0])
            self._row_time.observe(step_s)
        for owner in finished:
            owner.finish()
