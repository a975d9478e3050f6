"""The OpenAI Images API front end, driven by the official `openai` SDK against a real `pixelcnn serve`:
the same images as /sample and /complete for the same seed, streaming, edits with masks, and every bad
input a 4xx in OpenAI's error format with the server still healthy."""

from __future__ import annotations

import base64
import io
import math
import re
import shutil
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from app.imaging import png_bytes
from app.model import sample_naive, save
from tests.helpers import png_tensor, serving, tiny_model


@pytest.fixture(scope="module")
def server(server_store, tmp_path_factory):
    """(base URL, httpx client) of `pixelcnn serve` on the test store ('gray' default, 'cond' with classes
    T-shirt/top, Sneaker, Ankle boot, 'rgb') plus 'tall', a 24-row model slow enough to leave mid-image."""
    store = tmp_path_factory.mktemp("openai_store")
    for name in ("gray", "cond", "rgb"):
        shutil.copytree(server_store / name, store / name)
    save(tiny_model("gated", 1, size=24, layers=4, seed=4, hidden_channels=192).float(), store / "tall")
    with serving(store, {"PIXELCNN_MODEL": "gray"}) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield url, http


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture
def http(server):
    return server[1]


def decoded(b64: str) -> torch.Tensor:
    return png_tensor(base64.b64decode(b64))


def native_images(http: httpx.Client, path: str, **fields) -> list[torch.Tensor]:
    response = http.post(path, **fields)
    assert response.status_code == 200, response.text
    return [png_tensor(image["png"]) for image in response.json()["images"]]


def rgba(alpha: np.ndarray) -> bytes:
    """A mask file: black RGBA with this alpha (H, W)."""
    h, w = alpha.shape
    pixels = np.zeros((h, w, 4), dtype=np.uint8)
    pixels[..., 3] = alpha
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def pattern(size: int = 8) -> torch.Tensor:
    return (torch.arange(size * size).reshape(1, size, size) * 29 % 256).to(torch.uint8)


def assert_openai_error(error: openai.APIStatusError, status: int, param: str | None, *fragments: str) -> None:
    assert error.status_code == status
    body = error.body  # the SDK keeps the "error" object
    assert set(body) == {"message", "type", "param", "code"}, body
    assert body["type"] == "invalid_request_error" and body["param"] == param, body
    for fragment in fragments:
        assert fragment in body["message"], (fragment, body["message"])


def test_seeded_generation_is_pixel_identical_to_sample(client, http):
    result = client.images.generate(model="cond", prompt="sneaker", n=3, size="8x8", extra_body={"seed": 11})
    assert [image.b64_json is not None for image in result.data] == [True] * 3
    assert result.size == "8x8" and result.output_format == "png"
    expected = native_images(http, "/sample", json={"model": "cond", "label": "Sneaker", "n": 3, "seed": 11})
    assert all(torch.equal(decoded(got.b64_json), want) for got, want in zip(result.data, expected))
    # temperature rides as an extra field too, with /sample's meaning; "auto" size and an empty prompt
    cold = client.images.generate(
        model="cond", prompt="", size="auto", extra_body={"seed": 4, "temperature": 0.5}, response_format="b64_json"
    )
    want = native_images(http, "/sample", json={"model": "cond", "seed": 4, "temperature": 0.5})
    assert torch.equal(decoded(cold.data[0].b64_json), want[0])


def test_output_formats(client, http):
    want = native_images(http, "/sample", json={"model": "rgb", "seed": 3})[0]
    webp = client.images.generate(model="rgb", prompt="", output_format="webp", extra_body={"seed": 3})
    picture = Image.open(io.BytesIO(base64.b64decode(webp.data[0].b64_json)))
    assert picture.format == "WEBP" and webp.output_format == "webp"
    assert torch.equal(torch.from_numpy(np.asarray(picture.convert("RGB")).transpose(2, 0, 1).copy()), want)
    jpeg = client.images.generate(model="rgb", prompt="", output_format="jpeg", extra_body={"seed": 3})
    assert Image.open(io.BytesIO(base64.b64decode(jpeg.data[0].b64_json))).format == "JPEG"


def test_stream_sends_partial_images_then_the_completed_ones(client, http):
    events = list(
        client.images.generate(
            model="cond", prompt="Ankle boot", n=2, stream=True, partial_images=3, extra_body={"seed": 8}
        )
    )
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 6 + ["image_generation.completed"] * 2
    assert [event.partial_image_index for event in events[:6]] == [0, 0, 1, 1, 2, 2]
    final = native_images(http, "/sample", json={"model": "cond", "label": "ankle boot", "n": 2, "seed": 8})
    assert all(torch.equal(decoded(event.b64_json), want) for event, want in zip(events[6:], final))
    # partial i of 3 over 8 rows: rows 0..1, 0..3, 0..5 drawn (as the final image), the rest still black
    for index, drawn in enumerate((2, 4, 6)):
        for k in range(2):
            partial = decoded(events[2 * index + k].b64_json)
            assert torch.equal(partial[:, :drawn], final[k][:, :drawn])
            assert not partial[:, drawn:].any()


def test_stream_without_partial_images(client):
    events = list(client.images.generate(prompt="", stream=True, extra_body={"seed": 1}))
    assert [event.type for event in events] == ["image_generation.completed"]
    assert events[0].size == "8x8" and events[0].output_format == "png"


def test_leaving_a_stream_cancels_the_generation(client, http):
    def engine_stat(name: str) -> float:
        found = re.search(rf'^pixelcnn_engine_{name}_total{{model="tall"}} (\S+)$', http.get("/metrics").text, re.M)
        return float(found.group(1)) if found else 0.0

    cancelled = engine_stat("requests_cancelled")
    stream = client.images.generate(model="tall", prompt="", n=2, stream=True, partial_images=3, extra_body={"seed": 1})
    first = next(iter(stream))
    assert first.type == "image_generation.partial_image"
    stream.close()
    deadline = time.monotonic() + 20
    while engine_stat("requests_cancelled") <= cancelled:
        assert time.monotonic() < deadline, "the server did not cancel the abandoned stream"
        time.sleep(0.02)
    assert engine_stat("requests_completed") == 0


def test_edit_keeps_the_rows_above_the_mask_and_matches_complete(client, http):
    image = png_bytes(pattern())
    alpha = np.full((8, 8), 255, dtype=np.uint8)
    alpha[3:] = 0  # generate rows 3..7
    result = client.images.edit(
        image=("top.png", image), mask=("mask.png", rgba(alpha)), prompt="", n=2, extra_body={"seed": 6}
    )
    expected = native_images(http, "/complete", files={"image": image}, data={"rows": "3", "n": "2", "seed": "6"})
    for got, want in zip(result.data, expected):
        picture = decoded(got.b64_json)
        assert torch.equal(picture, want) and torch.equal(picture[:, :3], pattern()[:, :3])


def test_edit_with_a_mask_starting_mid_row_keeps_every_known_pixel(client, http, models):
    image = png_bytes(pattern())
    alpha = np.full((8, 8), 255, dtype=np.uint8)
    alpha.reshape(-1)[19:] = 0  # keep 19 pixels: rows 0-1 and columns 0-2 of row 2
    result = client.images.edit(
        image=("top.png", image), mask=("mask.png", rgba(alpha)), prompt="", n=3, extra_body={"seed": 4}
    )
    completed = native_images(http, "/complete", files={"image": image}, data={"pixels": "19", "n": "3", "seed": "4"})
    naive = sample_naive(models["gray"], 3, seed=4, known=pattern()[None], known_pixels=19).images
    kept = torch.from_numpy(alpha > 0)
    for k, got in enumerate(result.data):
        picture = decoded(got.b64_json)
        assert torch.equal(picture[:, kept], pattern()[:, kept]), "a kept pixel changed"
        assert torch.equal(picture, completed[k]) and torch.equal(picture, naive[k])
    assert not torch.equal(decoded(result.data[0].b64_json)[0, 2, 3:], pattern()[0, 2, 3:])  # the rest is drawn


def test_complete_takes_pixels_for_a_partial_row(http):
    image = {"image": png_bytes(pattern())}
    body = http.post("/complete", files=image, data={"pixels": "19", "seed": "4"}).json()
    assert body["known_rows"] == 2 and body["known_pixels"] == 19
    assert body["bits_per_dim"][0] == pytest.approx(-body["log_prob"][0] / (45 * math.log(2)))  # 64 - 19 drawn
    as_rows = http.post("/complete", files=image, data={"pixels": "24", "seed": "4"}).json()
    same = http.post("/complete", files=image, data={"rows": "3", "seed": "4"}).json()
    assert as_rows["images"] == same["images"] and same["known_pixels"] == 24
    for data, fragment in (
        ({"pixels": "64"}, "pixels must be between 0 and 63"),
        ({"pixels": "3", "rows": "1"}, "give rows (whole rows to keep) or pixels (pixels to keep), not both"),
        ({"pixels": "-1"}, "must be at least 0"),
    ):
        error = http.post("/complete", files=image, data=data).json()["error"]
        assert error["type"] == "invalid_request" and fragment in error["message"], error


def test_edit_uses_the_images_own_alpha_without_a_mask(client, http):
    rgba_image = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba_image[..., 0] = rgba_image[..., 1] = rgba_image[..., 2] = pattern()[0].numpy()
    rgba_image[..., 3] = 255
    rgba_image[5:, :, 3] = 0
    buffer = io.BytesIO()
    Image.fromarray(rgba_image, mode="RGBA").save(buffer, format="PNG")
    result = client.images.edit(image=("picture.png", buffer.getvalue()), prompt="", extra_body={"seed": 2})
    expected = native_images(http, "/complete", files={"image": buffer.getvalue()}, data={"rows": "5", "seed": "2"})
    assert torch.equal(decoded(result.data[0].b64_json), expected[0])


def test_edit_stream(client):
    alpha = np.full((8, 8), 255, dtype=np.uint8)
    alpha[4:] = 0
    events = list(
        client.images.edit(
            image=("top.png", png_bytes(pattern())),
            mask=("mask.png", rgba(alpha)),
            prompt="",
            stream=True,
            partial_images=1,
            extra_body={"seed": 3},
        )
    )
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    partial, final = decoded(events[0].b64_json), decoded(events[1].b64_json)
    assert torch.equal(partial[:, :4], pattern()[:, :4]) and torch.equal(final[:, :4], pattern()[:, :4])
    assert torch.equal(partial[:, :6], final[:, :6]) and not partial[:, 6:].any()


def test_models_in_openais_list_shape(client):
    listed = client.models.list()
    assert [model.id for model in listed.data] == ["cond", "gray", "rgb", "tall"]
    assert all(model.object == "model" and model.owned_by == "pixelcnn-server" for model in listed.data)
    assert client.models.retrieve("cond").id == "cond"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("dall-e-3")
    assert_openai_error(caught.value, 404, "model", "unknown model 'dall-e-3'", "cond, gray, rgb, tall")


def test_bad_generation_requests(client, http):
    cases = [
        (dict(prompt="", size="1024x1024"), "size", ['size must be "8x8"', "'1024x1024'"]),
        (dict(model="cond", prompt="unicorn"), "prompt", ["unknown label 'unicorn'", "'Sneaker'"]),
        (dict(prompt="sneaker"), "prompt", ["model 'gray' is unconditional: the prompt must be empty"]),
        (dict(prompt="", response_format="url"), "response_format", ['"url" is not supported', "b64_json"]),
        (dict(prompt="", n=1000), "n", ["n must be between 1 and"]),
        (dict(prompt="", partial_images=4, stream=True), "partial_images", ["between 0 and 3"]),
        (dict(prompt="", extra_body={"seed": -1}), "seed", ["between 0 and"]),
        (dict(prompt="", extra_body={"temperature": "hot"}), "temperature", ["must be a number"]),
        (dict(prompt="", extra_body={"colour": "red"}), "colour", ["unknown field"]),
        (dict(prompt="", output_format="gif"), "output_format", ["'png', 'jpeg' or 'webp'"]),
    ]
    for kwargs, param, fragments in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(**kwargs)
        assert_openai_error(caught.value, 400, param, *fragments)
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model="dall-e-3", prompt="")
    assert_openai_error(caught.value, 404, "model", "unknown model 'dall-e-3'")
    assert http.get("/ready").status_code == 200
    assert len(client.images.generate(prompt="", extra_body={"seed": 1}).data) == 1


def test_bad_masks_explain_which_masks_work(client, http):
    image = ("picture.png", png_bytes(pattern()))
    holes = np.full((8, 8), 255, dtype=np.uint8)
    holes[2:4, 2:4] = 0  # a hole in the middle: pixels after it are kept
    hole_and_suffix = np.full((8, 8), 255, dtype=np.uint8)
    hole_and_suffix[2, 2] = hole_and_suffix[6:] = 0  # transparent to the end, but with a hole before
    opaque = np.full((8, 8), 255, dtype=np.uint8)
    gray_mask = io.BytesIO()
    Image.new("L", (8, 8)).save(gray_mask, format="PNG")
    wrong_size = rgba(np.zeros((4, 4), dtype=np.uint8))
    cases = [
        (rgba(holes), ["not a raster-order suffix", "row 2, column 2", "row 2, column 4", "raster order"]),
        (rgba(hole_and_suffix), ["not a raster-order suffix", "row 2, column 2", "row 2, column 3"]),
        (rgba(opaque), ["no fully transparent pixel", "Possible masks"]),
        (gray_mask.getvalue(), ["has no alpha channel", "alpha 0"]),
        (wrong_size, ["4x4", "8x8"]),
    ]
    for mask, fragments in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.edit(image=image, mask=("mask.png", mask), prompt="")
        assert_openai_error(caught.value, 400, "mask", *fragments)
    with pytest.raises(openai.BadRequestError) as caught:  # no mask and an opaque image
        client.images.edit(image=image, prompt="")
    assert_openai_error(caught.value, 400, "image", "has no alpha channel")
    assert http.get("/ready").status_code == 200


def test_openai_errors_only_on_v1(http):
    unknown = http.post("/v1/images/variations", json={})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "invalid_request_error"
    assert http.post("/v1/images/generations", content=b"{").json()["error"]["param"] is None
    native = http.post("/sample", json={"n": 0}).json()["error"]
    assert native["type"] == "invalid_request" and native["field"] == "n"
    edit_json = http.post("/v1/images/edits", json={"prompt": ""})
    assert edit_json.status_code == 415 and "multipart/form-data" in edit_json.json()["error"]["message"]
