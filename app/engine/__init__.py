"""The inference engine: cached sampling and the batching scheduler. Knows nothing about HTTP."""

from .cached import CachedSampler, iter_sample, sample_cached
from .scheduler import (
    Engine,
    EngineStoppedError,
    GenerationRequest,
    LikelihoodResult,
    QueueFullError,
    RowEvent,
    Stream,
)

__all__ = [
    "CachedSampler",
    "Engine",
    "EngineStoppedError",
    "GenerationRequest",
    "LikelihoodResult",
    "QueueFullError",
    "RowEvent",
    "Stream",
    "iter_sample",
    "sample_cached",
]
