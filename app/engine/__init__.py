"""The inference engine: cached sampling and the batching scheduler. Knows nothing about HTTP."""

import torch

from .cached import CachedSampler, iter_sample, sample_cached
from .protocol import MAX_TEMPERATURE, MIN_TEMPERATURE
from .scheduler import Engine
from .scoring import Scorer
from .stream import Stream
from .types import (
    DeadlineExceededError,
    EngineStats,
    EngineStoppedError,
    GenerationError,
    GenerationRequest,
    LikelihoodResult,
    QueueFullError,
    RowEvent,
    SampleResult,
    ScoringError,
)


def set_cpu_threads(threads: int) -> None:
    """torch's intra-op CPU threads, for the whole process (every lane's decode steps use them)."""
    torch.set_num_threads(threads)


__all__ = [
    "CachedSampler",
    "DeadlineExceededError",
    "Engine",
    "EngineStats",
    "EngineStoppedError",
    "GenerationError",
    "MAX_TEMPERATURE",
    "MIN_TEMPERATURE",
    "GenerationRequest",
    "LikelihoodResult",
    "QueueFullError",
    "RowEvent",
    "SampleResult",
    "Scorer",
    "ScoringError",
    "Stream",
    "iter_sample",
    "sample_cached",
    "set_cpu_threads",
]
