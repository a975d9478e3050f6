"""Per-image random streams, and requests split across decode lanes.

Every image draws from its own stream (seed, k), so image k is the same whether its request is alone,
in a crowd, split across lanes or longer; and the engine, which splits a request of several images
into one shard per lane, must deliver its rows in order, its result once, and one clear error whatever
fails in any shard."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from app.engine import Engine, EngineStoppedError, GenerationError, GenerationRequest, RowEvent, sample_cached
from app.model import sample_naive
from tests.helpers import TIMEOUT_S, assert_idle, failing_once, run, started, tiny_model


async def until_idle(engine: Engine) -> None:
    """Wait (at most 2 s) for every shard to have left its lane, then check the engine is empty."""
    for _ in range(200):
        if engine.stats().active_images == 0:
            break
        await asyncio.sleep(0.01)
    assert_idle(engine)


async def next_item(stream):
    return await asyncio.wait_for(stream.__anext__(), timeout=TIMEOUT_S)


async def drained(stream) -> list:
    """Every item the stream delivers until it ends (an exception is returned as the last item)."""
    items = []
    while True:
        try:
            items.append(await next_item(stream))
        except StopAsyncIteration:
            return items
        except asyncio.TimeoutError:
            pytest.fail("a request was left hanging")
        except Exception as error:  # noqa: BLE001 - collected for the assertions
            items.append(error)
            return items


# ---- the protocol: each image's own stream ---------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["naive", "cached"])
def test_image_k_depends_only_on_the_seed_and_k(sampler):
    """A longer request with the same seed begins with the same images (and drawn labels); a different
    seed gives different ones."""
    model = tiny_model("gated", 1, size=5, num_classes=4, seed=60, dtype=torch.float32)
    sample = sample_naive if sampler == "naive" else sample_cached
    short, long = sample(model, 2, seed=7), sample(model, 5, seed=7)
    assert np.array_equal(long.images[:2], short.images)
    assert np.array_equal(long.labels[:2], short.labels)
    np.testing.assert_allclose(long.log_prob[:2], short.log_prob, rtol=0, atol=1e-9)
    other = sample(model, 5, seed=8)
    assert all(not np.array_equal(a, b) for a, b in zip(other.images, long.images))


def test_every_bit_of_the_seed_counts():
    """torch's CPU generator keeps only the low 32 bits of a seed; the protocol's streams keep all 63, so
    seeds 2**32 apart (both valid API seeds) give different images."""
    model = tiny_model("gated", 1, size=5, seed=61, dtype=torch.float32)
    a, b = sample_cached(model, 2, seed=5), sample_cached(model, 2, seed=5 + 2**32)
    assert not np.array_equal(a.images, b.images)
    assert np.array_equal(sample_naive(model, 2, seed=5 + 2**32).images, b.images)


# ---- splitting across lanes ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gated", "pixelcnn"])
def test_a_big_request_on_an_idle_engine_runs_on_every_lane_and_gives_the_same_images(arch):
    model = tiny_model(arch, 1, size=6, num_classes=3, seed=62, dtype=torch.float32)

    async def scenario():
        engine = Engine(model, lanes=2, batch_wait_s=0)
        # The two shards' prefills must meet: one lane holding both would wait here until the timeout.
        # (Without it a lane could finish a shard of this tiny model before the other lane's thread runs.)
        prefill, both_lanes = engine.sampler.prefill, threading.Barrier(2, timeout=TIMEOUT_S)
        engine.sampler.prefill = lambda *args: (both_lanes.wait(), prefill(*args))[1]
        async with started(engine):
            result = await engine.generate(GenerationRequest(n=7, seed=11, temperature=0.8))
            return result, engine.stats()

    result, stats = run(scenario())
    alone = sample_naive(model, 7, seed=11, temperature=0.8)
    assert np.array_equal(result.images, alone.images)
    assert np.array_equal(result.labels, alone.labels)
    np.testing.assert_allclose(result.log_prob, alone.log_prob, rtol=0, atol=1e-4)
    assert stats.rows_decoded_per_lane == [6, 6]  # both lanes drew every row, in shards of 3 and 4
    assert stats.batch_sizes_seen == {3: 6, 4: 6}
    assert stats.requests_submitted == stats.requests_completed == 1


def test_a_split_stream_delivers_every_row_once_in_order_then_the_result():
    """Rows of a completion split in three uneven shards (lanes progressing at their own pace) reach the
    caller in order, each with all images, and equal the result."""
    model = tiny_model("gated", 1, size=7, num_classes=3, seed=63, dtype=torch.float32)
    known = torch.randint(0, 256, (1, 1, 7, 7), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    request = GenerationRequest(n=5, seed=3, labels=[2], known=known, known_rows=2)

    async def scenario():
        async with started(Engine(model, lanes=3, batch_wait_s=0)) as engine:
            busy = engine.submit(GenerationRequest(n=4, seed=9), rows=False)  # one lane starts busy
            items = await drained(engine.submit(request, rows=True))
            await busy.result()
            assert_idle(engine)
            return items

    items = run(scenario())
    *rows, result = items
    assert [event.row for event in rows] == list(range(2, 7))
    assert all(isinstance(event, RowEvent) and event.pixels.shape == (5, 1, 7) for event in rows)
    assert np.array_equal(np.stack([event.pixels for event in rows], axis=2), result.images[:, :, 2:])
    expected = sample_naive(model, 5, labels=torch.tensor([2]), seed=3, known=known, known_rows=2)
    assert np.array_equal(result.images, expected.images)


def test_the_queue_limit_counts_requests_not_shards():
    model = tiny_model("gated", 1, size=6, seed=64)

    async def scenario():
        engine = Engine(model, lanes=2, max_queue=2, batch_wait_s=0)
        release = threading.Event()
        prefill = engine.sampler.prefill
        engine.sampler.prefill = lambda *args: (release.wait(10), prefill(*args))[1]
        async with started(engine):
            first = engine.submit(GenerationRequest(n=4, seed=1), rows=False)  # both lanes hold its shards
            for _ in range(100):
                if engine.stats().queue_size == 0:
                    break
                await asyncio.sleep(0.01)
            waiting = [engine.submit(GenerationRequest(n=4, seed=k), rows=False) for k in (2, 3)]
            assert engine.stats().queue_size == 2
            with pytest.raises(Exception, match="the queue is full"):
                engine.submit(GenerationRequest(n=1, seed=4))
            release.set()
            results = [await asyncio.wait_for(s.result(), TIMEOUT_S) for s in [first, *waiting]]
            assert [r.images.shape[0] for r in results] == [4, 4, 4]
            assert_idle(engine)

    run(scenario())


# ---- faults in one shard end the whole request, once -----------------------------------------------------


def test_a_failing_prefill_of_one_shard_fails_its_request_once_and_the_other_shard_leaves():
    model = tiny_model("gated", 1, size=8, seed=65)

    async def scenario():
        engine = Engine(model, lanes=2, batch_wait_s=0.05)
        prefill = engine.sampler.prefill

        def after_the_failure(*args):  # the healthy shard starts decoding once the other has failed
            for _ in range(1000):
                if engine.stats().prefill_errors:
                    break
                time.sleep(0.002)
            return prefill(*args)

        engine.sampler.prefill = failing_once(after_the_failure, after_calls=1)  # the second shard's
        async with started(engine):
            stream = engine.submit(GenerationRequest(n=6, seed=1), rows=True)
            items = await drained(stream)
            assert len(items) == 1 and isinstance(items[0], GenerationError), items
            assert "prefill failed (Boom: injected fault)" in str(items[0])
            await until_idle(engine)  # the healthy shard leaves its lane at its next row
            stats = engine.stats()
            assert stats.prefill_errors == 1 and stats.requests_completed == 0
            assert stats.requests_cancelled == 0  # failed, not cancelled
            assert stats.rows_decoded <= 2  # the healthy shard left at once instead of drawing its 8 rows
            assert stream._queue.empty()  # nothing was delivered after the error
            after = await asyncio.wait_for(engine.generate(GenerationRequest(n=4, seed=2)), TIMEOUT_S)
            assert np.array_equal(after.images, sample_cached(model, 4, seed=2).images)

    run(scenario())


def test_a_failing_decode_step_in_one_lane_fails_the_split_request_once():
    model = tiny_model("gated", 1, size=8, seed=66)

    async def scenario():
        engine = Engine(model, lanes=2, batch_wait_s=0.05)
        decode_row = engine.sampler.decode_row

        def slow_step(*args):  # rows of a real model's length, so that the healthy lane's next row is later
            time.sleep(0.02)
            return decode_row(*args)

        engine.sampler.decode_row = failing_once(slow_step, after_calls=4)  # the fifth step, in either lane
        async with started(engine):
            stream = engine.submit(GenerationRequest(n=4, seed=1), rows=True)
            items = await drained(stream)
            assert isinstance(items[-1], GenerationError), items
            assert "generation failed (Boom: injected fault)" in str(items[-1])
            rows = [item.row for item in items[:-1]]
            assert rows == list(range(len(rows))) and len(rows) < 8
            await until_idle(engine)
            assert engine.stats().decode_errors == 1
            # 4 steps before the fault, then the other lane's shard leaves within a row or two (it would
            # take 8 + the failed lane's steps to finish its 8 rows).
            assert engine.stats().rows_decoded <= 7
            assert stream._queue.empty()
            after = await asyncio.wait_for(engine.generate(GenerationRequest(n=4, seed=2)), TIMEOUT_S)
            assert np.array_equal(after.images, sample_cached(model, 4, seed=2).images)

    run(scenario())


def test_cancelling_a_split_request_frees_every_lane_and_counts_once():
    model = tiny_model("gated", 1, size=12, seed=67)

    async def scenario():
        async with started(Engine(model, lanes=2, batch_wait_s=0)) as engine:
            stream = engine.submit(GenerationRequest(n=6, seed=1), rows=True)
            first = await next_item(stream)
            assert isinstance(first, RowEvent) and first.row == 0
            await stream.cancel()
            await until_idle(engine)
            stats = engine.stats()
            assert stats.requests_cancelled == 1 and stats.requests_completed == 0
            await asyncio.wait_for(engine.generate(GenerationRequest(n=2, seed=2)), TIMEOUT_S)

    run(scenario())


def test_stopping_the_engine_ends_a_split_request_with_one_error():
    model = tiny_model("gated", 1, size=16, seed=68)

    async def scenario():
        engine = Engine(model, lanes=2, batch_wait_s=0)
        await engine.start()
        stream = engine.submit(GenerationRequest(n=4, seed=1), rows=True)
        await next_item(stream)
        await engine.stop()
        items = await drained(stream)
        assert isinstance(items[-1], EngineStoppedError), items
        assert all(isinstance(item, RowEvent) for item in items[:-1])
        assert stream._queue.empty()
        assert_idle(engine)

    run(scenario())
