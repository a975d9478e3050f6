"""The batching scheduler: concurrent requests share decode steps and still get exactly their own images."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from app.engine import (
    CachedSampler,
    Engine,
    EngineStoppedError,
    GenerationRequest,
    QueueFullError,
    RowEvent,
    sample_cached,
)
from tests.helpers import held_lane, run, running, tiny_model


def test_concurrent_requests_equal_sequential_ones_and_share_steps():
    model = tiny_model("gated", 1, size=6, num_classes=3, seed=21)
    requests = [GenerationRequest(n=1 + k % 3, seed=100 + k, temperature=1.0 if k % 2 else 0.8) for k in range(6)]
    requests.append(
        GenerationRequest(
            n=2, seed=7, labels=[1, 2], known=torch.full((1, 1, 6, 6), 200, dtype=torch.uint8), known_rows=3
        )
    )

    async def scenario():
        async with running(model, max_batch_images=16, max_queue=16) as engine:
            concurrent = await asyncio.gather(*(engine.generate(r) for r in requests))
            sequential = [await engine.generate(r) for r in requests]
            return concurrent, sequential, engine.stats()

    concurrent, sequential, stats = run(scenario())
    for request, a, b in zip(requests, concurrent, sequential):
        assert np.array_equal(a.images, b.images)
        assert np.array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.log_prob, b.log_prob, rtol=0, atol=1e-9)
        # ... and equal to the stand-alone cached sampler with the same seed.
        alone = sample_cached(
            model,
            request.n,
            labels=None if request.labels is None else torch.tensor(request.labels),
            temperature=request.temperature,
            seed=request.seed,
            known=request.known,
            known_rows=request.known_rows,
        )
        assert np.array_equal(a.images, alone.images)
    assert stats.max_batch_size_seen > 1, "concurrent requests must share decode steps"
    assert stats.requests_completed == 2 * len(requests)


def test_two_lanes_share_the_requests_and_give_the_same_images():
    model = tiny_model("gated", 1, size=8, num_classes=3, seed=28)
    requests = [GenerationRequest(n=1 + k % 2, seed=200 + k) for k in range(8)]

    async def scenario():
        async with running(model, max_batch_images=16, lanes=2) as engine:
            results = await asyncio.gather(*(engine.generate(r) for r in requests))
            return results, engine.stats()

    results, stats = run(scenario())
    for request, result in zip(requests, results):
        alone = sample_cached(model, request.n, seed=request.seed)
        assert np.array_equal(result.images, alone.images)
        np.testing.assert_allclose(result.log_prob, alone.log_prob, rtol=0, atol=1e-9)
    assert stats.lanes == 2
    assert all(rows > 0 for rows in stats.rows_decoded_per_lane), stats.rows_decoded_per_lane
    assert stats.requests_completed == len(requests) and stats.active_images == 0


def test_requests_arriving_together_start_together():
    """An idle engine waits for a burst to finish arriving (batch_wait_s without a new request), so four
    requests sent a few milliseconds apart run every row as one batch of 4."""
    model = tiny_model("gated", 1, size=6, seed=29)

    async def scenario():
        async with running(model, max_batch_images=8, batch_wait_s=0.05) as engine:
            streams = []
            for k in range(4):
                streams.append(engine.submit(GenerationRequest(seed=k), rows=False))
                await asyncio.sleep(0.005)
            await asyncio.gather(*(stream.result() for stream in streams))
            return engine.stats()

    assert run(scenario()).batch_sizes_seen == {4: 6}


def test_lanes_sharing_the_static_row_buffers_take_turns():
    """The static-bucket path (CUDA graphs on a GPU, run eagerly here) shares its buffers between lanes;
    two lanes decoding at once must still give every request its own images."""
    model = tiny_model("gated", 1, size=16, num_classes=3, seed=30)
    requests = [GenerationRequest(n=2, seed=300 + k) for k in range(8)]  # 8 images a lane: one bucket

    async def scenario():
        engine = Engine(model, max_batch_images=16, lanes=2)
        engine.sampler = CachedSampler(model, static_rows=True)
        await engine.start()
        try:
            return await asyncio.gather(*(engine.generate(r) for r in requests)), engine.stats()
        finally:
            await engine.stop()

    results, stats = run(scenario())
    assert all(rows > 0 for rows in stats.rows_decoded_per_lane)
    for request, result in zip(requests, results):
        alone = sample_cached(model, request.n, seed=request.seed)
        assert np.array_equal(result.images, alone.images)


def test_a_mixed_crowd_on_two_lanes_gets_exactly_its_own_images():
    """Requests of every kind at once on two lanes (sizes, labels, temperatures, completions, streams),
    some cancelled mid-image: each survivor gets exactly what it would get alone, and the engine ends
    empty."""
    model = tiny_model("gated", 1, size=8, num_classes=3, seed=32)
    known = torch.randint(0, 256, (1, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    requests = [
        GenerationRequest(
            n=1 + k % 4,
            seed=400 + k,
            temperature=(1.0, 0.7)[k % 2],
            labels=[k % 3] if k % 3 == 0 else None,
            known=known if k % 5 == 0 else None,
            known_rows=3 if k % 5 == 0 else 0,
        )
        for k in range(24)
    ]
    doomed = {k for k in range(24) if k % 7 == 3}

    async def run_one(engine, k):
        stream = engine.submit(requests[k], rows=k % 2 == 0 or k in doomed)
        async for event in stream:
            if k in doomed and isinstance(event, RowEvent):
                await stream.cancel()
                return None
            if not isinstance(event, RowEvent):
                return event

    async def scenario():
        async with running(model, max_batch_images=8, max_queue=32, lanes=2) as engine:
            results = await asyncio.gather(*(run_one(engine, k) for k in range(24)))
            for _ in range(200):
                if engine.stats().active_images == 0:
                    break
                await asyncio.sleep(0.01)
            return results, engine.stats()

    results, stats = run(scenario())
    for k, (request, result) in enumerate(zip(requests, results)):
        if k in doomed:
            assert result is None
            continue
        labels = None if request.labels is None else torch.tensor(request.labels)
        alone = sample_cached(
            model,
            request.n,
            labels=labels,
            temperature=request.temperature,
            seed=request.seed,
            known=request.known,
            known_rows=request.known_rows,
        )
        assert np.array_equal(result.images, alone.images), k
        np.testing.assert_allclose(result.log_prob, alone.log_prob, rtol=0, atol=1e-9)
    assert stats.requests_completed == 24 - len(doomed)
    assert stats.requests_cancelled == len(doomed)
    assert stats.active_images == 0 and stats.queue_size == 0
    assert all(rows > 0 for rows in stats.rows_decoded_per_lane)


def test_lanes_must_be_positive():
    with pytest.raises(ValueError, match="lanes must be >= 1"):
        Engine(tiny_model("gated", 1, size=6), lanes=0)
    with pytest.raises(ValueError, match="batch_wait_s must be >= 0"):
        Engine(tiny_model("gated", 1, size=6), batch_wait_s=-1)


def test_a_request_joins_a_running_batch_at_the_next_row():
    model = tiny_model("pixelcnn", 1, size=8, seed=22)

    async def scenario():
        async with running(model, max_batch_images=8) as engine:
            first = engine.submit(GenerationRequest(n=1, seed=1))
            first_rows = []
            async for event in first:
                if isinstance(event, RowEvent):
                    first_rows.append(event.row)
                    if event.row == 2:  # the first request is mid-image when the second arrives
                        second = asyncio.ensure_future(engine.generate(GenerationRequest(n=2, seed=2)))
            result_second = await second
            return first_rows, result_second, engine.stats()

    rows, second, stats = run(scenario())
    assert rows == list(range(8))
    assert np.array_equal(second.images, sample_cached(model, 2, seed=2).images)
    assert 3 in stats.recent_batch_sizes, "the second request should have run beside the first"


def test_cancelled_request_leaves_the_batch_and_others_finish():
    model = tiny_model("gated", 1, size=8, seed=23)

    async def scenario():
        async with running(model, max_batch_images=8) as engine:
            doomed = engine.submit(GenerationRequest(n=3, seed=1))
            survivor = engine.submit(GenerationRequest(n=1, seed=2))
            async for event in doomed:
                if isinstance(event, RowEvent) and event.row == 1:
                    await doomed.cancel()
                    break
            result = await survivor.result()
            for _ in range(200):  # the decode thread drops the cancelled request at its next row boundary
                if engine.stats().active_images == 0:
                    break
                await asyncio.sleep(0.05)
            return result, engine.stats()

    result, stats = run(scenario())
    assert np.array_equal(result.images, sample_cached(model, 1, seed=2).images)
    assert stats.requests_cancelled == 1
    assert stats.active_images == 0


def test_without_rows_only_the_result_is_delivered_and_it_is_the_same():
    model = tiny_model("gated", 1, size=6, num_classes=3, seed=26)
    request = GenerationRequest(n=2, seed=5)

    async def scenario():
        async with running(model) as engine:
            quiet = [event async for event in engine.submit(request, rows=False)]
            streamed = engine.submit(request)
            loud = [event async for event in streamed]
            return quiet, loud, streamed.time_to_first_row_s

    quiet, loud, first_row_s = run(scenario())
    assert len(quiet) == 1 and not isinstance(quiet[0], RowEvent)
    assert [event.row for event in loud[:-1]] == list(range(6))
    assert np.array_equal(quiet[0].images, loud[-1].images)
    assert first_row_s is not None and first_row_s > 0


def test_a_cancelled_waiting_request_leaves_the_queue_at_once_and_wakes_its_consumer():
    """The only lane is held up by a first request, so the second waits in the queue; cancelling it frees
    its queue place immediately (a new request gets in, where it would have had a 503), not once it
    reaches the head of the queue, and it never runs."""
    model = tiny_model("gated", 1, size=8, seed=27)

    async def scenario():
        async with held_lane(model, max_queue=1) as (engine, release):
            first = engine.submit(GenerationRequest(n=1, seed=1), rows=False)
            while engine.stats().queue_size:  # the lane took it and is now held in its prefill
                await asyncio.sleep(0.005)
            second = engine.submit(GenerationRequest(n=1, seed=2), rows=False)
            waiting = asyncio.ensure_future(second.__anext__())
            await asyncio.sleep(0)  # the consumer is now blocked on the next item
            await second.cancel()
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(waiting, timeout=5)
            stats = engine.stats()
            third = engine.submit(GenerationRequest(n=1, seed=3), rows=False)  # the freed place
            release.set()
            results = await asyncio.wait_for(asyncio.gather(first.result(), third.result()), timeout=30)
            return stats, results, engine.stats()

    at_cancel, results, after = run(scenario())
    assert at_cancel.queue_size == 0 and at_cancel.requests_cancelled == 1
    assert len(results) == 2 and after.requests_completed == 2
    assert after.requests_cancelled == 1 and max(after.batch_sizes_seen) <= 2  # it never ran


def test_full_queue_bad_requests_and_a_stopped_engine_are_refused():
    model = tiny_model("gated", 1, size=6, num_classes=3, seed=24)

    async def scenario():
        async with held_lane(model, max_batch_images=4, max_queue=1) as (engine, release):
            busy = engine.submit(GenerationRequest(n=1))
            while engine.stats().queue_size:
                await asyncio.sleep(0.005)
            waiting = engine.submit(GenerationRequest(n=1))
            with pytest.raises(QueueFullError, match="queue is full"):
                engine.submit(GenerationRequest(n=1))
            with pytest.raises(ValueError, match="n must be between 1 and 4"):
                engine.submit(GenerationRequest(n=5))
            with pytest.raises(ValueError, match="labels must be in 0..2"):
                engine.submit(GenerationRequest(n=1, labels=[9]))
            release.set()
            await asyncio.wait_for(asyncio.gather(busy.result(), waiting.result()), timeout=30)
        with pytest.raises(EngineStoppedError, match="not running"):
            engine.submit(GenerationRequest(n=1))

    run(scenario())


def test_likelihood_requests_in_flight_are_bounded():
    model = tiny_model("gated", 1, size=6, seed=31)
    images = torch.randint(0, 256, (1, 1, 6, 6), dtype=torch.uint8)

    async def scenario():
        engine = Engine(model, max_queue=1)
        release = asyncio.Event()
        loop = asyncio.get_running_loop()
        score = engine.scorer.score_sync

        def slow_score(*args):  # holds its slot until released
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
            return score(*args)

        engine.scorer.score_sync = slow_score
        first = asyncio.ensure_future(engine.likelihood(images))
        await asyncio.sleep(0.05)
        assert engine.stats().likelihood_in_flight == 1
        with pytest.raises(QueueFullError, match="1 likelihood requests are already running"):
            await engine.likelihood(images)
        release.set()
        await first
        assert engine.stats().likelihood_in_flight == 0
        return await engine.likelihood(images)  # the slot is free again

    result = run(scenario())
    assert result.nll_nats.shape == (1,)


def test_likelihood_marginal_and_conditional():
    model = tiny_model("gated", 1, size=6, num_classes=3, seed=25)
    engine = Engine(model)
    images = torch.randint(0, 256, (2, 1, 6, 6), dtype=torch.uint8)
    with torch.no_grad():
        per_class = torch.stack(
            [
                (
                    -torch.log_softmax(model(images, torch.full((2,), y)), 1)
                    .gather(1, images.long()[:, None])
                    .flatten(1)
                    .sum(1)
                )
                for y in range(3)
            ],
            1,
        )
    marginal = run(engine.likelihood(images))
    expected = -(torch.logsumexp(-per_class, 1) - torch.log(torch.tensor(3.0, dtype=torch.float64)))
    np.testing.assert_allclose(marginal.nll_nats, expected, rtol=0, atol=1e-8)
    assert np.array_equal(marginal.labels, per_class.argmin(1))
    np.testing.assert_allclose(np.exp(marginal.class_log_probs).sum(1), torch.ones(2, dtype=torch.float64))
    given = run(engine.likelihood(images, torch.tensor([2, 2])))
    np.testing.assert_allclose(given.nll_nats, per_class[:, 2], rtol=0, atol=1e-8)
    np.testing.assert_allclose(given.per_pixel.reshape(2, -1).sum(1), per_class[:, 2], rtol=0, atol=1e-8)
