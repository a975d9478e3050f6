"""Likelihood scoring: teacher-forced forward passes in a worker thread, bounded in flight.

Kept apart from the batching scheduler: scoring needs no caches and no decode steps, only the model and a
limit on how many requests may hold their images and activations at once. A request is scored in passes
of at most SCORE_CHUNK_IMAGES images (one per class for a marginal likelihood): a caller that goes away
(its task cancelled) frees its slot at once, and its thread stops at the next pass.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from app.model import ModelConfig, PixelCNNModel
from app.model.likelihood import marginal_nll_nats, nll_per_subpixel

from .protocol import ImagesIn, LabelsIn, check_labels
from .types import DeadlineExceededError, LikelihoodResult, QueueFullError, ScoringError


class ScoringCancelled(Exception):
    """Raised in the scoring thread between passes once its caller has gone."""


SCORE_CHUNK_IMAGES = 16  # images per forward pass: small enough that a cancelled request stops soon


def scoring_passes(config: ModelConfig, images: int, labelled: bool) -> int:
    """Forward passes of SCORE_CHUNK_IMAGES-or-fewer images that scoring `images` images costs: one per
    chunk, times the classes when a conditional model is scored without labels (the marginal), plus the
    per-pixel pass under the most likely class."""
    chunks = -(-images // SCORE_CHUNK_IMAGES)
    return chunks * (config.num_classes + 1 if config.conditional and not labelled else 1)


class Scorer:
    """Teacher-forced NLL of uploaded images. At most `max_in_flight` requests run at once: each holds its
    images and a forward pass's activations, so past that QueueFullError asks the caller to retry."""

    def __init__(self, model: PixelCNNModel, max_in_flight: int) -> None:
        self.model = model
        self.config: ModelConfig = model.config
        self.device = next(model.parameters()).device
        self.max_in_flight = max_in_flight
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
                with self._lock:
                    self.expired += 1
                raise DeadlineExceededError("the request's deadline passed before it was scored; its work was stopped")
            with self._lock:
                self.passes += 1

        try:
            chunks = [
                self._forward(
                    images[i : i + SCORE_CHUNK_IMAGES],
                    None if labels is None else labels[i : i + SCORE_CHUNK_IMAGES],
                    before_pass,
                )
                for i in range(0, images.shape[0], SCORE_CHUNK_IMAGES)
            ]
        except (ScoringCancelled, DeadlineExceededError):
            raise
        except Exception as error:
            with self._lock:
                self.failed += 1
            raise ScoringError(f"the likelihood pass failed ({type(error).__name__}: {error})") from error

        return LikelihoodResult(
            np.concatenate([chunk.nll_nats for chunk in chunks]),
            np.concatenate([chunk.per_pixel for chunk in chunks]),
            None if chunks[0].labels is None else np.concatenate([chunk.labels for chunk in chunks]),
            None if chunks[0].class_log_probs is None else np.concatenate([chunk.class_log_probs for chunk in chunks]),
        )

    @torch.no_grad()
    def _forward(
        self, images: torch.Tensor, labels: torch.Tensor | None, before_pass: Callable[[], None]
    ) -> LikelihoodResult:
        """A class-conditional model without labels gives the exact marginal -log sum_y p(y) p(x|y)
        (uniform p(y)) and per-pixel values for the most likely class."""
        x = images.to(self.device, torch.long)
        class_log_probs = nll = None
        if self.config.conditional and labels is None:
            marginal, per_class = marginal_nll_nats(self.model, x, before_pass)
            # Bayes with a uniform prior: p(y|x) is the softmax over classes of log p(x|y).
            class_log_probs = torch.log_softmax(-per_class.double(), dim=1).cpu()
            labels = per_class.argmin(dim=1)
            nll = marginal.double().cpu()
        labels_dev = None if labels is None else labels.to(self.device)
        before_pass()
        per_pixel = nll_per_subpixel(self.model(x, labels_dev), x)
        if nll is None:
            nll = per_pixel.flatten(1).sum(1).double().cpu()
        return LikelihoodResult(
            nll.numpy(),
            per_pixel.cpu().numpy(),
            None if labels is None else labels.cpu().numpy(),
            None if class_log_probs is None else class_log_probs.numpy(),
        )
