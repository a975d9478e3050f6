"""The decode loop: one thread per lane, each with its own batch and caches (see Engine).

A lane lets a burst of requests arrive, admits waiting shards up to its fair share (admission.py orders
them), prefills them (the class of an unlabelled completion first, posterior.py), then decodes one row of
its whole batch per step and hands each row to its request (fan_in.py); finished, cancelled and late
shards leave at once. A lane whose batch is one request, while nothing waits and the other lanes are
idle, draws its rows on several threads instead (wavefront.py). A failure fails the batch, never the lane.
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import logging
import threading
import time

import torch

from app.model import ModelConfig, PixelCNNModel

from .admission import Group, LaneDiscipline, admission_order, expired, in_steps
from .cache import DecodeCache
from .cached import CachedSampler, sample_cached
from .fan_in import Shard, TrackedRequest
from .posterior import infer_labels
from .protocol import row_uniforms
from .stats import TimeHistogram
from .types import GenerationError
from .wavefront import Wavefront, rewind, uniforms_ahead

log = logging.getLogger(__name__)


class Lane:
    """One decode thread and the batch it runs: its requests and their caches, which only it touches."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()
        self.active: list[Shard] = []
        self.state: DecodeCache | None = None
        # The lane's other shards, with their caches, waiting for their turn (admission.py): the rest of its
        # batch beyond step_images, and lower-priority shards set aside while higher ones decode. Each resumes
        # exactly where it was. Changed by this lane's thread under the engine's lock, read by other lanes.
        self.groups: list[Group] = []
        self.images = 0  # images in `active`; changed under the engine's lock, read by other lanes
        # Its wavefront (LaneLoop._decode_wavefront): the threads drawing it now (under the engine's lock), and
        # the flag a submit or cancel sets to stop it after the rows in flight (read by the C threads).
        self.wavefront_threads = 0
        self.stop_wavefront = ctypes.c_int32(0)
        # Decode statistics, changed under the engine's lock: named counts, and decode steps per batch size.
        self.counters: collections.Counter[str] = collections.Counter()
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    def shards(self) -> list[Shard]:
        """Every shard the lane holds: its batch's, then its waiting groups' (under the engine's lock)."""
        return [*self.active, *(shard for group in self.groups for shard in group.shards)]

    @property
    def load(self) -> int:
        """Images the lane holds: its batch and its waiting groups (under the engine's lock)."""
        return self.images + sum(group.n for group in self.groups)


class LaneLoop(LaneDiscipline):
    """The lanes' side of the Engine (which inherits it): the loop each decode thread runs."""

    # The engine state the loop reads and changes (set by Engine.__init__; the lock guards what it says).
    config: ModelConfig
    model: PixelCNNModel
    sampler: CachedSampler
    batch_wait_s: float
    fault_every_steps: int
    wavefront: Wavefront | None
    _lanes: list[Lane]
    _waiting: collections.deque[Shard]
    _stopping: bool
    _last_submit: float
    _steps: itertools.count[int]
    _batch_sizes: collections.deque[int]
    _queue_wait: TimeHistogram
    _row_time: TimeHistogram
    _wavefront_most_threads: int

    def _run(self, lane: Lane) -> None:
        while not self._stopping:
            try:
                if not lane.active and self._waiting:
                    self._let_the_burst_arrive()
                # Cleared before looking for work: a request submitted after this wakes the wait below,
                # one submitted before is seen by _admit (clearing after the wait could lose it).
                lane.wake.clear()
                self._admit(lane)
                if not lane.active and not lane.groups:
                    lane.wake.wait(timeout=0.5)
                    continue
                wavefront_lanes = self._wavefront_lanes(lane)
                if wavefront_lanes:
                    self._decode_wavefront(lane, wavefront_lanes)
                else:
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

    def _admit(self, lane: Lane) -> None:
        """Move waiting shards into this lane while they fit, up to its fair share of all the images
        (running and waiting), and beyond that only while it is the least loaded lane (so the shards of
        a request on an idle engine go one to each lane). FIFO, so none starves: a lane that leaves a
        shard to a less loaded one lets it take the shard within a row. They join the batch up to
        step_images; the others form groups that take their turns (admission.py)."""
        joined = []
        late: list[TrackedRequest] = []
        with self._lock:
            others = [other.load for other in self._lanes if other is not lane]
            total = lane.load + sum(others) + sum(shard.n for shard in self._waiting if not shard.owner.gone)
            fair_share = -(-total // len(self._lanes))
            self._waiting = collections.deque(admission_order(self._waiting))
            head = next((shard for shard in self._waiting if not shard.owner.gone), None)
            outranked = head is not None and any(
                shard.owner.request.priority < head.owner.request.priority for shard in lane.active
            )
        if outranked:  # set the lower-priority shards aside: the waiting one gets their room now
            assert head is not None
            self._set_aside(lane, head.owner.request.priority)
        with self._lock:
            others = [other.load for other in self._lanes if other is not lane]
            now = time.monotonic()
            running = max((shard.owner.request.priority for shard in lane.shards()), default=None)
            while self._waiting:
                shard = self._waiting[0]
                if expired(shard, now) and self._expire(shard.owner, self._counters):
                    late.append(shard.owner)
                if shard.owner.gone or shard.owner.expired:  # cancelled, failed in another lane, or late
                    self._waiting.popleft()
                    self._count_cancelled(shard.owner, self._counters)
                    continue
                if running is not None and shard.owner.request.priority < running:
                    # It could not run here before the higher-priority work ends, and seating it now (its
                    # prefill, then setting it aside) would cost that work time: it waits, or another lane
                    # takes it.
                    break
                load = lane.load
                least_loaded = load <= min(others, default=load)
                within_share = load + shard.n <= fair_share
                # Waiting groups keep their places against work of their priority or lower (else set-aside
                # work could grow without bound and never resume); higher-priority work takes their room.
                held = sum(group.n for group in lane.groups if group.priority >= shard.owner.request.priority)
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
        seated = len(lane.active)
        states: list[DecodeCache] = []
        pending = list(joined)
        try:
            self._prefill(lane, pending, states)
        finally:  # whatever was not handled fails with the batch in _run, never left waiting
            lane.active.extend(pending)
        self._seat(lane, seated, states)

    def _seat(self, lane: Lane, seated: int, states: list[DecodeCache]) -> None:
        """The shards prefilled into the lane's batch after its first `seated` ones (`states` are their
        caches) join the batch up to step_images; the others form waiting groups of that size."""
        joined = lane.active[seated:]
        if not joined:
            return
        batch_images = sum(shard.n for shard in lane.active[:seated])
        step_images = self._step_images_now()
        parts = in_steps(joined, max(step_images - batch_images, 0), step_images)
        caches = iter(states)  # in the order of `joined`, i.e. of the parts
        into_batch = [next(caches) for _ in parts[0]]
        groups = [Group(part, DecodeCache.concat([next(caches) for _ in part])) for part in parts[1:]]
        old = [lane.state] if lane.state is not None else []
        state = DecodeCache.concat(old + into_batch) if old or into_batch else None
        with self._lock:
            lane.active = lane.active[:seated] + parts[0]
            lane.state = state
            lane.images = sum(shard.n for shard in lane.active)
            lane.groups = lane.groups + groups

    def _prefill(self, lane: Lane, pending: list[Shard], states: list[DecodeCache]) -> None:
        """Prefill each joining shard, taking it off `pending` once it is active, done or failed."""
        for shard in list(pending):
            pending.remove(shard)
            try:  # prefill: one pass over the known rows fills this shard's caches
                if shard.infer_labels:  # the class first (step 2 of the protocol), from the kept rows
                    owner = shard.owner
                    with owner.scoring_lock:
                        shard.labels, class_log_probs = infer_labels(
                            self.model,
                            shard.streams,
                            shard.canvas,
                            shard.row,
                            owner.request.known_columns,
                            owner.kept_scores,
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

    def _decode_one_row(self, lane: Lane) -> None:
        self._drop_gone_and_late(lane, time.monotonic())
        self._take_turn(lane)
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
            # The wall-clock time lets a soak measure how long the fault took to end its requests.
            raise RuntimeError(f"injected decode fault (every {self.fault_every_steps} steps) at {time.time():.3f}")
        step_started = time.perf_counter()
        assert lane.state is not None  # a lane with active shards has their caches
        rows, log_prob = self.sampler.decode_row(lane.state, uniforms, temperatures, forced)
        step_s = time.perf_counter() - step_started
        self._row_drawn(lane, rows.to(torch.uint8).cpu(), log_prob.cpu(), step_s, started_at)

    def _row_drawn(
        self,
        lane: Lane,
        rows_cpu: torch.Tensor,
        log_prob: torch.Tensor,
        step_s: float,
        started_at: float,
    ) -> None:
        """Hand a drawn row (uint8 (B, C, W), log p (B,)) of every image of the lane to its request, and
        let finished or cancelled shards leave the lane."""
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
            assert lane.state is not None  # a lane with active shards has their caches
            lane.state = self._select(lane.state, keep) if keep else None
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
            lane.batch_sizes[rows_cpu.shape[0]] += 1
            self._batch_sizes.append(rows_cpu.shape[0])
            self._row_time.observe(step_s)
        for owner in finished:
            owner.finish()

    def _wavefront_lanes(self, lane: Lane) -> int:
        """Threads for wavefront decoding of this lane's batch; 0 (row by row) unless its batch is one
        request (its images share the row index) and nothing waits. If every other lane is idle, their
        cores draw its rows too; else its rows are drawn in one call on this lane's thread (no trip through
        Python per row). Throughput first: any waiting request means batching. A streamed request's rows
        are handed on as each is complete (Wavefront.decode_rows)."""
        shard = lane.active[0] if len(lane.active) == 1 else None
        # A completion's first row with kept pixels (forced) decodes row by row: the wavefront draws every pixel.
        # A request with a deadline decodes row by row (each step checks it), as under fault injection.
        # A streamed request's first row too: it reaches the event loop while a core is free, where a
        # wavefront's threads would hold every core and its hand-off wait for one (~2.5 ms, measured).
        if (
            self.wavefront is None
            or shard is None
            or (shard.owner.wants_rows and shard.owner.first_row_at is None)
            or shard.forced is not None
            or shard.owner.request.deadline is not None
            or self.fault_every_steps
        ):
            return 0
        with self._lock:  # a cancel sets the stop flag under the lock, after marking its request gone
            if shard.owner.gone or lane.groups or self._waiting or self._stopping:
                return 0
            busy = any(o.load for o in self._lanes if o is not lane)
            lane.stop_wavefront.value = 0
            lane.wavefront_threads = 1 if busy else self._wavefront_most_threads
            return lane.wavefront_threads

    def _decode_wavefront(self, lane: Lane, threads: int) -> None:
        """The lane's remaining rows by wavefront decoding, until a submit stops it; each row is handed on
        as a decode step's would be: a streamed request's as soon as it is complete, the others' (which
        wait for the result) when the call returns, sparing the kernel's threads a wake-up per row."""
        shard = lane.active[0]
        assert self.wavefront is not None and lane.state is not None  # see _wavefront_lanes
        shard.owner.decode_threads = max(shard.owner.decode_threads, threads)
        c, w = self.config.image_channels, self.config.width
        saved = [stream.bit_generator.state for stream in shard.streams]
        uniforms = uniforms_ahead(shard.streams, self.config.height - shard.row, c, w)
        temperatures = torch.full((shard.n, 1), float(shard.owner.request.temperature), dtype=torch.float64)
        started, started_at = time.perf_counter(), time.monotonic()
        drawn = 0

        def hand_on(values: torch.Tensor, log_prob: torch.Tensor, step_s: float) -> None:
            nonlocal drawn
            drawn += 1
            with self._lock:  # before the row is handed on: its request may end with it
                lane.counters["rows_wavefront"] += 1  # a cancelled request's too: what the call cost
            if lane.active:  # else the request was cancelled: its later rows go nowhere
                self._row_drawn(lane, values.to(torch.uint8), log_prob, step_s, started_at)

        rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # drawn, to hand on once the call has returned
        try:
            if shard.owner.wants_rows:  # each row's time: the mean over the rows complete so far
                last = uniforms.shape[0] - 1
                for row in self.wavefront.decode_rows(lane.state, uniforms, temperatures, threads, lane.stop_wavefront):
                    # The row that ends the request, and rows that go nowhere (it was cancelled), wait for the
                    # call's end: whoever sees the request end sees the engine's counts of it final.
                    if rows or shard.owner.gone or drawn == last:
                        rows.append(row)
                    else:
                        hand_on(*row, (time.perf_counter() - started) / (drawn + 1))
            else:
                rows = list(
                    zip(*self.wavefront.decode(lane.state, uniforms, temperatures, threads, lane.stop_wavefront))
                )
        finally:
            with self._lock:
                lane.wavefront_threads = 0
        call_s, call_rows = time.perf_counter() - started, drawn + len(rows)
        if call_rows < uniforms.shape[0]:  # counted before the rows go on (a request may end with them)
            with self._lock:
                lane.counters["wavefront_stopped"] += 1
        for row in rows:
            hand_on(*row, call_s / call_rows)
        if drawn < uniforms.shape[0]:  # the streams stand after the rows drawn, as row by row they would
            rewind(shard.streams, saved, drawn, c, w)

    def _tune_wavefront(self) -> bool:
        """Whether wavefront decoding draws one image sooner than one lane does, here and now, with the
        fastest way of sharing its work (Wavefront.tune): interleaved runs of each, a few tenths of a second
        for the shipped model. Its threads need free cores, which a busy machine may not have; the images
        are the same bytes either way. Logged."""
        assert self.wavefront is not None
        threads = self._wavefront_most_threads
        fastest, one_lane = self.wavefront.tune(
            self.sampler, threads, baseline=lambda: sample_cached(self.model, 1, sampler=self.sampler)
        )
        assert one_lane is not None
        pays = fastest < 0.9 * one_lane
        log.info(
            "wavefront decoding %s: one image in %.1f ms on %d threads (%s) vs %.1f ms on one (its rows in one call)",
            "on" if pays else "off",
            1e3 * fastest,
            threads,
            self.wavefront.describe(threads),
            1e3 * one_lane,
        )
        return pays
