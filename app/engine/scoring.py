"""Likelihood scoring: one teacher-forced forward pass per request, in a worker thread, bounded in flight.

Kept apart from the batching scheduler: scoring needs no caches and no decode steps, only the model and a
limit on how many requests may hold their images and activations at once.
"""

from __future__ import annotations

import asyncio
import threading

import torch

from app.model import ModelConfig, PixelCNNModel
from app.model.likelihood import marginal_nll_nats, nll_per_subpixel

from .protocol import ImagesIn, LabelsIn, check_labels
from .types import LikelihoodResult, QueueFullError, ScoringError


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
        self._lock = threading.Lock()

    async def score(self, images: ImagesIn, labels: LabelsIn = None) -> LikelihoodResult:
        """score_sync in a worker thread: images uint8 (N, C, H, W) and labels (N,) or one, as tensors or
        plain arrays and lists. ValueError for bad input; QueueFullError; ScoringError when the
        pass itself fails."""
        with self._lock:
            if self.in_flight >= self.max_in_flight:
                self.rejected += 1
                raise QueueFullError(f"{self.max_in_flight} likelihood requests are already running")
            self.in_flight += 1
        try:
            return await asyncio.to_thread(self.score_sync, images, labels)
        finally:
            with self._lock:
                self.in_flight -= 1

    def score_sync(self, images: ImagesIn, labels: LabelsIn = None) -> LikelihoodResult:
        images = torch.as_tensor(images)
        if tuple(images.shape[1:]) != self.config.shape:
            raise ValueError(f"images must have shape (N, {', '.join(map(str, self.config.shape))})")
        labels = check_labels(self.config, images.shape[0], labels)
        try:
            return self._forward(images, labels)
        except Exception as error:
            with self._lock:
                self.failed += 1
            raise ScoringError(f"the likelihood pass failed ({type(error).__name__}: {error})") from error

    @torch.no_grad()
    def _forward(self, images: torch.Tensor, labels: torch.Tensor | None) -> LikelihoodResult:
        """A class-conditional model without labels gives the exact marginal -log sum_y p(y) p(x|y)
        (uniform p(y)) and per-pixel values for the most likely class."""
        x = images.to(self.device, torch.long)
        class_log_probs = nll = None
        if self.config.conditional and labels is None:
            marginal, per_class = marginal_nll_nats(self.model, x)
            # Bayes with a uniform prior: p(y|x) is the softmax over classes of log p(x|y).
            class_log_probs = torch.log_softmax(-per_class.double(), dim=1).cpu()
            labels = per_class.argmin(dim=1)
            nll = marginal.double().cpu()
        labels_dev = None if labels is None else labels.to(self.device)
        per_pixel = nll_per_subpixel(self.model(x, labels_dev), x)
        if nll is None:
            nll = per_pixel.flatten(1).sum(1).double().cpu()
        return LikelihoodResult(
            nll.numpy(),
            per_pixel.cpu().numpy(),
            None if labels is None else labels.cpu().numpy(),
            None if class_log_probs is None else class_log_probs.numpy(),
        )
