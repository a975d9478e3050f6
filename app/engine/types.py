"""The engine's public types: what a caller submits, what it receives, and the errors it can get.

Everything here is what crosses the engine's edge (the server uses only these and the Engine's methods),
with numpy arrays, no torch: how a request is split, batched and decoded stays inside the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import numpy.typing as npt


@dataclass
class GenerationRequest:
    n: int = 1
    seed: int = 0
    labels: list[int] | None = None  # one, or one per image; None: drawn with the seed (conditional models)
    temperature: float = 1.0
    known: npt.NDArray[np.uint8] | None = None  # uint8 (1 or n, C, H, W): image to complete
    known_rows: int = 0  # rows of `known` kept; generation starts at this row
    # and the first known_columns pixels of row known_rows (kept pixels that end mid-row): teacher-forced
    known_columns: int = 0
    label_mode: str = "posterior"  # a completion without labels: its class from the kept rows, or "prior"
    # Admission (admission.py): higher priority first (0 low, 1 normal, 2 high), then tenants in turn,
    # then arrival. No work starts or continues past `deadline` (time.monotonic()): DeadlineExceededError.
    priority: int = 1
    tenant: str = ""
    deadline: float | None = None


@dataclass
class RowEvent:
    row: int
    pixels: npt.NDArray[np.uint8]  # (n, C, W)


@dataclass
class SampleResult:
    images: npt.NDArray[np.uint8]  # (n, C, H, W)
    labels: npt.NDArray[np.int64] | None  # (n,), None for unconditional models
    log_prob: npt.NDArray[np.float64]  # (n,): log p of the generated sub-pixels at temperature 1, nats
    # (n, K): log p(y | kept pixels) when the labels were drawn from it (a completion without labels)
    class_log_probs: npt.NDArray[np.float64] | None = None
    # The most threads that drew its rows at once: 1 (a lane), or a wavefront's (a lone request on idle lanes)
    decode_threads: int = 1


@dataclass
class LikelihoodResult:
    nll_nats: npt.NDArray[np.float64]  # (N,): -log p(x | label), or -log sum_y p(y) p(x|y) without labels
    per_pixel: npt.NDArray[np.float32 | np.float64]  # (N, C, H, W) nats under `labels`, the model's dtype
    labels: npt.NDArray[np.int64] | None  # (N,): the class used (given, or the most likely one)
    class_log_probs: npt.NDArray[np.float64] | None  # (N, K): log p(y | x), uniform prior; no labels given


class EngineStoppedError(RuntimeError):
    """The engine stopped (or was never started) before the request finished."""


class GenerationError(RuntimeError):
    """A prefill or decode step failed; the request can be retried."""


class DeadlineExceededError(RuntimeError):
    """The request's deadline passed before it finished; its work stopped there (none is done after it)."""


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its bound; the caller should retry later."""


class ScoringError(RuntimeError):
    """The forward pass failed (for example out of memory); the request can be retried."""


@dataclass(frozen=True)
class TimeSnapshot:
    """A duration histogram: counts per upper bound (seconds), then one above every bound, and their sum."""

    bounds: list[float]
    counts: list[int]
    sum_s: float


def _counter() -> int:
    return field(default=0, metadata={"counter": True})


@dataclass(frozen=True)
class EngineStats:
    """What Engine.stats() reports: the engine now (gauges) and counts since it was built (counters, which
    only ever grow; the server exports them as Prometheus counters, pixelcnn_engine_<name>_total)."""

    lanes: int
    queue_size: int  # requests with a shard waiting to join a lane
    likelihood_in_flight: int
    active_requests: int
    active_images: int
    max_batch_images: int  # per decode step, i.e. per lane
    last_batch_size: int
    max_batch_size_seen: int
    recent_batch_sizes: list[int]  # the last 50 decode steps' sizes, all lanes
    batch_sizes_seen: dict[int, int]  # decode steps per batch size, all lanes
    queue_wait_seconds: TimeSnapshot  # submit -> joining a lane's batch
    row_decode_seconds: TimeSnapshot  # one decode step (a row of every image in a lane)
    rows_decoded_per_lane: list[int]
    wavefront_threads: int  # threads drawing one lane's request by wavefront now (0: none)
    requests_submitted: int = _counter()
    requests_completed: int = _counter()
    requests_cancelled: int = _counter()
    rows_decoded: int = _counter()
    rows_wavefront: int = _counter()  # rows drawn in one call (wavefront decoding), a cancelled request's included
    wavefront_stopped: int = _counter()  # such calls a submit or a cancel stopped before the image's last row
    rejected_queue_full: int = _counter()
    decode_errors: int = _counter()
    prefill_errors: int = _counter()
    likelihood_errors: int = _counter()
    likelihood_cancelled: int = _counter()  # requests whose caller left while they were scored
    likelihood_passes: int = _counter()  # forward passes of up to 16 images run for /likelihood
    requests_expired: int = _counter()  # generation and likelihood requests ended by their deadline
    # Image rows decoded in steps that began after their request's deadline: the scheduler drops late
    # requests before each step, so this stays 0; it is measured at each step, not assumed.
    rows_past_deadline: int = _counter()
    shards_parked: int = _counter()  # set aside while higher-priority work ran in their lane

    @classmethod
    def counter_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.metadata.get("counter"))

    def numbers(self) -> dict[str, int]:
        """Every single-number stat by name, gauges and counters, in field order."""
        return {f.name: value for f in fields(self) if isinstance(value := getattr(self, f.name), int)}
