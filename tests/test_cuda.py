"""CUDA checks: skipped without a GPU (the project's CI has none); run them where one is lent."""

from __future__ import annotations

import numpy as np
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
    assert (sampler.row_loop.name == "cuda-graph") == (arch == "gated"), "graphs are on by default for gated on CUDA"
    for n in (1, 3, 16):
        cached = sample_cached(model, n, seed=n, sampler=sampler)
        naive = sample_naive(model, n, seed=n)
        assert np.array_equal(cached.images, naive.images)
    if arch == "gated":
        assert set(sampler.row_loop.graphs) == {64}  # every step runs at CUDA_BATCH images
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("arch,channels", ARCH_CHANNELS)
def test_cuda_partial_row_completion_equals_naive(arch, channels):
    """Kept pixels ending mid-row: the first row runs outside the graphs (forced values), the rest in them."""
    model = tiny_model(arch, channels, size=6, num_classes=3, seed=33).cuda()
    sampler = CachedSampler(model)
    known = torch.randint(0, 256, (3, channels, 6, 6), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    for kept in (4, 15):
        cached = sample_cached(
            model, 3, seed=kept, known=known, known_rows=kept // 6, known_columns=kept % 6, sampler=sampler
        )
        naive = sample_naive(model, 3, seed=kept, known=known, known_pixels=kept)
        assert torch.equal(cached.images, naive.images) and torch.equal(cached.labels, naive.labels)


def test_cuda_graphs_are_captured_when_the_engine_starts():
    import asyncio

    from app.engine import Engine

    model = tiny_model("gated", 1, size=6, seed=32).cuda()

    async def scenario():
        engine = Engine(model)
        assert engine.sampler.row_loop.graphs == {}
        await engine.start()
        try:
            return set(engine.sampler.row_loop.graphs)
        finally:
            await engine.stop()

    assert asyncio.run(scenario()) == {64}


def test_cuda_is_batch_invariant_in_float32():
    from app.engine import GenerationRequest
    from tests.helpers import check_invariance

    model = tiny_model("gated", 1, size=8, num_classes=3, seed=34, dtype=torch.float32, hidden_channels=12).cuda()
    check_invariance(
        model,
        [GenerationRequest(n=1, seed=7, labels=[2]), GenerationRequest(n=3, seed=8)],
        [(1, 0, 0), (4, 3, 2), (9, 6, 5)],
        lanes=(1,),
    )


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
    assert stats.max_batch_size_seen > 1
    for request, result in zip(requests, results):
        alone = sample_cached(model, request.n, seed=request.seed)
        assert np.array_equal(result.images, alone.images)
