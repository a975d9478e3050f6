"""Batch invariance in the served dtype: a request gives byte-identical images and log-probabilities
whether it runs alone or in a crowd, at any position in the batch, next to requests at other rows, in
any lane. float32, one torch thread per lane: how the server runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine import Engine, GenerationRequest
from app.engine.cached import CachedSampler
from app.model import load
from tests.helpers import tiny_model

SHIPPED = Path(__file__).resolve().parent.parent / "model_store" / "fashion-mnist"


async def alone(engine: Engine, request: GenerationRequest):
    return await engine.generate(request)


async def in_a_crowd(engine: Engine, target: GenerationRequest, before: list, after: list, head_start_rows: int):
    """`before` start first and run `head_start_rows` rows; then the target joins, then `after`."""
    early = [engine.submit(r, rows=True) for r in before]
    if early and head_start_rows:
        for _ in range(head_start_rows):
            await early[0].__anext__()
    target_stream = engine.submit(target, rows=False)
    late = [engine.submit(r, rows=False) for r in after]
    results = await asyncio.gather(target_stream.result(), *(s.result() for s in early + late))
    return results[0]


def crowd(config, count: int, seed: int, height: int) -> list[GenerationRequest]:
    """Requests of 1-3 images with mixed temperatures, labels and known rows."""
    g = torch.Generator().manual_seed(seed)
    requests = []
    for k in range(count):
        n = int(torch.randint(1, 4, (1,), generator=g))
        known_rows = int(torch.randint(0, height // 2, (1,), generator=g)) if k % 3 == 2 else 0
        known = torch.randint(0, 256, (1, *config.shape), generator=g, dtype=torch.uint8) if known_rows else None
        labels = None
        if config.conditional and k % 2:
            labels = torch.randint(0, config.num_classes, (n,), generator=g).tolist()
        requests.append(
            GenerationRequest(
                n=n,
                seed=1000 + seed * 100 + k,
                labels=labels,
                temperature=(0.7, 1.0, 1.3)[k % 3],
                known=known,
                known_rows=known_rows,
            )
        )
    return requests


def assert_identical(a, b, what: str) -> None:
    assert np.array_equal(a.images, b.images), f"{what}: images differ in {(a.images != b.images).sum()} sub-pixels"
    assert np.array_equal(a.log_prob, b.log_prob), f"{what}: log_prob {a.log_prob.tolist()} != {b.log_prob.tolist()}"
    assert (a.labels is None and b.labels is None) or np.array_equal(a.labels, b.labels)


def check_invariance(model, targets: list[GenerationRequest], scenarios: list[tuple[int, int, int]], lanes=(1, 2)):
    """scenarios: (requests before, requests after, head-start rows)."""
    config = model.config

    async def run() -> None:
        for lane_count in lanes:
            engine = Engine(model, max_batch_images=64, max_queue=64, lanes=lane_count, batch_wait_s=0)
            await engine.start()
            try:
                for t, target in enumerate(targets):
                    reference = await alone(engine, target)
                    for s, (before, after, head_start) in enumerate(scenarios):
                        others = crowd(config, before + after, seed=10 * t + s, height=config.height)
                        result = await in_a_crowd(engine, target, others[:before], others[before:], head_start)
                        assert_identical(result, reference, f"target {t}, scenario {s}, {lane_count} lanes")
                stats = engine.stats()
                assert stats.max_batch_size_seen > 4, "the crowds must really have shared decode steps"
            finally:
                await engine.stop()

    asyncio.run(run())


@pytest.mark.parametrize("arch", ["gated", "pixelcnn"])
@pytest.mark.parametrize("hidden", [12, 24])  # 2n = 24 or 48 floats: neither fills whole 32-float chunks
def test_small_models_in_float32_give_the_same_bytes_alone_and_in_any_crowd(arch, hidden):
    model = tiny_model(arch, 1, size=8, num_classes=3, seed=40, dtype=torch.float32, hidden_channels=hidden)
    known = torch.randint(0, 256, (1, 1, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    targets = [
        GenerationRequest(n=1, seed=7, labels=[2]),
        GenerationRequest(n=3, seed=8, temperature=0.9),
        GenerationRequest(n=1, seed=9, labels=[0], known=known, known_rows=3),
    ]
    check_invariance(model, targets, [(1, 0, 0), (0, 5, 0), (4, 3, 2), (9, 6, 5)])


def test_rgb_model_in_float32_is_batch_invariant():
    model = tiny_model("gated", 3, size=6, seed=41, dtype=torch.float32, hidden_channels=12)
    check_invariance(model, [GenerationRequest(n=2, seed=3)], [(3, 2, 1), (7, 0, 4)], lanes=(1,))


def test_every_batch_size_gives_each_image_the_same_row():
    """Below the engine: one row of the same images decoded inside batches of 1..40 others."""
    model = tiny_model("gated", 1, size=8, num_classes=3, seed=42, dtype=torch.float32, hidden_channels=12)
    sampler = CachedSampler(model)
    config = model.config
    g = torch.Generator().manual_seed(0)
    canvas = torch.randint(0, 256, (41, *config.shape), generator=g)
    labels = torch.randint(0, 3, (41,), generator=g)
    uniforms = torch.rand((41, 1, 8), generator=g, dtype=torch.float64)
    temperature = torch.ones((41, 1), dtype=torch.float64)

    def one_row(index: list[int]):
        state = sampler.prefill(canvas[index], labels[index], 4)
        return sampler.decode_row(state, uniforms[index], temperature[index])

    row0, lp0 = one_row([0])
    for size in range(2, 41):
        for position in (0, size // 2, size - 1):
            index = list(range(1, size))
            index.insert(position, 0)
            rows, lp = one_row(index)
            assert np.array_equal(rows[position], row0[0]) and np.array_equal(lp[position], lp0[0]), (size, position)


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="needs the shipped model")
def test_the_shipped_model_gives_the_same_bytes_alone_and_in_a_crowd():
    """The issue's scenario: a seeded n=1 request alone, and while 15 others share its decode steps."""
    model = load(SHIPPED)
    targets = [GenerationRequest(n=1, seed=153, labels=[9]), GenerationRequest(n=2, seed=4, labels=[0, 7])]
    check_invariance(model, targets, [(15, 0, 3), (2, 9, 10)], lanes=(2,))
