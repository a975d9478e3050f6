"""The fan-in of a split request: a request of several images runs as shards, one per decode lane (see
scheduler.py), which report here. A row reaches the caller once every shard has drawn it, and the result
once every shard has finished; the first failure ends the request with that error, and the other shards
leave their lanes at their next row.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .types import GenerationRequest, RowEvent, SampleResult

Delivery = RowEvent | SampleResult | BaseException  # what reaches the caller's queue


class TrackedRequest:
    """One request inside the engine: what its shards share and what its caller receives. Shards in
    different lanes report to it concurrently, so its rows and its ending are changed under its own lock."""

    def __init__(
        self,
        request: GenerationRequest,
        labels: torch.Tensor | None,
        canvas: torch.Tensor,
        shards: int,
        deliver: Callable[[Delivery], None],
        withdraw: Callable[[TrackedRequest], None],
        wants_rows: bool,
    ) -> None:
        self.request = request
        self.labels = labels
        self.images = canvas.to(torch.uint8).cpu()  # (n, C, H, W): the known rows, then each row as it is final
        self.log_prob = torch.zeros(request.n, dtype=torch.float64)
        self.class_log_probs: torch.Tensor | None = None  # (n, K) when the labels are drawn from the posterior
        self.decode_threads = 1  # the most threads that drew its rows at once (a wavefront's: lanes.py)
        # log p(kept | y) of each distinct kept part (posterior.py), scored once for all of its shards: the
        # first shard to need it scores it, holding scoring_lock, and the others (in any lane) reuse it.
        self.kept_scores: dict[bytes, torch.Tensor] = {}
        self.scoring_lock = threading.Lock()
        self.shards = shards
        self.deliver = deliver
        self.withdraw = withdraw  # takes its shards out of the engine's waiting queue, if they are still there
        self.wants_rows = wants_rows  # deliver a RowEvent per row, or only the result (one wake-up in all)
        self.cancelled = False  # by the caller
        self.closed = False  # a result or an error was delivered: its shards leave the engine
        self.cancel_counted = False  # changed under the engine's lock: a cancellation counts once
        self.admitted = False  # changed under the engine's lock: its queue wait is observed once
        self.expired = False  # changed under the engine's lock: its deadline passed (counted once)
        self.submitted = time.perf_counter()
        self.first_row_at: float | None = None  # perf_counter() when the first generated row was final
        self._lock = threading.Lock()
        self._rows_ready: collections.Counter[int] = collections.Counter()  # shards that have drawn each row
        self._in_lanes = shards  # shards that have not yet drawn their last row and left their lane

    @property
    def n(self) -> int:
        return self.request.n

    @property
    def gone(self) -> bool:
        """Its shards have nothing more to do."""
        return self.cancelled or self.closed

    def row_done(self, shard: Shard, row: int, pixels: torch.Tensor, log_prob: torch.Tensor) -> None:
        """A shard drew `row` (pixels uint8 (m, C, W), log p (m,)); the row goes to the caller once every
        shard has it."""
        with self._lock:
            if self.closed:
                return
            self.images[shard.start : shard.stop, :, row] = pixels
            self.log_prob[shard.start : shard.stop] += log_prob
            self._rows_ready[row] += 1
            if self._rows_ready[row] < self.shards:
                return
            del self._rows_ready[row]
            if self.first_row_at is None:
                self.first_row_at = time.perf_counter()
            if self.wants_rows:  # under the lock: rows leave in order even when two lanes finish them
                self.deliver(RowEvent(row, self.images[:, :, row].numpy().copy()))

    def labels_inferred(self, shard: Shard, labels: torch.Tensor, class_log_probs: torch.Tensor) -> None:
        """A shard drew its images' classes from the posterior of their kept rows (before its prefill)."""
        with self._lock:
            if self.labels is None or self.class_log_probs is None:
                self.labels = torch.zeros(self.n, dtype=torch.long)
                self.class_log_probs = torch.zeros((self.n, class_log_probs.shape[1]), dtype=torch.float64)
            self.labels[shard.start : shard.stop] = labels
            self.class_log_probs[shard.start : shard.stop] = class_log_probs

    def shard_left(self) -> bool:
        """A shard drew its last row and left its lane; True when it was the last one of a request that
        has not ended (the caller then delivers the result by finish)."""
        with self._lock:
            self._in_lanes -= 1
            return self._in_lanes == 0 and not self.closed

    def finish(self) -> None:
        """Deliver the result, unless the request already ended."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        labels = None if self.labels is None else self.labels.cpu().numpy()
        class_log_probs = None if self.class_log_probs is None else self.class_log_probs.numpy()
        self.deliver(
            SampleResult(self.images.numpy(), labels, self.log_prob.numpy(), class_log_probs, self.decode_threads)
        )

    def fail(self, error: BaseException) -> None:
        """End the request with `error`, unless it already ended; its other shards leave at their next row."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self.deliver(error)


@dataclass
class Shard:
    """Images start .. stop - 1 of a request: what a lane batches, prefills and decodes."""

    owner: TrackedRequest
    start: int
    stop: int
    streams: list[np.random.Generator]  # each image's random stream (protocol.py)
    labels: torch.Tensor | None
    canvas: torch.Tensor  # int64 (m, C, H, W) on the engine's device: the known rows, for the prefill
    row: int  # the next row to draw
    infer_labels: bool = False  # draw `labels` from the kept rows' posterior before the prefill
    # int64 (m, C, W): the kept sub-pixels of the first row drawn (protocol.forced_row), until it is drawn
    forced: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.stop - self.start
