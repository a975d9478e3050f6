"""CUDA checks: skipped without a GPU (the project's CI has none); run them where one is lent."""

from __future__ import annotations

import pytest
import torch

from app.engine import CachedSampler, sample_cached
from app.model import sample_naive
from tests.helpers import ARCH_CHANNELS, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("arch,channels", ARCH_CHANNELS)
def test_cuda_cached_sampling_with_graphs_equals_naive(arch, channels):
    model = tiny_model(arch, channels, size=6, num_classes=3, seed=31).cuda()
    sampler = CachedSampler(model)
    assert (sampler.static_rows is not None) == (arch == "gated"), "graphs are on by default for gated on CUDA"
    for n in (1, 3, 16):
        cached = sample_cached(model, n, generator=torch.Generator().manual_seed(n), sampler=sampler)
        naive = sample_naive(model, n, generator=torch.Generator().manual_seed(n))
        assert torch.equal(cached.images, naive.images)
    if sampler.static_rows is not None:
        assert set(sampler.static_rows.graphs) == {1, 4, 16}


def test_cuda_engine_batches_concurrent_requests_exactly():
    """The engine on a GPU: one lane (the default there), CUDA-graph rows, requests of several sizes at
    once, each equal to the same request sampled alone."""
    import asyncio

    from app.engine import Engine, GenerationRequest

    model = tiny_model("gated", 1, size=8, num_classes=3, seed=33).cuda()
    requests = [GenerationRequest(n=1 + k % 4, seed=500 + k) for k in range(6)]

    async def scenario():
        engine = Engine(model, max_batch_images=16)
        await engine.start()
        try:
            return await asyncio.gather(*(engine.generate(r) for r in requests)), engine.stats()
        finally:
            await engine.stop()

    results, stats = asyncio.run(scenario())
    assert stats["max_batch_size_seen"] > 1
    for request, result in zip(requests, results):
        alone = sample_cached(model, request.n, generator=torch.Generator().manual_seed(request.seed))
        assert torch.equal(result.images, alone.images)
