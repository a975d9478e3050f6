"""The inference engine: cached sampling and the batching scheduler. Knows nothing about HTTP."""

from .cached import CachedSampler, iter_sample, sample_cached

__all__ = ["CachedSampler", "iter_sample", "sample_cached"]
