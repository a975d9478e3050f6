"""POST /sample and POST /complete over HTTP: JSON, PNG and SSE answers, reproducibility from the seed,
labels by name, completion keeping known rows, concurrency, overload and client disconnects."""

from __future__ import annotations

import asyncio
import base64
import functools
import json

import anyio
import pytest
import torch

from app.engine import Engine, SampleResult
from app.imaging import png_bytes
from app.model import sample_naive, save
from tests.helpers import pixels, png_tensor, sse_events, tiny_model, torch_threads, without_request_id

pytestmark = pytest.mark.anyio


def naive(model, n, seed, **kwargs):
    """The reference sampler with the seed protocol the server promises (1 thread, like the server)."""
    with torch_threads(1):
        return sample_naive(model, n, seed=seed, **kwargs)


def images_of(body: dict) -> torch.Tensor:
    return torch.stack([png_tensor(image["png"]) for image in body["images"]])


def pattern(channels: int = 1, size: int = 8) -> torch.Tensor:
    """A deterministic uint8 image (C, H, W) to complete."""
    values = torch.arange(channels * size * size, dtype=torch.long).reshape(channels, size, size)
    return (values * 37 % 256).to(torch.uint8)


# /sample


async def test_sample_json(serve, models):
    async with serve() as (_, client):
        response = await client.post("/sample", json={"n": 3, "seed": 11, "temperature": 0.9})
        assert response.status_code == 200
        body = response.json()
    assert body["model"] == "gray" and body["seed"] == 11 and body["shape"] == [1, 8, 8] and body["rows"] == 8
    assert body["temperature"] == 0.9 and body["elapsed_s"] >= 0 and "known_rows" not in body
    assert len(body["images"]) == 3 and len(body["log_prob"]) == 3 and len(body["bits_per_dim"]) == 3
    expected = naive(models["gray"], 3, 11, temperature=0.9)
    assert torch.equal(images_of(body), expected.images)
    assert body["log_prob"] == pytest.approx(expected.log_prob.tolist(), rel=1e-6)
    for image, lp, bpd in zip(body["images"], body["log_prob"], body["bits_per_dim"]):
        assert image["label"] is None and image["label_name"] is None and image["log_prob"] == lp
        assert bpd == pytest.approx(-lp / (64 * 0.6931471805599453))


async def test_missing_seed_is_drawn_returned_and_replays(serve):
    async with serve() as (_, client):
        first = (await client.post("/sample", json={"n": 2})).json()
        assert isinstance(first["seed"], int) and 0 <= first["seed"] < 2**31
        again = (await client.post("/sample", json={"n": 2, "seed": first["seed"]})).json()
    assert pixels(again) == pixels(first)


async def test_labels_by_name_case_insensitive_index_or_list(serve, models):
    async with serve() as (_, client):

        async def labels(label, n=1):
            response = await client.post("/sample", json={"model": "cond", "n": n, "seed": 5, "label": label})
            assert response.status_code == 200, response.text
            return [(i["label"], i["label_name"]) for i in response.json()["images"]]

        assert await labels("sneaker") == [(1, "Sneaker")]
        assert await labels("ANKLE BOOT") == [(2, "Ankle boot")]
        assert await labels(" t-shirt/top ") == [(0, "T-shirt/top")]
        assert await labels(2, n=2) == [(2, "Ankle boot")] * 2
        assert await labels("1") == [(1, "Sneaker")]
        assert await labels(["sneaker", 0, "Ankle Boot"], n=3) == [
            (1, "Sneaker"),
            (0, "T-shirt/top"),
            (2, "Ankle boot"),
        ]
        drawn = (await client.post("/sample", json={"model": "cond", "n": 4, "seed": 5})).json()
    expected = naive(models["cond"], 4, 5)
    assert [i["label"] for i in drawn["images"]] == expected.labels.tolist()
    assert torch.equal(images_of(drawn), expected.images)


async def test_sample_with_labels_matches_reference(serve, models):
    async with serve() as (_, client):
        body = (await client.post("/sample", json={"model": "cond", "n": 2, "seed": 3, "label": [2, 0]})).json()
    expected = naive(models["cond"], 2, 3, labels=torch.tensor([2, 0]))
    assert torch.equal(images_of(body), expected.images)


async def test_sample_png(serve):
    async with serve() as (_, client):
        one = await client.post("/sample", json={"seed": 4}, headers={"Accept": "image/png"})
        assert one.status_code == 200 and one.headers["content-type"] == "image/png"
        assert one.headers["x-seed"] == "4" and one.headers["x-model"] == "gray" and "x-labels" not in one.headers
        as_json = (await client.post("/sample", json={"seed": 4})).json()
        assert torch.equal(png_tensor(one.content), png_tensor(as_json["images"][0]["png"]))

        grid = await client.post(
            "/sample", json={"model": "cond", "n": 4, "seed": 4, "label": 1}, headers={"Accept": "image/png"}
        )
        assert grid.headers["x-labels"] == "1,1,1,1"
        assert png_tensor(grid.content).shape == (1, 2 + 10, 2 + 4 * 10)  # one row of 4, 2 px borders


async def test_sample_sse_rows_then_done(serve):
    async with serve() as (_, client):
        plain = (await client.post("/sample", json={"n": 2, "seed": 21})).json()
        for request in (
            {"json": {"n": 2, "seed": 21, "stream": True}},
            {"json": {"n": 2, "seed": 21}, "headers": {"Accept": "text/event-stream"}},
        ):
            response = await client.post("/sample", **request)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-accel-buffering"] == "no" and response.headers["cache-control"] == "no-cache"
            assert response.headers["x-seed"] == "21"
            events = sse_events(response.text)
            names = [name for name, _ in events]
            assert names == ["row"] * 8 + ["done"]
            assert [data["row"] for _, data in events[:-1]] == list(range(8))
            done = events[-1][1]
            assert pixels(done) == pixels(plain) and done["log_prob"] == pytest.approx(plain["log_prob"], rel=1e-6)
            final = images_of(done)
            for _, data in events[:-1]:  # every streamed row is the final image's row
                assert torch.equal(torch.tensor(data["pixels"], dtype=torch.uint8), final[:, :, data["row"]])


async def test_concurrent_requests_equal_sequential(serve):
    requests = [
        {"n": 1, "seed": 1},
        {"n": 3, "seed": 2},
        {"model": "cond", "n": 2, "seed": 3, "label": "sneaker"},
        {"model": "cond", "n": 2, "seed": 4},
        {"model": "rgb", "n": 2, "seed": 5},
        {"n": 2, "seed": 6, "temperature": 0.7},
    ]
    async with serve() as (_, client):
        sequential = [(await client.post("/sample", json=r)).json() for r in requests]
        responses = await asyncio.gather(*(client.post("/sample", json=r) for r in requests))
    assert all(r.status_code == 200 for r in responses)
    for response, alone in zip(responses, sequential):
        together = response.json()
        assert pixels(together) == pixels(alone)  # batch invariance: the same bytes, in float32
        assert together["log_prob"] == alone["log_prob"]


async def test_full_queue_is_503_with_retry_after(serve):
    async with serve(max_queue=0) as (_, client):
        for request in ({"json": {"seed": 1}}, {"json": {"seed": 1, "stream": True}}):
            response = await client.post("/sample", **request)
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            error = response.json()["error"]
            assert error["type"] == "overloaded" and "full queue" in error["message"] and "retry" in error["message"]
        assert 'pixelcnn_failures_total{reason="overloaded"} 2.0' in (await client.get("/metrics")).text
        assert (await client.get("/health")).status_code == 200


async def test_engine_value_error_is_a_400(serve, server_store):
    async with serve(max_batch_images=2, max_images_per_request=8) as (_, client):
        response = await client.post("/sample", json={"n": 3})
    assert response.status_code == 400 and "between 1 and 2" in response.json()["error"]["message"]


# /complete


async def test_complete_multipart_keeps_known_rows(serve, models):
    known = pattern()
    async with serve() as (_, client):
        response = await client.post(
            "/complete",
            files={"image": ("top.png", png_bytes(known), "image/png")},
            data={"rows": "3", "n": "2", "seed": "8", "temperature": "0.8"},
        )
        assert response.status_code == 200, response.text
        body = response.json()
    assert body["known_rows"] == 3 and body["seed"] == 8 and body["rows"] == 8
    images = images_of(body)
    assert torch.equal(images[:, :, :3], known[None, :, :3].expand(2, -1, -1, -1))
    expected = naive(models["gray"], 2, 8, temperature=0.8, known=known[None], known_rows=3)
    assert torch.equal(images, expected.images)
    generated_dims = 1 * (8 - 3) * 8
    assert body["bits_per_dim"][0] == pytest.approx(-body["log_prob"][0] / (generated_dims * 0.6931471805599453))


async def test_complete_curl_style_png_defaults_to_half(serve, models):
    """curl -F image=@top.png -H 'Accept: image/png' http://localhost:8000/complete -o done.png"""
    known = pattern()
    async with serve() as (_, client):
        response = await client.post(
            "/complete", files={"image": ("top.png", png_bytes(known), "image/png")}, headers={"Accept": "image/png"}
        )
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    done = png_tensor(response.content)
    assert torch.equal(done[:, :4], known[:, :4])  # rows default to H // 2
    seed = int(response.headers["x-seed"])
    assert torch.equal(done, naive(models["gray"], 1, seed, known=known[None], known_rows=4).images[0])


async def test_complete_json_base64_and_data_url(serve):
    known = pattern()
    encoded = base64.b64encode(png_bytes(known)).decode()
    async with serve() as (_, client):
        plain = (await client.post("/complete", json={"image": encoded, "rows": 5, "seed": 2})).json()
        data_url = (
            await client.post("/complete", json={"image": "data:image/png;base64," + encoded, "rows": 5, "seed": 2})
        ).json()
    assert pixels(plain) == pixels(data_url) and plain["known_rows"] == 5
    assert torch.equal(images_of(plain)[0, :, :5], known[:, :5])


async def test_complete_stream_emits_only_generated_rows(serve):
    known = pattern()
    async with serve() as (_, client):
        response = await client.post(
            "/complete",
            files={"image": ("a.png", png_bytes(known), "image/png")},
            data={"rows": "6", "seed": "1", "stream": "true"},
        )
    events = sse_events(response.text)
    assert [name for name, _ in events] == ["row", "row", "done"]
    assert [data["row"] for _, data in events[:2]] == [6, 7]
    assert events[-1][1]["known_rows"] == 6


async def test_complete_rgb_and_gray_upload_to_rgb_model(serve, models):
    rgb = pattern(3)
    async with serve() as (_, client):
        body = (
            await client.post(
                "/complete",
                data={"model": "rgb", "rows": "2", "seed": "3"},
                files={"image": ("c.png", png_bytes(rgb), "image/png")},
            )
        ).json()
        assert torch.equal(images_of(body)[0, :, :2], rgb[:, :2])
        gray = pattern(1)
        body = (
            await client.post(
                "/complete",
                data={"model": "rgb", "rows": "2", "seed": "3"},
                files={"image": ("g.png", png_bytes(gray), "image/png")},
            )
        ).json()
        assert torch.equal(images_of(body)[0, :, :2], gray[:, :2].expand(3, -1, -1))  # L repeated to RGB
    expected = naive(models["rgb"], 1, 3, known=gray.expand(3, -1, -1)[None], known_rows=2)
    assert torch.equal(images_of(body), expected.images)


async def test_complete_with_label_name(serve):
    async with serve() as (_, client):
        response = await client.post(
            "/complete",
            data={"model": "cond", "label": "Sneaker", "n": "2", "seed": "1"},
            files={"image": ("a.png", png_bytes(pattern()), "image/png")},
        )
    assert [i["label_name"] for i in response.json()["images"]] == ["Sneaker", "Sneaker"]


@pytest.mark.parametrize(
    "kwargs, status, fragments, field",
    [
        (
            {"files": {"image": ("s.png", png_bytes(pattern(1, 4)), "image/png")}},
            400,
            ["image: image is 4x4 (WxH), the model expects 8x8", "model 'gray'"],
            "image",
        ),
        ({"files": {"image": ("x.png", b"not an image", "image/png")}}, 400, ["could not read the image"], "image"),
        (
            {"files": {"image": ("x.png", png_bytes(pattern()), "image/png")}, "data": {"rows": "8"}},
            400,
            ["rows must be between 0 and 7", "got 8"],
            "rows",
        ),
        (
            {"files": {"image": ("x.png", png_bytes(pattern()), "image/png")}, "data": {"rows": "-1"}},
            400,
            ["rows: must be at least 0, got -1"],
            "rows",
        ),
        (
            {"files": {"image": ("x.png", png_bytes(pattern()), "image/png")}, "data": {"n": "99"}},
            400,
            ["n must be between 1 and 64"],
            "n",
        ),
        (
            {"files": {"image": ("x.png", png_bytes(pattern()), "image/png")}, "data": {"seed": "abc"}},
            400,
            ["seed:", "valid integer"],
            "seed",
        ),
        (
            {"files": {"image": ("x.png", png_bytes(pattern()), "image/png")}, "data": {"bogus": "1"}},
            400,
            ["bogus: unknown field"],
            "bogus",
        ),
        (
            {"files": {"image": ("x.png", png_bytes(pattern()), "image/png")}, "data": {"label": "sneaker"}},
            400,
            ["model 'gray' is unconditional"],
            "label",
        ),
        (
            {
                "files": [
                    ("image", ("a.png", png_bytes(pattern()), "image/png")),
                    ("image", ("b.png", png_bytes(pattern()), "image/png")),
                ]
            },
            400,
            ["/complete takes one image, got 2"],
            "image",
        ),
        ({"data": {"image": "just text", "rows": "2"}}, 400, ["image must be an uploaded file"], "image"),
        (
            {"data": {"rows": "2"}, "files": {"other": ("a.png", b"x", "image/png")}},
            400,
            ["other must be a plain form field"],
            "other",
        ),
        ({"json": {"rows": 2}}, 400, ["no image given"], "image"),
        ({"json": {"image": "%%%"}}, 400, ["image is not valid base64"], "image"),
        ({"json": {"image": 5}}, 400, ["image must be a base64 string"], "image"),
    ],
)
async def test_complete_input_errors(serve, kwargs, status, fragments, field):
    async with serve() as (_, client):
        response = await client.post("/complete", **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and error.get("field") == field
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"])


# Disconnects: the engine request must leave the batch.


@pytest.fixture(scope="module")
def tall_store(tmp_path_factory):
    """One 24x24 model: enough rows that a disconnect after the first row lands mid-generation."""
    root = tmp_path_factory.mktemp("tall_store")
    save(tiny_model("gated", 1, size=24, layers=4, seed=4, hidden_channels=192).float(), root / "tall")
    return root


def spying_engine_factory(model, settings, wavefront=True):
    """The real engine, recording which requests the server cancelled."""
    engine = Engine(
        model, max_batch_images=settings.max_batch_images, max_queue=settings.max_queue, wavefront=wavefront
    )
    engine.cancelled = []
    submit = engine.submit

    def spy(request, **kwargs):
        stream = submit(request, **kwargs)
        cancel = stream.cancel

        async def recorded_cancel():
            engine.cancelled.append(request)
            await cancel()

        stream.cancel = recorded_cancel
        return stream

    engine.submit = spy
    return engine


async def call_then_disconnect(
    app, path: str, body: dict, *, after_first_row: bool, spec_version: str, hang_up_when=None
) -> list[bytes]:
    """Drive the ASGI app like a server whose client hangs up: right after the request, once the first
    row event has been sent (`after_first_row`), or once `hang_up_when()` is true (polled). Returns the
    body chunks sent."""
    payload = json.dumps(body).encode()
    gone = anyio.Event()
    if not after_first_row and hang_up_when is None:
        gone.set()

    async def hang_up_later():
        while not hang_up_when():
            await anyio.sleep(0.005)
        gone.set()

    delivered = False
    chunks: list[bytes] = []

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": payload, "more_body": False}
        if gone.is_set():  # like uvicorn: a closed connection answers at once
            return {"type": "http.disconnect"}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if b"event: row" in chunks[-1]:
                gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
        "headers": [
            (b"host", b"test"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ],
    }
    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            if hang_up_when is not None:
                group.start_soon(hang_up_later)
            await app(scope, receive, send)
    return chunks


async def wait_until_left(engine) -> dict:
    with anyio.fail_after(10):
        while True:
            stats = engine.stats()
            if stats.requests_cancelled >= 1 and stats.active_images == 0 and stats.queue_size == 0:
                return stats
            await anyio.sleep(0.01)


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])  # uvicorn's listener task, or per-row checks alone
async def test_stream_disconnect_cancels_the_engine_request(serve, tall_store, spec_version):
    async with serve(engine_factory=spying_engine_factory, model_store=tall_store, model="tall") as (app, client):
        engine = app.state.registry.models["tall"].engine
        chunks = await call_then_disconnect(
            app, "/sample", {"n": 2, "seed": 1, "stream": True}, after_first_row=True, spec_version=spec_version
        )
        text = b"".join(chunks).decode()
        assert "event: row" in text and "event: done" not in text
        assert len(engine.cancelled) == 1
        stats = await wait_until_left(engine)
        assert stats.requests_completed == 0
        assert 'pixelcnn_failures_total{reason="client_disconnected"} 1.0' in (await client.get("/metrics")).text
        # The server is unharmed.
        assert (await client.post("/sample", json={"seed": 2})).status_code == 200


async def test_non_streamed_disconnect_cancels_the_engine_request(serve, tall_store):
    async with serve(engine_factory=spying_engine_factory, model_store=tall_store, model="tall") as (app, _):
        engine = app.state.registry.models["tall"].engine
        await call_then_disconnect(app, "/sample", {"n": 2, "seed": 1}, after_first_row=False, spec_version="2.3")
        assert len(engine.cancelled) == 1
        await wait_until_left(engine)


async def test_non_streamed_disconnect_mid_generation_stops_at_the_next_row(serve, tall_store):
    # Row by row, so that the rows drawn show it is mid-image: a lone request's rows drawn in one call are handed
    # on together (test_wavefront checks that a cancel stops such a call at its next row).
    row_by_row = functools.partial(spying_engine_factory, wavefront=False)
    async with serve(engine_factory=row_by_row, model_store=tall_store, model="tall") as (app, client):
        engine = app.state.registry.models["tall"].engine
        chunks = await call_then_disconnect(
            app,
            "/sample",
            {"n": 2, "seed": 1},
            after_first_row=False,
            spec_version="2.4",
            hang_up_when=lambda: engine.stats().rows_decoded >= 2,
        )
        assert len(engine.cancelled) == 1
        stats = await wait_until_left(engine)
        assert stats.requests_completed == 0
        assert 2 <= stats.rows_decoded < 24, "the request must stop mid-image"
        assert json.loads(b"".join(chunks))["error"]["type"] == "client_disconnected"  # logged as a 499
        assert 'pixelcnn_failures_total{reason="client_disconnected"} 1.0' in (await client.get("/metrics")).text


async def test_finished_requests_are_not_cancelled(serve):
    async with serve(engine_factory=spying_engine_factory) as (app, client):
        await client.post("/sample", json={"seed": 1})
        await client.post("/sample", json={"seed": 1, "stream": True})
        assert app.state.registry.models["gray"].engine.cancelled == []


# Engine failures: never a hang, and an error event once the stream has started.


class FailingStream:
    """Yields the first real row (if rows were asked for), then raises `error` in place of anything else;
    records cancel() calls."""

    def __init__(self, stream, error):
        self.stream, self.error, self.cancelled = stream, error, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.error is None:
            raise self.failure
        event = await self.stream.__anext__()
        if isinstance(event, SampleResult):  # a non-streamed request: fail instead of finishing
            raise self.error
        self.failure, self.error = self.error, None
        return event

    @property
    def time_to_first_row_s(self):
        return self.stream.time_to_first_row_s

    async def cancel(self):
        self.cancelled = True
        await self.stream.cancel()


def failing_submit(engine, error, streams):
    submit = engine.submit

    def wrapped(request, **kwargs):
        streams.append(FailingStream(submit(request, **kwargs), error))
        return streams[-1]

    return wrapped


async def test_engine_failure_mid_stream_is_an_error_event(serve):
    streams = []
    async with serve() as (app, client):
        engine = app.state.registry.models["gray"].engine
        engine.submit = failing_submit(engine, RuntimeError("boom"), streams)
        response = await client.post("/sample", json={"seed": 1, "stream": True})
        assert response.status_code == 200
        events = sse_events(response.text)
        assert [name for name, _ in events] == ["row", "error"]
        assert without_request_id(events[-1][1], response) == {
            "error": {"type": "internal", "message": "generation failed (RuntimeError: boom)"}
        }
        assert streams[0].cancelled  # the engine request was released
        assert 'pixelcnn_failures_total{reason="stream_error"} 1.0' in (await client.get("/metrics")).text


async def test_engine_stopped_is_503_and_a_bug_is_a_500(serve):
    from app.engine import EngineStoppedError

    streams = []
    async with serve() as (app, client):
        engine = app.state.registry.models["gray"].engine
        real_submit = engine.submit
        engine.submit = failing_submit(engine, EngineStoppedError("shutting down"), streams)
        response = await client.post("/sample", json={"seed": 1})
        assert response.status_code == 503 and response.json()["error"]["type"] == "not_ready"
        engine.submit = real_submit
        engine.submit = failing_submit(engine, RuntimeError("bug"), streams)
        transport_raises = False
        try:
            response = await client.post("/sample", json={"seed": 1})
        except RuntimeError:  # httpx's ASGITransport re-raises app exceptions after the 500 went out
            transport_raises = True
        assert transport_raises or response.status_code == 500
        assert all(stream.cancelled for stream in streams)


async def test_openapi_documents_both_upload_forms(serve):
    async with serve() as (_, client):
        spec = (await client.get("/openapi.json")).json()
    assert {"/health", "/ready", "/models", "/sample", "/complete", "/likelihood", "/metrics"} <= set(spec["paths"])
    for path in ("/complete", "/likelihood"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert set(content) == {"multipart/form-data", "application/json"}
        assert content["multipart/form-data"]["schema"]["properties"]["image"]


async def test_a_failing_prefill_is_a_500_engine_error_in_json_and_an_error_event_in_a_stream(serve):
    """A real fault inside the engine (the prefill raises, as CUDA out of memory would): the client gets
    the error in the one error format, never a hang, and the server goes on serving."""
    from tests.helpers import failing_once

    async with serve() as (app, client):
        engine = app.state.registry.models["gray"].engine
        prefill = engine.sampler.prefill
        engine.sampler.prefill = failing_once(prefill, error=RuntimeError("CUDA out of memory"))
        response = await client.post("/sample", json={"seed": 1})
        assert response.status_code == 500
        assert without_request_id(response.json(), response) == {
            "error": {"type": "engine_error", "message": "prefill failed (RuntimeError: CUDA out of memory)"}
        }
        engine.sampler.prefill = failing_once(prefill, error=RuntimeError("CUDA out of memory"))
        streamed = await client.post("/sample", json={"seed": 1, "stream": True})
        assert streamed.status_code == 200
        [(name, body)] = sse_events(streamed.text)
        assert name == "error" and without_request_id(body, streamed) == {
            "error": {"type": "engine_error", "message": "prefill failed (RuntimeError: CUDA out of memory)"}
        }
        assert (await client.post("/sample", json={"seed": 1})).status_code == 200
        stats = engine.stats()
        assert stats.queue_size == 0 and stats.active_images == 0


async def test_a_failing_likelihood_pass_is_a_500_engine_error(serve):
    from tests.helpers import failing_once

    async with serve() as (app, client):
        scorer = app.state.registry.models["gray"].engine.scorer
        scorer._forward = failing_once(scorer._forward, error=MemoryError("out of memory"))
        files = {"image": ("x.png", png_bytes(pattern()), "image/png")}
        response = await client.post("/likelihood", files=files)
        assert response.status_code == 500
        assert without_request_id(response.json(), response) == {
            "error": {"type": "engine_error", "message": "the likelihood pass failed (MemoryError: out of memory)"}
        }
        assert (await client.post("/likelihood", files=files)).status_code == 200


@pytest.fixture(scope="module")
def slow_store(tmp_path_factory):
    """One 96x96 model: an image takes seconds, far longer than the time limits set below."""
    root = tmp_path_factory.mktemp("slow_store")
    save(tiny_model("gated", 1, size=96, layers=4, seed=5, hidden_channels=192).float(), root / "slow")
    return root


async def test_a_request_past_the_time_limit_is_stopped_with_a_clear_error(serve, slow_store):
    async with serve(model_store=slow_store, model="slow", request_timeout_s=0.5) as (app, client):
        engine = app.state.registry.models["slow"].engine
        plain = await client.post("/sample", json={"n": 2, "seed": 1})
        assert plain.status_code == 504 and plain.json()["error"]["type"] == "timeout"
        assert (
            "longer than the server's limit of 0.5 s (PIXELCNN_REQUEST_TIMEOUT_S)" in plain.json()["error"]["message"]
        )
        streamed = await client.post("/sample", json={"n": 1, "seed": 2, "stream": True})
        events = sse_events(streamed.text)
        assert events[0][0] == "row" and events[-1][0] == "error"
        assert events[-1][1]["error"]["type"] == "timeout"
        for _ in range(200):  # the engine let go of both
            if engine.stats().active_images == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().active_images == 0 and engine.stats().requests_cancelled == 2
        assert 'pixelcnn_failures_total{reason="timeout"} 2.0' in (await client.get("/metrics")).text


async def test_a_stream_whose_client_stops_reading_is_cut_and_frees_everything(serve, slow_store, monkeypatch):
    """The client sends its request, then never reads: the body's first `send` blocks forever. Past the
    time limit (plus the grace for the error event) the response is cut, the engine lets go of the
    request, and the failure is counted as `stream_cut`."""
    import app.server.routes.generation as generation

    monkeypatch.setattr(generation, "CUT_GRACE_S", 0.2)
    async with serve(model_store=slow_store, model="slow", request_timeout_s=0.3) as (app, client):
        body = json.dumps({"n": 1, "seed": 1, "stream": True}).encode()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/sample",
            "raw_path": b"/sample",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
        }
        sent_body = False

        async def receive():
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never hangs up

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                await asyncio.Event().wait()  # ... and never reads

        await asyncio.wait_for(app(scope, receive, send), timeout=10)
        engine = app.state.registry.models["slow"].engine
        assert engine.stats().active_images == 0 and engine.stats().queue_size == 0
        assert 'pixelcnn_failures_total{reason="stream_cut"} 1.0' in (await client.get("/metrics")).text


@pytest.mark.parametrize("body", [{"n": 1, "seed": 5}, {"n": 1, "seed": 5, "stream": True}])
async def test_a_finished_request_leaves_no_reference_cycle_behind(serve, body):
    """A request's objects are freed by reference counting when it ends. What only the cyclic collector
    frees piles up under load and goes in full passes that stall the event loop for everyone (a cancelled
    watcher task's exception once tied each run into a cycle: jobs.py)."""
    import gc

    from app.server.jobs import GenerationRun

    async with serve() as (_, client):
        gc.collect()
        gc.disable()
        try:
            for _ in range(3):
                assert (await client.post("/sample", json=body)).status_code == 200
            await asyncio.sleep(0.05)  # the runs' watcher tasks end
            gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable stays in gc.garbage
            gc.collect()
            in_cycles = [kind for kind in map(type, gc.garbage) if kind is GenerationRun]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert in_cycles == []


@pytest.mark.parametrize(
    ("path", "body", "accept"),
    [
        ("/sample", {"n": 1, "seed": 3}, "application/json"),
        ("/sample", {"n": 1, "seed": 3}, "image/png"),
        ("/v1/images/generations", {"prompt": "", "n": 1, "seed": 3}, "application/json"),
        ("/v2/models/gray/generate", {"n": 1, "seed": 3}, "application/json"),
    ],
)
async def test_a_generation_says_how_long_the_engine_took_in_server_timing(serve, path, body, accept):
    import re
    import time

    async with serve() as (_, client):
        started = time.perf_counter()
        response = await client.post(path, json=body, headers={"Accept": accept})
        wall_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 200, response.text
    timing = re.fullmatch(r'engine;dur=(\d+\.\d);desc="(1 thread|\d+ threads)"', response.headers["server-timing"])
    assert timing is not None, response.headers["server-timing"]
    assert 0 < float(timing.group(1)) <= wall_ms
