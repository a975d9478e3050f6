"""Admission by priority, then tenants in turn, then arrival; deadlines end work that is late, waiting or
running, and no decode step or likelihood pass is spent on it (the engine counts it to prove so)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from app.engine import DeadlineExceededError, GenerationRequest, QueueFullError, RowEvent, sample_cached
from app.engine.admission import admission_order
from tests.helpers import held_lane, run, running, tiny_model


def waiting_shard(name: str, priority: int = 1, tenant: str = "", shards: int = 1) -> list[SimpleNamespace]:
    owner = SimpleNamespace(name=name, request=GenerationRequest(priority=priority, tenant=tenant))
    return [SimpleNamespace(owner=owner) for _ in range(shards)]


def test_admission_order_is_priority_then_tenants_in_turn_then_arrival():
    waiting = [
        *waiting_shard("a1", tenant="a", shards=2),
        *waiting_shard("a2", tenant="a"),
        *waiting_shard("a3", tenant="a"),
        *waiting_shard("low", priority=0, tenant="b"),
        *waiting_shard("b1", tenant="b"),
        *waiting_shard("high", priority=2, tenant="a"),
        *waiting_shard("b2", tenant="b"),
        *waiting_shard("c1", tenant="c"),
    ]
    order = [shard.owner.name for shard in admission_order(waiting)]
    # Turns are counted per tenant over every waiting request: b's "low" is b's first, so b1 is its second.
    assert order == ["high", "a1", "a1", "c1", "a2", "b1", "a3", "b2", "low"]


def admitted_order(model, requests: list[GenerationRequest]) -> list[int]:
    """Submit `requests` while the engine's only lane (one image per step) is held, release it, and
    return their indices in the order they finished."""

    async def scenario():
        async with held_lane(model, max_batch_images=1, max_queue=64) as (engine, release):
            blocker = engine.submit(GenerationRequest(n=1, seed=99), rows=False)
            while engine.stats().queue_size:
                await asyncio.sleep(0.005)
            streams = [engine.submit(request, rows=False) for request in requests]
            finished: list[int] = []

            async def wait(index: int) -> None:
                await streams[index].result()
                finished.append(index)

            release.set()
            await asyncio.wait_for(asyncio.gather(blocker.result(), *map(wait, range(len(streams)))), timeout=60)
            return finished

    return run(scenario())


def test_a_high_priority_request_overtakes_the_queue():
    model = tiny_model("gated", 1, size=6, seed=41)
    requests = [GenerationRequest(n=1, seed=i, priority=1) for i in range(4)]
    requests.append(GenerationRequest(n=1, seed=10, priority=2))
    requests.insert(1, GenerationRequest(n=1, seed=11, priority=0))
    order = admitted_order(model, requests)
    assert order[0] == 5  # the high one first
    assert order[-1] == 1  # the low one last
    assert order[1:-1] == [0, 2, 3, 4]  # the rest in arrival order


def test_a_flooding_tenant_cannot_starve_another():
    model = tiny_model("gated", 1, size=6, seed=42)
    flood = [GenerationRequest(n=1, seed=i, tenant="a") for i in range(10)]
    other = [GenerationRequest(n=1, seed=20 + i, tenant="b") for i in range(2)]
    order = admitted_order(model, flood + other)
    b_positions = [order.index(10), order.index(11)]
    assert b_positions == [1, 3], order  # a, b, a, b, then the rest of a's flood


def test_a_waiting_request_past_its_deadline_ends_without_running():
    model = tiny_model("gated", 1, size=8, seed=43)

    async def scenario():
        async with held_lane(model, max_batch_images=1) as (engine, release):
            blocker = engine.submit(GenerationRequest(n=1, seed=1), rows=False)
            while engine.stats().queue_size:
                await asyncio.sleep(0.005)
            late = engine.submit(GenerationRequest(n=1, seed=2, deadline=time.monotonic() + 0.05), rows=False)
            on_time = engine.submit(GenerationRequest(n=1, seed=3), rows=False)
            await asyncio.sleep(0.1)
            release.set()
            with pytest.raises(DeadlineExceededError, match="deadline passed"):
                await asyncio.wait_for(late.result(), timeout=30)
            results = await asyncio.wait_for(asyncio.gather(blocker.result(), on_time.result()), timeout=30)
            return results, engine.stats()

    results, stats = run(scenario())
    assert np.array_equal(results[1].images, sample_cached(model, 1, seed=3).images)
    assert stats.requests_expired == 1 and stats.rows_past_deadline == 0
    assert stats.rows_decoded == 2 * 8  # the blocker's rows and on_time's; none for the late request


def test_a_running_request_stops_at_its_deadline_and_the_others_finish():
    model = tiny_model("gated", 1, size=24, layers=4, seed=44, hidden_channels=192).float()

    async def scenario():
        async with running(model, max_batch_images=8, batch_wait_s=0) as engine:
            other = engine.submit(GenerationRequest(n=1, seed=5), rows=False)
            late = engine.submit(GenerationRequest(n=2, seed=6))
            rows = []
            with pytest.raises(DeadlineExceededError):
                async for event in late:
                    assert isinstance(event, RowEvent)
                    rows.append(event.row)
                    if len(rows) == 2:  # from now on, the request is late
                        late._request.request.deadline = time.monotonic()
            result = await asyncio.wait_for(other.result(), timeout=60)
            return rows, result, engine.stats()

    rows, result, stats = run(scenario())
    assert 2 <= len(rows) <= 3  # a row already being drawn when the deadline passed may still arrive
    assert np.array_equal(result.images, sample_cached(model, 1, seed=5).images)
    assert stats.requests_expired == 1 and stats.rows_past_deadline == 0
    assert stats.active_images == 0


@pytest.mark.parametrize("cancel_first", [True, False])
def test_a_request_cancelled_and_late_is_counted_once(cancel_first):
    """A caller that gives up at its own timeout, equal to X-Request-Timeout: its request ends cancelled or
    expired, whichever the engine saw first, never both (completed + cancelled + expired = submitted). Its
    second image waits its turn in a lane group (step_images=1) while a slowed step runs."""
    model = tiny_model("gated", 1, size=6, seed=46).float()

    async def scenario():
        async with running(model, lanes=1, batch_wait_s=0, step_images=1) as engine:
            decode_row = engine.sampler.decode_row

            def slow_decode_row(*args, **kwargs):
                time.sleep(0.1)
                return decode_row(*args, **kwargs)

            engine.sampler.decode_row = slow_decode_row
            stream = engine.submit(GenerationRequest(n=2, seed=1, deadline=time.monotonic() + 0.05))
            if cancel_first:  # inside the first step: the deadline has passed, the engine has not looked yet
                await asyncio.sleep(0.08)
                await stream.cancel()
            else:  # the engine ends it at its next step, then the caller, not having read that yet, cancels
                while not engine.stats().requests_expired:
                    await asyncio.sleep(0.01)
                await stream.cancel()
            deadline = time.monotonic() + 10
            while engine.stats().active_images and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # the lane's next steps, where a second count would come
            return engine.stats()

    stats = run(scenario())
    assert stats.requests_submitted == 1 and stats.requests_completed == 0
    assert (stats.requests_cancelled, stats.requests_expired) == ((1, 0) if cancel_first else (0, 1)), stats


def test_a_request_late_in_one_lane_and_cancelled_before_another_notices_is_counted_once():
    """Two images on two lanes: lane 0 (fast steps) ends the request at its deadline; its caller cancels
    before reading that error; lane 1 (slow steps) then finds it gone. Counted expired, not also cancelled."""
    model = tiny_model("gated", 1, size=6, seed=47).float()

    async def scenario():
        async with running(model, lanes=2, batch_wait_s=0, wavefront=False) as engine:
            decode_row = engine.sampler.decode_row

            def uneven_decode_row(*args, **kwargs):
                time.sleep(0.4 if threading.current_thread().name.endswith("-1") else 0.1)
                return decode_row(*args, **kwargs)

            engine.sampler.decode_row = uneven_decode_row
            stream = engine.submit(GenerationRequest(n=2, seed=1, deadline=time.monotonic() + 0.15))
            while not engine.stats().requests_expired:  # lane 0 has ended it; lane 1 is inside its first step
                await asyncio.sleep(0.01)
            await stream.cancel()
            await asyncio.sleep(0.6)  # lane 1's step ends and its shard leaves
            return engine.stats()

    stats = run(scenario())
    assert stats.requests_submitted == 1 and stats.active_images == 0
    assert (stats.requests_cancelled, stats.requests_expired) == (0, 1), stats


def test_likelihood_past_its_deadline_runs_no_pass():
    model = tiny_model("gated", 1, size=6, num_classes=3, seed=45)
    images = torch.randint(0, 256, (4, 1, 6, 6), dtype=torch.uint8)

    async def scenario():
        async with running(model) as engine:
            with pytest.raises(DeadlineExceededError):
                await engine.likelihood(images, None, deadline=time.monotonic())
            before = engine.stats()
            scored = await engine.likelihood(images, None, deadline=time.monotonic() + 60)
            return before, scored, engine.stats()

    before, scored, after = run(scenario())
    assert before.likelihood_passes == 0 and before.requests_expired == 1
    assert after.likelihood_passes == 4 and len(scored.nll_nats) == 4  # 3 classes + the per-pixel pass


def test_higher_priority_work_runs_alone_and_parked_work_resumes_with_the_same_bytes():
    model = tiny_model("gated", 1, size=10, seed=46)

    async def scenario():
        async with running(model, max_batch_images=4, batch_wait_s=0) as engine:
            low = engine.submit(GenerationRequest(n=4, seed=7, priority=0))
            high = None
            async for event in low:
                if isinstance(event, RowEvent) and event.row == 2:  # the lane is full of low work
                    high = asyncio.ensure_future(engine.generate(GenerationRequest(n=2, seed=8, priority=2)))
                if not isinstance(event, RowEvent):
                    low_result = event
            return low_result, await high, engine.stats()

    low, high, stats = run(scenario())
    assert np.array_equal(low.images, sample_cached(model, 4, seed=7).images)
    assert np.array_equal(high.images, sample_cached(model, 2, seed=8).images)
    assert stats.shards_parked >= 1
    assert 2 in stats.batch_sizes_seen and 6 not in stats.batch_sizes_seen  # the high one alone, never mixed
    assert stats.active_images == 0 and stats.requests_completed == 2


def image_rows_decoded(stats) -> int:
    return sum(size * steps for size, steps in stats.batch_sizes_seen.items())


def test_a_lane_decodes_at_most_step_images_per_step_and_its_groups_take_turns_with_the_same_bytes():
    model = tiny_model("gated", 1, size=8, seed=48)
    requests = [GenerationRequest(n=n, seed=20 + n) for n in (2, 5, 1, 3)]

    async def scenario():
        async with running(model, step_images=2, batch_wait_s=0.05) as engine:
            streams = [engine.submit(request) for request in requests]
            firsts = []

            async def first_and_result(stream):
                result = None
                async for event in stream:
                    if isinstance(event, RowEvent) and event.row == 0:
                        firsts.append(image_rows_decoded(engine.stats()))
                    if not isinstance(event, RowEvent):
                        result = event
                return result

            results = await asyncio.gather(*(first_and_result(stream) for stream in streams))
            return results, firsts, engine.stats()

    results, firsts, stats = run(scenario())
    for request, result in zip(requests, results):
        assert np.array_equal(result.images, sample_cached(model, request.n, seed=request.seed).images)
    assert set(stats.batch_sizes_seen) <= {1, 2}  # the request of 5 went in shards of at most 2
    # Turns: every request drew its first row before any had drawn all 8 (11 images x 8 rows in all).
    assert max(firsts) <= 2 * 11
    assert stats.active_images == 0 and stats.requests_completed == 4


def test_while_priorities_mix_steps_are_half_as_big_and_the_bytes_stay_the_same():
    model = tiny_model("gated", 1, size=8, seed=50)

    async def scenario(mixed: bool):
        async with running(model, step_images=4, batch_wait_s=0.05) as engine:
            requests = [GenerationRequest(n=1, seed=9, priority=2)] if mixed else []
            requests.append(GenerationRequest(n=8, seed=7, priority=0))  # meets the high one: mixed from here
            streams = [engine.submit(request, rows=False) for request in requests]
            results = await asyncio.gather(*(stream.result() for stream in streams))
            return results[-1], engine.stats()

    alone, alone_stats = run(scenario(mixed=False))
    mixed, mixed_stats = run(scenario(mixed=True))
    expected = sample_cached(model, 8, seed=7).images
    assert np.array_equal(alone.images, expected) and np.array_equal(mixed.images, expected)
    assert max(alone_stats.batch_sizes_seen) == 4
    assert max(mixed_stats.batch_sizes_seen) == 2


def test_a_higher_priority_arrival_waits_for_one_short_step_not_the_lane_s_whole_batch():
    model = tiny_model("gated", 1, size=10, seed=49)

    async def scenario():
        async with running(model, step_images=2, batch_wait_s=0) as engine:
            low = engine.submit(GenerationRequest(n=8, seed=7, priority=0))
            high_first_row = None
            async for event in low:
                if isinstance(event, RowEvent) and event.row == 2 and high_first_row is None:
                    before = image_rows_decoded(engine.stats())
                    high = engine.submit(GenerationRequest(n=1, seed=8, priority=2))
                    async for high_event in high:
                        if high_first_row is None:
                            high_first_row = image_rows_decoded(engine.stats()) - before
                        if not isinstance(high_event, RowEvent):
                            high_result = high_event
                if not isinstance(event, RowEvent):
                    low_result = event
            return low_result, high_result, high_first_row

    low, high, images_before_high = run(scenario())
    assert np.array_equal(low.images, sample_cached(model, 8, seed=7).images)
    assert np.array_equal(high.images, sample_cached(model, 1, seed=8).images)
    # Rows of images decoded from its arrival to its first row: the step in flight (2 images) and its own.
    assert images_before_high <= 2 + 1


def test_a_higher_priority_request_takes_the_place_of_the_latest_lower_one_in_a_full_queue():
    model = tiny_model("gated", 1, size=6, seed=47)

    async def scenario():
        async with held_lane(model, max_batch_images=1, max_queue=2) as (engine, release):
            blocker = engine.submit(GenerationRequest(n=1, seed=1), rows=False)
            while engine.stats().queue_size:
                await asyncio.sleep(0.005)
            first = engine.submit(GenerationRequest(n=1, seed=2, priority=0), rows=False)
            second = engine.submit(GenerationRequest(n=1, seed=3, priority=0), rows=False)
            with pytest.raises(QueueFullError):  # a peer cannot push anyone out
                engine.submit(GenerationRequest(n=1, seed=4, priority=0), rows=False)
            high = engine.submit(GenerationRequest(n=1, seed=5, priority=2), rows=False)
            with pytest.raises(QueueFullError, match="higher-priority work took this request's place"):
                await asyncio.wait_for(second.result(), timeout=10)
            release.set()
            results = await asyncio.wait_for(asyncio.gather(blocker.result(), first.result(), high.result()), 30)
            return results, engine.stats()

    results, stats = run(scenario())
    assert np.array_equal(results[2].images, sample_cached(model, 1, seed=5).images)
    assert stats.rejected_queue_full == 2 and stats.requests_completed == 3
