"""`scale`: every PNG a response carries (the PNG body of /sample and /complete, the base64 PNGs of their
JSON and of /likelihood's heat maps) enlarged by whole pixels; bounded, with a clear 400 outside."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from app.imaging import enlarge, png_bytes
from app.server.schemas import MAX_PNG_SCALE
from tests.helpers import png_tensor, sse_events, without_request_id

pytestmark = pytest.mark.anyio

PNG = {"Accept": "image/png"}


def pattern() -> np.ndarray:
    """A deterministic 1x8x8 uint8 image, every pixel different from its neighbours."""
    return (np.arange(64).reshape(1, 8, 8) * 37 % 256).astype(np.uint8)


def kron(image, k: int) -> np.ndarray:
    """The nearest-neighbour enlargement written independently of app.imaging.enlarge."""
    array = np.asarray(image)
    return np.stack([np.kron(channel, np.ones((k, k), dtype=array.dtype)) for channel in array])


def upload(image: np.ndarray) -> dict:
    return {"image": ("top.png", png_bytes(image), "image/png")}


def test_enlarge_is_the_kronecker_product():
    rgb = np.random.default_rng(0).integers(0, 256, size=(3, 5, 7), dtype=np.uint8)
    assert np.array_equal(enlarge(rgb, 3), kron(rgb, 3))
    assert enlarge(rgb, 3).shape == (3, 15, 21)
    assert np.array_equal(enlarge(rgb, 1), rgb)


@pytest.mark.parametrize("k", [2, 5, MAX_PNG_SCALE])
async def test_sample_png_of_scale_k_is_the_scale_1_png_enlarged(serve, k):
    async with serve() as (_, client):
        for n in (1, 3):  # the bare image, and a grid
            one = await client.post("/sample", json={"n": n, "seed": 8}, headers=PNG)
            big = await client.post("/sample", json={"n": n, "seed": 8, "scale": k}, headers=PNG)
            assert big.status_code == 200 and big.headers["content-type"] == "image/png"
            small = png_tensor(one.content).numpy()
            assert np.array_equal(png_tensor(big.content).numpy(), kron(small, k))
            assert big.headers["x-seed"] == one.headers["x-seed"] == "8"


async def test_complete_form_and_json_scale(serve):
    known = pattern()
    async with serve() as (_, client):
        one = await client.post("/complete", data={"rows": "3", "seed": "2"}, files=upload(known), headers=PNG)
        form = await client.post(
            "/complete", data={"rows": "3", "seed": "2", "scale": "4"}, files=upload(known), headers=PNG
        )
        encoded = base64.b64encode(png_bytes(known)).decode()
        as_json = await client.post("/complete", json={"image": encoded, "rows": 3, "seed": 2, "scale": 4}, headers=PNG)
    small = png_tensor(one.content).numpy()
    assert np.array_equal(small[:, :3], known[:, :3])
    assert np.array_equal(png_tensor(form.content).numpy(), kron(small, 4))
    assert as_json.content == form.content


async def test_json_bodies_carry_enlarged_pngs_and_streams_raw_rows(serve):
    async with serve() as (_, client):
        one = (await client.post("/sample", json={"n": 2, "seed": 3})).json()
        big = (await client.post("/sample", json={"n": 2, "seed": 3, "scale": 3})).json()
        streamed = await client.post("/sample", json={"n": 2, "seed": 3, "scale": 3, "stream": True})
    for small_image, big_image in zip(one["images"], big["images"]):
        assert np.array_equal(png_tensor(big_image["png"]).numpy(), kron(png_tensor(small_image["png"]), 3))
    assert big["log_prob"] == one["log_prob"]
    events = sse_events(streamed.text)
    rows = [data for event, data in events if event == "row"]
    assert np.asarray(rows[0]["pixels"]).shape == (2, 1, 8)  # rows stay pixel values at the model's size
    assert events[-1] == ("done", {**big, "elapsed_s": events[-1][1]["elapsed_s"]})


async def test_likelihood_heatmap_scale(serve):
    encoded = base64.b64encode(png_bytes(pattern())).decode()
    async with serve() as (_, client):
        one = (await client.post("/likelihood", json={"image": encoded, "per_pixel": True})).json()["results"][0]
        big = (
            await client.post("/likelihood", data={"per_pixel": "true", "scale": "6"}, files=upload(pattern()))
        ).json()["results"][0]
    assert big["nll_nats"] == pytest.approx(one["nll_nats"], rel=1e-6)
    assert np.array_equal(png_tensor(big["heatmap_png"]).numpy(), kron(png_tensor(one["heatmap_png"]), 6))


@pytest.mark.parametrize(
    "route,kwargs,message",
    [
        ("/sample", {"json": {"scale": 0}}, f"scale: must be between 1 and {MAX_PNG_SCALE}, got 0"),
        (
            "/sample",
            {"json": {"scale": MAX_PNG_SCALE + 1}},
            f"scale: must be between 1 and {MAX_PNG_SCALE}, got {MAX_PNG_SCALE + 1}",
        ),
        ("/sample", {"json": {"scale": "4"}}, "scale: must be an integer"),
        ("/sample", {"json": {"scale": 2.5}}, "scale:"),
        (
            "/complete",
            {"data": {"scale": "100"}, "files": upload(pattern())},
            f"scale: must be between 1 and {MAX_PNG_SCALE}, got 100",
        ),
        ("/complete", {"data": {"scale": "big"}, "files": upload(pattern())}, "scale:"),
        (
            "/likelihood",
            {"data": {"scale": "-2"}, "files": upload(pattern())},
            f"scale: must be between 1 and {MAX_PNG_SCALE}, got -2",
        ),
    ],
)
async def test_scale_out_of_range_is_a_400_naming_it(serve, route, kwargs, message):
    async with serve() as (_, client):
        response = await client.post(route, headers=PNG, **kwargs)
    assert response.status_code == 400
    error = without_request_id(response.json(), response)["error"]
    assert error["type"] == "invalid_request" and error["field"] == "scale"
    assert error["message"].startswith(message)
