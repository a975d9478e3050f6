"""Wavefront decoding (app/engine/wavefront.py): several threads draw the rows of the same images, each
row starting once the row above is far enough ahead. The images must be the very bytes (and log p the
very numbers) of one lane drawing row by row, whatever the thread count, the column grouping, the
colours, the class, the temperature or the known rows; the reach it waits for must be what the model's
code reads; and the engine must use it for a lone request and go back to batching under load."""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
import time

import numpy as np
import pytest
import torch

from app.engine import CachedSampler, Engine, GenerationRequest, c_library, iter_sample, sample_cached
from app.engine import wavefront as wavefront_module
from app.engine.protocol import image_streams, prepare_canvas, row_uniforms
from app.engine.types import EngineStoppedError, GenerationError
from app.engine.wavefront import Wavefront, gated_reach, masked_conv_reach, sample_wavefront, uniforms_ahead
from app.model import build
from tests.helpers import tiny_model

pytestmark = pytest.mark.skipif(c_library._compiler() is None, reason="no C compiler on this machine")

SIZE = 14  # wide enough for a skew: rows start (reach 4) + group columns apart


def gated(channels: int, classes: int, seed: int = 0, arch: str = "gated"):
    return tiny_model(
        arch,
        image_channels=channels,
        num_classes=classes,
        size=SIZE,
        dtype=torch.float32,
        hidden_channels=18,
        seed=seed,
    )


def one_lane(sampler: CachedSampler, n: int, seed: int, labels, known, known_rows: int, temperature: float):
    """Row by row on one thread: values (R, n, C, W), each row's log p (R, n)."""
    config = sampler.config
    canvas = prepare_canvas(config, n, known, known_rows, torch.device("cpu"))
    state = sampler.prefill(canvas, labels, known_rows)
    streams = image_streams(seed, n)
    temperatures = torch.full((n, 1), temperature, dtype=torch.float64)
    rows, log_probs = [], []
    for _ in range(known_rows, config.height):
        row, log_prob = sampler.decode_row(
            state, row_uniforms(streams, config.image_channels, config.width), temperatures
        )
        rows.append(row)
        log_probs.append(log_prob)
    return torch.stack(rows), torch.stack(log_probs)


def wavefront(
    sampler: CachedSampler, n, seed, labels, known, known_rows, temperature, lanes: int, group: int, split=None
):
    config = sampler.config
    canvas = prepare_canvas(config, n, known, known_rows, torch.device("cpu"))
    state = sampler.prefill(canvas, labels, known_rows)
    uniforms = uniforms_ahead(image_streams(seed, n), config.height - known_rows, config.image_channels, config.width)
    decoder = Wavefront.for_row_loop(sampler.row_loop)
    decoder.group = group
    if split is not None:
        decoder.split = split
    return decoder.decode(state, uniforms, torch.full((n, 1), temperature, dtype=torch.float64), lanes)


@pytest.mark.parametrize("arch", ["gated", "pixelcnn"])
@pytest.mark.parametrize("channels,classes", [(1, 0), (3, 0), (1, 4), (3, 4)])
def test_wavefront_draws_the_bytes_of_one_lane(arch, channels, classes):
    model = gated(channels, classes, seed=channels + classes, arch=arch)
    sampler = CachedSampler(model)
    assert sampler.row_loop.name == "c-kernel"
    known_image = torch.randint(0, 256, (1, channels, SIZE, SIZE), generator=torch.Generator().manual_seed(5))
    cases = [  # (images, seed, known rows, temperature)
        (1, 0, 0, 1.0),
        (1, 1, 0, 0.7),
        (2, 2, 0, 1.0),
        (1, 3, 5, 1.0),  # a completion: the wavefront starts from prefilled caches
        (3, 4, SIZE - 2, 2.0),
    ]
    for n, seed, known_rows, temperature in cases:
        labels = torch.arange(n) % classes if classes else None
        known = known_image if known_rows else None
        expected, expected_log_p = one_lane(sampler, n, seed, labels, known, known_rows, temperature)
        # Two threads of a gated model split each row's work by role (`split` layers of the vertical stack
        # on one thread; 0: by rows), every split the same bytes.
        splits = range(model.config.layers + 1) if arch == "gated" else [0]
        runs = [(2, 1, None), (2, 2, None), (3, 1, None), (2, 8, None), (1, 2, None), (5, 1, None)]
        runs += [(2, group, split) for split in splits for group in (1, 3)]
        for lanes, group, split in runs:
            values, log_p = wavefront(sampler, n, seed, labels, known, known_rows, temperature, lanes, group, split)
            case = f"n={n} seed={seed} known_rows={known_rows} lanes={lanes} group={group} split={split}"
            assert values.shape == expected.shape, case
            assert torch.equal(values, expected), f"{case}: {(values != expected).sum()} sub-pixels differ"
            assert torch.equal(log_p, expected_log_p), case


@pytest.mark.parametrize("arch,first_kernel,kernel", [("pixelcnn", 3, 5), ("pixelcnn", 3, 7), ("gated", 3, 5)])
def test_wavefront_bytes_when_later_kernels_are_the_widest(arch, first_kernel, kernel):
    """The reach then comes from the later layers (the masked-conv blocks' reduced features)."""
    config = dataclasses.replace(
        tiny_model(arch, size=SIZE, num_classes=3).config, first_kernel_size=first_kernel, kernel_size=kernel
    )
    torch.manual_seed(1)
    sampler = CachedSampler(build(config).float().eval())
    labels = torch.tensor([1, 2])
    expected, expected_log_p = one_lane(sampler, 2, 7, labels, None, 0, 1.0)
    for lanes in (2, 4):
        values, log_p = wavefront(sampler, 2, 7, labels, None, 0, 1.0, lanes, 1)
        assert torch.equal(values, expected), f"lanes={lanes}: {(values != expected).sum()} sub-pixels differ"
        assert torch.equal(log_p, expected_log_p)


@pytest.mark.parametrize("arch", ["gated", "pixelcnn"])
def test_a_stopped_wavefront_leaves_caches_that_decode_on_row_by_row(arch):
    """Stopped at a row boundary (what a submit does), the caches it leaves are those of one lane there."""
    model = gated(1, 4, arch=arch)
    sampler = CachedSampler(model)
    labels = torch.tensor([2])
    expected, _ = one_lane(sampler, 1, 9, labels, None, 0, 1.0)
    state = sampler.prefill(prepare_canvas(model.config, 1, None, 0, torch.device("cpu")), labels, 0)
    streams = image_streams(9, 1)
    decoder = Wavefront.for_row_loop(sampler.row_loop)
    ones = torch.ones((1, 1), dtype=torch.float64)
    first, _ = decoder.decode(state, uniforms_ahead(streams, 6, 1, SIZE), ones, 2)
    stop = ctypes.c_int32(1)
    nothing, _ = decoder.decode(state, uniforms_ahead(image_streams(0, 1), 3, 1, SIZE), ones, 2, stop)
    assert nothing.shape[0] == 0, "a set stop flag starts no row"
    rest = [sampler.decode_row(state, row_uniforms(streams, 1, SIZE), ones)[0] for _ in range(SIZE - 6)]
    assert torch.equal(torch.cat([first, torch.stack(rest)]), expected)


def test_the_reach_is_what_the_gated_model_reads_of_the_row_above():
    """gated_reach says how far right pixel (r, j) reads row r - 1; check it against the model itself:
    changing pixel (r - 1, j + reach) changes the logits at (r, j), changing (r - 1, j + reach + 1) does not."""
    for first_kernel, kernel, layers in [(5, 3, 3), (7, 5, 2), (3, 3, 4)]:
        config = dataclasses.replace(
            tiny_model("gated", size=SIZE).config, first_kernel_size=first_kernel, kernel_size=kernel, layers=layers
        )
        torch.manual_seed(0)
        model = build(config).double().eval()
        reach = gated_reach(config)
        r, j = 6, 1
        image = torch.randint(0, 256, (1, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(1))

        def logits_after(column: int) -> torch.Tensor:
            changed = image.clone()
            changed[0, 0, r - 1, column] = (changed[0, 0, r - 1, column] + 128) % 256
            with torch.no_grad():
                return model(changed)[0, :, 0, r, j]

        with torch.no_grad():
            base = model(image)[0, :, 0, r, j]
        assert not torch.equal(logits_after(j + reach), base), (first_kernel, kernel, layers)
        assert torch.equal(logits_after(j + reach + 1), base), (first_kernel, kernel, layers)


def test_the_masked_conv_reach_covers_what_the_model_reads_of_the_row_above():
    """Nothing at (r - 1, j + reach + 1) or beyond changes (r, j); the input convolution's pixels at
    j + first_kernel_size // 2 do (the blocks' reach is in features, checked by the byte-identity test)."""
    for first_kernel, kernel, layers in [(5, 3, 3), (3, 7, 2), (7, 3, 1)]:
        config = dataclasses.replace(
            tiny_model("pixelcnn", size=SIZE).config, first_kernel_size=first_kernel, kernel_size=kernel, layers=layers
        )
        torch.manual_seed(0)
        model = build(config).double().eval()
        reach, r, j = masked_conv_reach(config), 6, 1
        assert reach == max(first_kernel, kernel) // 2
        image = torch.randint(0, 256, (1, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(1))

        def logits_after(column: int) -> torch.Tensor:
            changed = image.clone()
            changed[0, 0, r - 1, column] = (changed[0, 0, r - 1, column] + 128) % 256
            with torch.no_grad():
                return model(changed)[0, :, 0, r, j]

        with torch.no_grad():
            base = model(image)[0, :, 0, r, j]
        assert not torch.equal(logits_after(j + first_kernel // 2), base), (first_kernel, kernel, layers)
        for column in range(j + reach + 1, SIZE):
            assert torch.equal(logits_after(column), base), (first_kernel, kernel, layers, column)


@pytest.mark.parametrize("lanes", [1, 2])
def test_the_engine_draws_a_lone_request_in_one_call_and_batches_under_load(lanes):
    """A lone request on an idle engine: its rows in one call of the kernel, on every lane's core (by
    wavefront) or on the one lane's; a crowd: batched. Every image the bytes of row-by-row decoding."""
    model = gated(1, 4)
    row_by_row = {seed: list(iter_sample(model, 1, seed=seed, labels=torch.tensor([1])))[-1] for seed in range(6)}

    async def main():
        engine = Engine(model, lanes=lanes)
        await engine.start()
        try:
            alone = await engine.generate(GenerationRequest(seed=0, labels=[1]))
            after_alone = engine.stats()
            crowd = await asyncio.gather(*(engine.generate(GenerationRequest(seed=s, labels=[1])) for s in range(6)))
            return alone, after_alone, crowd, engine.stats()
        finally:
            await engine.stop()

    alone, after_alone, crowd, stats = asyncio.run(main())
    assert after_alone.rows_wavefront == SIZE, "a lone request on an idle engine is drawn in one call"
    assert alone.decode_threads == lanes, "on every lane's core, and says so (Server-Timing passes it on)"
    for seed, result in enumerate([alone, *crowd[1:]]):
        assert np.array_equal(result.images, row_by_row[seed].images.numpy()), f"seed {seed}"
        assert np.array_equal(result.log_prob, row_by_row[seed].log_prob.numpy()), f"seed {seed}"
    assert np.array_equal(crowd[0].images, alone.images), "the same seed, the same bytes"
    # Six requests at once: batched (no lane draws in one call while others wait; a request left alone at the
    # end, with the other lane idle, may finish on both cores, and says so in decode_threads).
    assert max(stats.batch_sizes_seen) >= 2, stats.batch_sizes_seen
    assert 1 in {result.decode_threads for result in crowd}


def test_a_completion_that_keeps_part_of_a_row_draws_that_row_row_by_row_then_by_wavefront():
    model = gated(1, 4)
    known = torch.randint(0, 256, (1, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(8))
    alone = sample_cached(model, 1, seed=4, labels=torch.tensor([2]), known=known, known_rows=3, known_columns=5)

    async def main():
        engine = Engine(model, lanes=2)
        await engine.start()
        try:
            request = GenerationRequest(seed=4, labels=[2], known=known.numpy(), known_rows=3, known_columns=5)
            return await engine.generate(request), engine.stats()
        finally:
            await engine.stop()

    result, stats = asyncio.run(main())
    assert np.array_equal(result.images, alone.images.numpy())
    assert np.array_equal(result.log_prob, alone.log_prob.numpy())
    assert stats.rows_wavefront == SIZE - 4, "the row with kept pixels one lane draws, the rest the wavefront"


def test_a_request_with_a_deadline_decodes_row_by_row():
    """Each decode step checks a request's deadline; a wavefront would run past it."""
    model = gated(1, 4)

    async def main():
        engine = Engine(model, lanes=2)
        await engine.start()
        try:
            deadline = time.monotonic() + 60
            result = await engine.generate(GenerationRequest(seed=5, labels=[1], deadline=deadline))
            return result, engine.stats()
        finally:
            await engine.stop()

    result, stats = asyncio.run(main())
    assert np.array_equal(result.images, sample_cached(model, 1, seed=5, labels=torch.tensor([1])).images.numpy())
    assert stats.rows_decoded == SIZE and stats.rows_wavefront == 0


def test_a_request_arriving_stops_the_wavefront_and_every_image_stays_that_of_one_lane():
    """A lone request starts by wavefront; a request of 2 images arrives (one shard per lane): the wavefront
    stops at its next row, the first request goes on row by row (its streams put back where one lane's
    would be), and both requests' images are those of one lane."""
    tall = tiny_model("gated", size=40, layers=4, seed=4, hidden_channels=192, dtype=torch.float32)
    first_alone = sample_cached(tall, 1, seed=1)
    pair_alone = sample_cached(tall, 2, seed=2)

    async def main():
        engine = Engine(tall, lanes=2)
        await engine.start()
        try:
            first = engine.submit(GenerationRequest(seed=1), rows=False)
            deadline = asyncio.get_running_loop().time() + 10
            while engine.stats().wavefront_threads != 2:  # its wavefront is under way
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.001)
            pair = [event async for event in engine.submit(GenerationRequest(n=2, seed=2), rows=True)][-1]
            return await first.result(), pair, engine.stats()
        finally:
            await engine.stop()

    first, pair, stats = asyncio.run(main())
    assert np.array_equal(first.images, first_alone.images.numpy())
    assert np.array_equal(first.log_prob, first_alone.log_prob.numpy())
    assert np.array_equal(pair.images, pair_alone.images.numpy())
    # It had started (wavefront_threads was 2), and stopped when the pair arrived (maybe before its first row;
    # alone in its lane again, it may go on in one call).
    assert stats.wavefront_stopped >= 1


@pytest.mark.parametrize("lanes", [1, 2])  # one lane: its rows in one call on the lane's own thread
def test_a_cancelled_request_stops_its_wavefront_and_a_streamed_one_is_drawn_by_wavefront(lanes):
    tall = tiny_model("gated", size=24, layers=4, seed=4, hidden_channels=96, dtype=torch.float32)
    alone = sample_cached(tall, 1, seed=2)

    async def main():
        engine = Engine(tall, lanes=lanes)
        await engine.start()
        try:
            stream = engine.submit(GenerationRequest(seed=1), rows=False)
            deadline = asyncio.get_running_loop().time() + 10
            while engine.stats().wavefront_threads != lanes:  # its wavefront is under way
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.001)
            await stream.cancel()
            while engine.stats().active_images:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.001)
            cancelled = engine.stats()
            streamed = [event async for event in engine.submit(GenerationRequest(seed=2), rows=True)]
            return cancelled, streamed, engine.stats()
        finally:
            await engine.stop()

    cancelled, streamed, after = asyncio.run(main())
    assert cancelled.requests_cancelled == 1 and cancelled.requests_completed == 0
    assert cancelled.wavefront_threads == 0
    assert cancelled.rows_wavefront < 24, "a cancel stops the wavefront at its next row"
    assert cancelled.wavefront_stopped == 1
    *rows, result = streamed
    assert [event.row for event in rows] == list(range(24)), "a row event per row, in order, then the result"
    # Its first row row by row (it reaches the client while a core is free), the rest by wavefront.
    assert after.rows_wavefront == cancelled.rows_wavefront + 23, "a lone streamed request is drawn by wavefront"
    assert after.rows_decoded == cancelled.rows_decoded + 24 and after.wavefront_stopped == 1
    assert result.decode_threads == lanes
    assert np.array_equal(result.images, alone.images.numpy()) and np.array_equal(result.log_prob, alone.log_prob)
    for event in rows:
        assert np.array_equal(event.pixels, alone.images.numpy()[:, :, event.row]), f"row {event.row}"


@pytest.mark.parametrize("rows", [False, True])
def test_stopping_the_engine_stops_a_wavefront_in_flight(rows):
    """A shutdown does not wait for a lone image's remaining rows (a big image's take longer than the drain):
    the wavefront stops after its rows in flight and the request ends with EngineStoppedError."""
    tall = tiny_model("gated", size=48, layers=4, seed=4, hidden_channels=192, dtype=torch.float32)

    async def main():
        engine = Engine(tall, lanes=2)
        await engine.start()
        stream = engine.submit(GenerationRequest(seed=1), rows=rows)
        deadline = asyncio.get_running_loop().time() + 10
        while engine.stats().wavefront_threads != 2:  # its wavefront is under way
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.001)
        await engine.stop()
        with pytest.raises(EngineStoppedError, match="the server is shutting down"):
            async for _ in stream:
                pass
        return engine.stats()

    stats = asyncio.run(main())
    assert stats.rows_wavefront < 48 - 4 and stats.wavefront_stopped == 1, stats


def test_a_streamed_request_ends_after_the_engine_has_counted_it():
    """Whoever sees a streamed request end (its result, or its cancel taking effect) sees the wavefront's
    bookkeeping final: its threads back to 0, every row it drew counted."""
    model = gated(1, 0)

    async def main():
        engine = Engine(model, lanes=2)
        await engine.start()
        seen = []
        try:
            for seed in range(10):
                before = engine.stats().rows_wavefront
                events = [event async for event in engine.submit(GenerationRequest(seed=seed), rows=True)]
                stats = engine.stats()
                seen.append((len(events), stats.wavefront_threads, stats.rows_wavefront - before))
        finally:
            await engine.stop()
        return seen

    assert asyncio.run(main()) == [(SIZE + 1, 0, SIZE - 1)] * 10  # the first row row by row, the rest by wavefront


def test_closing_the_rows_early_stops_the_call():
    """A consumer that stops taking rows (an error while handing one on) does not wait for the whole image."""
    tall = tiny_model("gated", size=48, layers=4, seed=4, hidden_channels=192, dtype=torch.float32)
    sampler = CachedSampler(tall)
    decoder = Wavefront.for_row_loop(sampler.row_loop)
    ones = torch.ones((8, 1), dtype=torch.float64)

    def rows():
        state = sampler.prefill(prepare_canvas(tall.config, 8, None, 0, torch.device("cpu")), None, 0)
        return decoder.decode_rows(state, uniforms_ahead(image_streams(3, 8), 48, 1, 48), ones, 2)

    started = time.perf_counter()
    assert len(list(rows())) == 48
    whole = time.perf_counter() - started
    taken = rows()
    next(taken)
    started = time.perf_counter()
    taken.close()
    closing = time.perf_counter() - started
    assert closing < whole / 4, (closing, whole)


def decode_rows(sampler: CachedSampler, n, seed, labels, lanes: int, stop=None, after_first=None):
    """Wavefront.decode_rows of a sample of n images; `after_first()` runs once the first row is taken."""
    config = sampler.config
    state = sampler.prefill(prepare_canvas(config, n, None, 0, torch.device("cpu")), labels, 0)
    uniforms = uniforms_ahead(image_streams(seed, n), config.height, config.image_channels, config.width)
    decoder = Wavefront.for_row_loop(sampler.row_loop)
    rows = []
    for values, log_p in decoder.decode_rows(state, uniforms, torch.ones((n, 1), dtype=torch.float64), lanes, stop):
        rows.append((values.clone(), log_p.clone()))
        if len(rows) == 1 and after_first is not None:
            after_first()
    return state, rows


@pytest.mark.parametrize("arch", ["gated", "pixelcnn"])
@pytest.mark.parametrize("channels,classes", [(1, 0), (3, 4)])
def test_rows_handed_on_as_drawn_are_complete_and_those_of_one_lane(arch, channels, classes):
    """decode_rows hands each row on as soon as every thread is past it: each row, when taken, already has
    the values and log p of one lane's row (a row counted complete too soon would show zeros or a
    missing last colour), in order, every row once."""
    model = gated(channels, classes, seed=3, arch=arch)
    sampler = CachedSampler(model)
    labels = torch.arange(2) % classes if classes else None
    expected, expected_log_p = one_lane(sampler, 2, 6, labels, None, 0, 1.0)
    for lanes in (1, 2, 3):
        _, rows = decode_rows(sampler, 2, 6, labels, lanes)
        assert len(rows) == SIZE, f"lanes={lanes}"
        for k, (values, log_p) in enumerate(rows):
            assert torch.equal(values, expected[k]), f"lanes={lanes} row {k}"
            assert torch.equal(log_p, expected_log_p[k]), f"lanes={lanes} row {k}"


@pytest.mark.parametrize("lanes", [1, 2])
def test_rows_handed_on_as_drawn_come_while_the_call_runs(lanes):
    """The first row is handed on while the later ones are still being drawn: stopped then (what a
    submit does), the call stops far short of the end, and the caches it leaves decode on row by row
    to one lane's image. (Eight images of 40 rows take ~0.1 s or more: the call cannot be over before the
    first row is taken.)"""
    tall = tiny_model("gated", size=40, layers=4, seed=4, hidden_channels=96, dtype=torch.float32)
    sampler = CachedSampler(tall)
    expected, _ = one_lane(sampler, 8, 3, None, None, 0, 1.0)
    stop = ctypes.c_int32(0)

    def set_stop() -> None:
        stop.value = 1

    started = time.perf_counter()
    state, rows = decode_rows(sampler, 8, 3, None, lanes, stop, after_first=set_stop)
    # The rows complete when the first was taken and those in flight (how many depends on when this thread
    # woke), far fewer than all 40.
    assert 1 <= len(rows) < 20, f"{len(rows)} rows in {time.perf_counter() - started:.3f} s"
    assert torch.equal(torch.stack([values for values, _ in rows]), expected[: len(rows)])
    streams = image_streams(3, 8)
    uniforms_ahead(streams, len(rows), 1, 40)  # past the rows drawn
    ones = torch.ones((8, 1), dtype=torch.float64)
    rest = [sampler.decode_row(state, row_uniforms(streams, 1, 40), ones)[0] for _ in range(40 - len(rows))]
    assert torch.equal(torch.stack(rest), expected[len(rows) :])


def test_a_failed_call_ends_the_rows_handed_on_with_its_error(monkeypatch):
    """The kernel's call runs on a thread of its own: its failure reaches the caller (never a wait for rows
    that will not come), and in the engine fails that request with a clear error, not the lane."""
    model = gated(1, 0)
    sampler = CachedSampler(model)

    def out_of_memory(self, rows_done=None):
        raise MemoryError("wavefront decoding could not allocate its buffers")

    monkeypatch.setattr(wavefront_module._KernelCall, "run", out_of_memory)
    with pytest.raises(MemoryError, match="could not allocate"):
        decode_rows(sampler, 1, 0, None, 2)

    async def main():
        engine = Engine(model, lanes=2)
        await engine.start()
        try:
            with pytest.raises(GenerationError, match=r"generation failed \(MemoryError: wavefront decoding could"):
                async for _ in engine.submit(GenerationRequest(seed=1), rows=True):
                    pass
            monkeypatch.undo()
            return await asyncio.wait_for(engine.generate(GenerationRequest(seed=1)), 10)
        finally:
            await engine.stop()

    after = asyncio.run(main())
    assert np.array_equal(after.images, sample_cached(model, 1, seed=1).images.numpy()), "the lane serves on"


def test_the_engine_can_measure_at_start_whether_the_wavefront_pays(caplog):
    """What the server asks for (wavefront=None): the choice is logged, and the image is the same either way."""
    model = gated(1, 0)
    expected = sample_cached(model, 1, seed=3)

    async def main():
        engine = Engine(model, lanes=2, wavefront=None)
        with caplog.at_level(logging.INFO, logger="app.engine.lanes"):
            await engine.start()
        try:
            return engine.lone_request_threads == 2, await engine.generate(GenerationRequest(seed=3))
        finally:
            await engine.stop()

    on, result = asyncio.run(main())
    assert f"wavefront decoding {'on' if on else 'off'}: one image in" in caplog.text
    assert "on one thread, the rest on the other" in caplog.text or "(by rows)" in caplog.text, "the split it chose"
    assert np.array_equal(result.images, expected.images.numpy()), "the same image whatever it picked"
    assert Engine(model, lanes=2, wavefront=False).lone_request_threads == 0
    assert Engine(model, lanes=2).lone_request_threads == 2, "wavefront=True: no measurement"
    assert Engine(model, lanes=1).lone_request_threads == 1, "one lane: nothing to measure"


def test_a_lone_request_beside_a_busy_lane_is_drawn_in_one_call_on_its_own_lane():
    tall = tiny_model("gated", size=24, layers=4, seed=4, hidden_channels=192, dtype=torch.float32)
    expected = sample_cached(tall, 1, seed=7)

    async def main():
        engine = Engine(tall, lanes=2)
        await engine.start()
        try:
            # Row by row on one lane (a deadline is checked at each row; far enough never to pass).
            streamed = engine.submit(GenerationRequest(n=1, seed=3, deadline=time.monotonic() + 600), rows=True)
            rows = streamed.__aiter__()
            await rows.__anext__()  # its first row is out: that lane is busy
            lone = await engine.generate(GenerationRequest(seed=7))
            after_lone = engine.stats()
            async for _ in rows:
                pass
            return lone, after_lone
        finally:
            await engine.stop()

    lone, stats = asyncio.run(main())
    assert lone.decode_threads == 1, "the other lane is busy: one thread"
    assert stats.rows_wavefront == 24, "its rows in one call"
    assert np.array_equal(lone.images, expected.images.numpy())
    assert np.array_equal(lone.log_prob, expected.log_prob.numpy())


def test_where_the_wavefront_measures_slower_a_lone_request_is_still_drawn_in_one_call(monkeypatch, caplog):
    model = gated(1, 0)
    expected = sample_cached(model, 1, seed=2)
    monkeypatch.setattr(Wavefront, "tune", lambda self, sampler, lanes, rounds=5, baseline=None: (1.0, 0.5))

    async def main():
        engine = Engine(model, lanes=2, wavefront=None)
        with caplog.at_level(logging.INFO, logger="app.engine.lanes"):
            await engine.start()
        try:
            return engine.lone_request_threads, await engine.generate(GenerationRequest(seed=2)), engine.stats()
        finally:
            await engine.stop()

    threads, result, stats = asyncio.run(main())
    assert "wavefront decoding off" in caplog.text
    assert threads == 1 and result.decode_threads == 1
    assert stats.rows_wavefront == SIZE, "its rows in one call on its lane's thread"
    assert np.array_equal(result.images, expected.images.numpy())


def test_engines_running_the_c_kernel_have_a_wavefront_of_up_to_as_many_threads_as_lanes():
    assert Engine(gated(1, 0), lanes=1).wavefront is not None, "one lane: a lone request's rows in one call"
    assert Engine(gated(1, 0), lanes=1, wavefront=False).wavefront is None
    assert Engine(tiny_model("gated"), lanes=2).wavefront is None, "float64 runs the torch row loop"
    assert Engine(gated(1, 0), lanes=2).wavefront.useful_lanes == 2  # 14 columns, rows 4 + 4 apart
    assert Engine(gated(1, 0, arch="pixelcnn"), lanes=2).wavefront.useful_lanes == 5  # rows 2 + 1 apart


def test_a_split_the_model_does_not_have_is_refused():
    sampler = CachedSampler(gated(1, 0))
    decoder = Wavefront.for_row_loop(sampler.row_loop)
    assert 1 <= decoder.split <= sampler.config.layers, "two threads of a gated model split by role by default"
    state = sampler.prefill(prepare_canvas(sampler.config, 1, None, 0, torch.device("cpu")), None, 0)
    decoder.split = sampler.config.layers + 1
    with pytest.raises(ValueError, match=r"split must be 0 \(by rows\) to 3 \(the model's vertical layers\), not 4"):
        decoder.decode(
            state, uniforms_ahead(image_streams(0, 1), 2, 1, SIZE), torch.ones((1, 1), dtype=torch.float64), 2
        )


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
def test_the_calling_thread_gets_its_cpus_back_after_a_wavefront():
    """The wavefront pins its threads to a CPU each while it runs (when there are enough CPUs); the calling
    thread, a decode lane, must be free to run anywhere again afterwards."""
    model = gated(1, 0)
    sampler = CachedSampler(model)
    before = os.sched_getaffinity(0)
    for lanes in (2, 3):
        images = sample_wavefront(sampler, 1, seed=1, lanes=lanes).images
        assert os.sched_getaffinity(0) == before, f"lanes={lanes}"
        assert torch.equal(images, sample_cached(model, 1, seed=1, sampler=sampler).images)
