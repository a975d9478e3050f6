"""Every request ends, whatever fails: each stage gets an injected fault, and every request submitted
must get its result or a clear error within a timeout, free its slot and queue place, and the engine
must serve the next request normally."""

from __future__ import annotations

import asyncio

import pytest
import torch

from app.engine import Engine, EngineStoppedError, GenerationError, GenerationRequest, ScoringError
from app.engine.cache import DecodeCache
from tests.helpers import TIMEOUT_S, assert_idle, failing_once, run, started, tiny_model


async def outcomes(streams) -> list:
    """Each stream's result or exception, each within TIMEOUT_S (a hang fails the test)."""

    async def one(stream):
        try:
            return await asyncio.wait_for(stream.result(), timeout=TIMEOUT_S)
        except asyncio.TimeoutError:
            pytest.fail("a request was left hanging")
        except Exception as error:  # noqa: BLE001 - collected for the assertions
            return error

    return await asyncio.gather(*(one(s) for s in streams))


async def still_serving(engine: Engine) -> None:
    result = await asyncio.wait_for(engine.generate(GenerationRequest(n=2, seed=99)), timeout=TIMEOUT_S)
    assert result.images.shape[0] == 2
    assert_idle(engine)


@pytest.mark.parametrize("lanes", [1, 2])
def test_a_failing_prefill_fails_only_its_request(lanes):
    model = tiny_model("gated", 1, size=6, seed=50)

    async def scenario():
        engine = Engine(model, lanes=lanes, batch_wait_s=0.05)  # the four arrive as one burst
        engine.sampler.prefill = failing_once(engine.sampler.prefill, after_calls=1)
        async with started(engine):
            streams = [engine.submit(GenerationRequest(n=1, seed=k), rows=False) for k in range(4)]
            results = await outcomes(streams)
            failed = [r for r in results if isinstance(r, Exception)]
            assert len(failed) == 1 and isinstance(failed[0], GenerationError), results
            assert "prefill failed (Boom: injected fault)" in str(failed[0])
            assert engine.stats().prefill_errors == 1
            assert_idle(engine)
            await still_serving(engine)

    run(scenario())


@pytest.mark.parametrize("stage", ["decode_row", "merge"])
def test_a_failing_decode_step_or_merge_fails_its_batch_with_an_error_and_the_engine_goes_on(stage, monkeypatch):
    model = tiny_model("gated", 1, size=6, seed=51)

    async def scenario():
        engine = Engine(model, batch_wait_s=0.05)
        if stage == "decode_row":
            engine.sampler.decode_row = failing_once(engine.sampler.decode_row, after_calls=2)
        else:
            monkeypatch.setattr(DecodeCache, "concat", staticmethod(failing_once(DecodeCache.concat)))
        async with started(engine):
            sizes = [1, 2, 1] if stage == "decode_row" else [1, 1, 1]  # a one-image prefill merges nothing
            streams = [engine.submit(GenerationRequest(n=n, seed=k), rows=k % 2 == 0) for k, n in enumerate(sizes)]
            results = await outcomes(streams)
            assert all(isinstance(r, GenerationError) for r in results), results
            assert all("generation failed (Boom: injected fault)" in str(r) for r in results)
            assert engine.stats().decode_errors == 1
            assert_idle(engine)
            await still_serving(engine)

    run(scenario())


def test_stopping_the_engine_ends_running_and_waiting_requests():
    model = tiny_model("gated", 1, size=16, seed=52)

    async def scenario():
        engine = Engine(model, max_batch_images=2, batch_wait_s=0)
        await engine.start()
        running = engine.submit(GenerationRequest(n=2, seed=1), rows=True)
        await running.__anext__()  # it is decoding now
        waiting = engine.submit(GenerationRequest(n=2, seed=2), rows=False)  # no room: it waits
        await engine.stop()
        results = await outcomes([running, waiting])
        assert all(isinstance(r, EngineStoppedError) for r in results), results
        assert_idle(engine)
        with pytest.raises(EngineStoppedError):
            engine.submit(GenerationRequest(n=1))
        await engine.start()  # and it can be started again
        try:
            await still_serving(engine)
        finally:
            await engine.stop()

    run(scenario())


def test_a_client_that_leaves_frees_its_slots_and_the_others_finish():
    model = tiny_model("gated", 1, size=8, seed=53)

    async def scenario():
        engine = Engine(model, batch_wait_s=0.02)
        async with started(engine):
            leaving = engine.submit(GenerationRequest(n=3, seed=1), rows=True)
            staying = engine.submit(GenerationRequest(n=1, seed=2), rows=False)
            await leaving.__anext__()
            await leaving.cancel()
            result = await asyncio.wait_for(staying.result(), timeout=TIMEOUT_S)
            assert result.images.shape[0] == 1
            assert_idle(engine)
            assert engine.stats().requests_cancelled == 1
            await still_serving(engine)

    run(scenario())


def test_a_failing_likelihood_pass_is_a_clear_error_and_frees_its_place():
    model = tiny_model("gated", 1, size=6, seed=54)
    images = torch.randint(0, 256, (2, 1, 6, 6), dtype=torch.uint8)

    async def scenario():
        engine = Engine(model, max_queue=1)
        engine.scorer._forward = failing_once(engine.scorer._forward, error=MemoryError("out of memory"))
        with pytest.raises(ScoringError, match=r"the likelihood pass failed \(MemoryError: out of memory\)"):
            await asyncio.wait_for(engine.likelihood(images), timeout=TIMEOUT_S)
        assert engine.stats().likelihood_in_flight == 0 and engine.stats().likelihood_errors == 1
        result = await asyncio.wait_for(engine.likelihood(images), timeout=TIMEOUT_S)  # max_queue=1: freed
        assert result.nll_nats.shape == (2,)

    run(scenario())
