"""Likelihood scoring: teacher-forced forward passes on worker threads, bounded in flight.

Kept apart from the batching scheduler: scoring needs no caches and no decode steps, only the model and a
limit on how many requests may hold their images and activations at once. A request is scored in passes
of at most SCORE_CHUNK_IMAGES images (one per class for a marginal likelihood), which run side by side on
the scorer's threads (one per decode lane: every core on a CPU), each pass on torch's own threads as
before. A caller that goes away (its task cancelled) frees its slot at once, and no pass of it starts after.

The scorer's threads run at a lower CPU priority than the decode lanes (`nice`, Linux): a pass takes a
core the lanes leave idle, and a decode lane that wants one gets it first, so a /sample beside a long
/likelihood is not slowed to half speed, while /likelihood alone still uses every core (BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

import torch

from app.model import ModelConfig, PixelCNNModel
from app.model.likelihood import marginal_nll_nats, nll_per_subpixel

from .protocol import ImagesIn, LabelsIn, check_labels
from .types import DeadlineExceededError, EngineStoppedError, LikelihoodResult, QueueFullError, ScoringError


class ScoringCancelled(Exception):
    """Raised in the scoring thread between passes once its caller has gone."""


class _PassSkipped(Exception):
    """A pass not started: another pass of its request failed first, or the scorer was closed."""


T = TypeVar("T")


SCORE_CHUNK_IMAGES = 16  # images per forward pass: small enough that a cancelled request stops soon
# How many nice steps below the decode lanes the scorer's threads run (PIXELCNN_SCORING_NICE). At 10 a
# lane's thread gets ~9 in 10 of a contested core (Linux's CFS weights) and waits less to get it.
SCORING_NICE = 10

logger = logging.getLogger(__name__)


def lower_thread_priority(nice: int) -> None:
    """Make this thread's CPU priority `nice` steps lower (Linux keeps a nice value per thread; raising it
    needs no privilege). Elsewhere, or if the system refuses, the thread keeps its priority (logged)."""
    if nice <= 0:
        return
    if sys.platform != "linux":
        logger.info("scoring threads keep their CPU priority: per-thread nice values are Linux-only")
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice))
    except OSError as error:
        logger.warning("scoring threads keep their CPU priority: setpriority failed (%s)", error)


def scoring_passes(config: ModelConfig, images: int, labelled: bool) -> int:
    """Forward passes of SCORE_CHUNK_IMAGES-or-fewer images that scoring `images` images costs: one per
    chunk, times the classes when a conditional model is scored without labels (the marginal), plus the
    per-pixel pass under the most likely class."""
    chunks = -(-images // SCORE_CHUNK_IMAGES)
    return chunks * (config.num_classes + 1 if config.conditional and not labelled else 1)


class Scorer:
    """Teacher-forced NLL of uploaded images. At most `max_in_flight` requests run at once: each holds its
    images and a forward pass's activations, so past that QueueFullError asks the caller to retry."""

    def __init__(self, model: PixelCNNModel, max_in_flight: int, threads: int = 1, nice: int = SCORING_NICE) -> None:
        if nice < 0:
            raise ValueError(f"nice must be >= 0 (a priority below the decode lanes'), got {nice}")
        self.model = model
        self.config: ModelConfig = model.config
        self.device = next(model.parameters()).device
        self.max_in_flight = max_in_flight
        self.threads = threads  # passes run side by side (shared by all requests: at most this many at once)
        self.nice = nice  # the threads' priority below the decode lanes' (lower_thread_priority)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # started at the first such pass
        self._closed = threading.Event()  # set by close(): that pool's passes not started are skipped
        self.in_flight = 0  # under the lock
        self.rejected = 0
        self.failed = 0
        self.cancelled = 0  # requests whose caller went away while they were scored
        self.passes = 0  # forward passes run
        self.expired = 0  # requests stopped by their deadline
        self._lock = threading.Lock()

    async def score(self, images: ImagesIn, labels: LabelsIn = None, deadline: float | None = None) -> LikelihoodResult:
        """score_sync in a worker thread: images uint8 (N, C, H, W) and labels (N,) or one, as tensors or
        plain arrays and lists. ValueError for bad input; QueueFullError; ScoringError when the
        pass itself fails."""
        with self._lock:
            if self.in_flight >= self.max_in_flight:
                self.rejected += 1
                raise QueueFullError(f"{self.max_in_flight} likelihood requests are already running")
            self.in_flight += 1
        gone = threading.Event()
        try:
            return await asyncio.to_thread(self.score_sync, images, labels, gone, deadline)
        except asyncio.CancelledError:
            gone.set()  # the thread stops before its next pass; the slot is free now
            with self._lock:
                self.cancelled += 1
            raise
        finally:
            with self._lock:
                self.in_flight -= 1

    def score_sync(
        self,
        images: ImagesIn,
        labels: LabelsIn = None,
        gone: threading.Event | None = None,
        deadline: float | None = None,
    ) -> LikelihoodResult:
        """`gone`: set when the caller has left; no pass starts after it is (ScoringCancelled), nor after
        `deadline` (time.monotonic(); DeadlineExceededError)."""
        images = torch.as_tensor(images)
        if tuple(images.shape[1:]) != self.config.shape:
            raise ValueError(f"images must have shape (N, {', '.join(map(str, self.config.shape))})")
        labels = check_labels(self.config, images.shape[0], labels)

        def before_pass() -> None:
            if gone is not None and gone.is_set():
                raise ScoringCancelled
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceededError("the request's deadline passed before it was scored; its work was stopped")
            with self._lock:
                self.passes += 1

        try:
            return self._score(images.to(self.device, torch.long), labels, before_pass)
        except (ScoringCancelled, EngineStoppedError):
            raise
        except DeadlineExceededError:
            with self._lock:
                self.expired += 1  # once, whichever of its passes found the deadline passed
            raise
        except Exception as error:
            with self._lock:
                self.failed += 1
            raise ScoringError(f"the likelihood pass failed ({type(error).__name__}: {error})") from error

    @torch.no_grad()
    def _score(self, x: torch.Tensor, labels: torch.Tensor | None, before_pass: Callable[[], None]) -> LikelihoodResult:
        """A class-conditional model without labels gives the exact marginal -log sum_y p(y) p(x|y)
        (uniform p(y)), its class probabilities, and per-pixel values for the most likely class."""
        chunks = [slice(i, i + SCORE_CHUNK_IMAGES) for i in range(0, x.shape[0], SCORE_CHUNK_IMAGES)]
        class_log_probs = nll = None
        if self.config.conditional and labels is None:
            k = self.config.num_classes
            passes = [partial(self._class_nll, x[chunk], y, before_pass) for chunk in chunks for y in range(k)]
            per_class_passes = self._run_side_by_side(passes)  # chunk by chunk, class by class
            per_class = torch.cat(
                [torch.stack(per_class_passes[c * k : (c + 1) * k], dim=1) for c in range(len(chunks))]
            )
            # Bayes with a uniform prior: p(y|x) is the softmax over classes of log p(x|y).
            class_log_probs = torch.log_softmax(-per_class.double(), dim=1).cpu().numpy()
            labels = per_class.argmin(dim=1)
            nll = marginal_nll_nats(per_class).double().cpu()
        given = None if labels is None else labels.to(self.device)
        per_pixel = torch.cat(
            self._run_side_by_side(
                [
                    partial(self._forward, x[chunk], None if given is None else given[chunk], before_pass)
                    for chunk in chunks
                ]
            )
        )
        if nll is None:
            nll = per_pixel.flatten(1).sum(1).double().cpu()
        return LikelihoodResult(
            nll.numpy(),
            per_pixel.cpu().numpy(),
            None if labels is None else labels.cpu().numpy(),
            class_log_probs,
        )

    def _class_nll(self, x: torch.Tensor, label: int, before_pass: Callable[[], None]) -> torch.Tensor:
        """-log p(x | label) of each image, (B,)."""
        labels = torch.full((x.shape[0],), label, dtype=torch.long, device=x.device)
        return self._forward(x, labels, before_pass).flatten(1).sum(1)

    def _forward(self, x: torch.Tensor, labels: torch.Tensor | None, before_pass: Callable[[], None]) -> torch.Tensor:
        """One teacher-forced pass: the NLL of every sub-pixel, (B, C, H, W)."""
        before_pass()
        with torch.no_grad():  # on this thread: a pass may run on one of the scorer's own
            return nll_per_subpixel(self.model(x, labels), x)

    def _run_side_by_side(self, passes: Sequence[Callable[[], T]]) -> list[T]:
        """Each pass's result, in order, run on the scorer's threads (at their lower priority, even for one
        pass). The first failure stops the passes not yet started and is raised once the running ones are
        done; close() stops them too (EngineStoppedError)."""
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.threads,
                    thread_name_prefix="likelihood",
                    initializer=lower_thread_priority,
                    initargs=(self.nice,),
                )
                self._closed = threading.Event()
            pool, closed = self._pool, self._closed
        failed = threading.Event()

        def guarded(run: Callable[[], T]) -> T:
            if failed.is_set() or closed.is_set():
                raise _PassSkipped
            try:
                return run()
            except BaseException:
                failed.set()
                raise

        futures = []
        try:
            for run in passes:
                futures.append(pool.submit(guarded, run))
        except RuntimeError:  # the pool was shut down (close()) while they were handed over
            closed.set()
        # Every future ends: a pass not started when close() came is skipped by the threads, which finish
        # their queue after a shutdown (futures cancelled by one would never wake this wait).
        concurrent.futures.wait(futures)
        errors = [future.exception() for future in futures]
        for error in errors:
            if error is not None and not isinstance(error, _PassSkipped):
                raise error
        if len(futures) < len(passes) or any(error is not None for error in errors):  # skipped: close() came
            raise EngineStoppedError("the server is shutting down")
        return [future.result() for future in futures]

    def close(self) -> None:
        """Stop the scorer's threads once they finish the pass under way; the passes of a request not yet
        started are skipped and the request gets EngineStoppedError (the next side-by-side pass starts new
        threads)."""
        with self._lock:
            pool, closed, self._pool = self._pool, self._closed, None
        if pool is not None:
            closed.set()
            pool.shutdown(wait=False)
