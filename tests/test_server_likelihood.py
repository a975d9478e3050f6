"""POST /likelihood over HTTP: values equal app.model's own likelihood functions on the same images."""

from __future__ import annotations

import base64
import math

import pytest
import torch

from app.imaging import png_bytes
from app.model import nll_nats, nll_per_subpixel
from tests.helpers import png_tensor, torch_threads

pytestmark = pytest.mark.anyio


def random_images(n: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def b64png(image: torch.Tensor) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def bits(nats: float, dims: int) -> float:
    return nats / (dims * math.log(2))


async def test_likelihood_json_equals_nll_nats(serve, models):
    x = random_images(3)
    async with serve() as (_, client):
        response = await client.post("/likelihood", json={"images": [b64png(i) for i in x]})
        assert response.status_code == 200, response.text
        body = response.json()
    with torch.no_grad(), torch_threads(1):
        expected = nll_nats(models["gray"], x.long())
    assert body["model"] == "gray" and len(body["results"]) == 3
    for result, nats in zip(body["results"], expected.tolist()):
        assert result["nll_nats"] == pytest.approx(nats, rel=1e-5)
        assert result["bits_per_dim"] == pytest.approx(bits(result["nll_nats"], 64))
        assert result["label"] is None and result["label_name"] is None
        assert "class_probabilities" not in result and "per_pixel_nll" not in result


async def test_base64_wrapped_in_lines_is_taken(serve):
    """What `base64 picture.png` and base64.encodebytes give: lines of 76 characters."""
    x = random_images(1)
    async with serve() as (_, client):
        one_line = await client.post("/likelihood", json={"image": b64png(x[0])})
        wrapped = await client.post("/likelihood", json={"image": base64.encodebytes(png_bytes(x[0])).decode()})
        assert wrapped.status_code == 200, wrapped.text
        assert wrapped.json()["results"] == one_line.json()["results"]


async def test_likelihood_multipart_repeated_images_keep_order(serve):
    x = random_images(3, seed=1)
    async with serve() as (_, client):
        files = [("image", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(x)]
        together = (await client.post("/likelihood", files=files)).json()["results"]
        alone = [
            (await client.post("/likelihood", files={"image": ("a.png", png_bytes(image), "image/png")})).json()
            for image in x
        ]
    assert [r["nll_nats"] for r in together] == pytest.approx([a["results"][0]["nll_nats"] for a in alone], rel=1e-5)


async def test_conditional_with_label(serve, models):
    x = random_images(2, seed=2)
    async with serve() as (_, client):
        body = (
            await client.post(
                "/likelihood",
                data={"model": "cond", "label": "ankle boot"},
                files=[("image", ("a.png", png_bytes(i), "image/png")) for i in x],
            )
        ).json()
    with torch.no_grad(), torch_threads(1):
        expected = nll_nats(models["cond"], x.long(), torch.tensor([2, 2]))
    for result, nats in zip(body["results"], expected.tolist()):
        assert result["nll_nats"] == pytest.approx(nats, rel=1e-5)
        assert result["label"] == 2 and result["label_name"] == "Ankle boot"
        assert "class_probabilities" not in result


async def test_conditional_without_label_is_the_marginal(serve, models):
    x = random_images(2, seed=3)
    async with serve() as (_, client):
        body = (await client.post("/likelihood", json={"model": "cond", "images": [b64png(i) for i in x]})).json()
    with torch.no_grad(), torch_threads(1):  # one pass per class, the marginal written out
        per_class = torch.stack([nll_nats(models["cond"], x.long(), torch.full((2,), y)) for y in range(3)], dim=1)
    for i, result in enumerate(body["results"]):
        nlls = per_class[i].tolist()  # -log p(x|y); p(x) = mean over y of p(x|y) (uniform prior)
        best = min(nlls)
        marginal = best - math.log(sum(math.exp(best - nll) for nll in nlls) / len(nlls))
        assert result["nll_nats"] == pytest.approx(marginal, rel=1e-5)
        probabilities = result["class_probabilities"]
        assert list(probabilities) == ["T-shirt/top", "Sneaker", "Ankle boot"]
        assert sum(probabilities.values()) == pytest.approx(1.0)
        expected = torch.softmax(-per_class[i].double(), 0).tolist()  # Bayes with a uniform prior
        assert list(probabilities.values()) == pytest.approx(expected, rel=1e-4)
        best = int(per_class[i].argmin())
        assert result["label"] == best and result["label_name"] == ["T-shirt/top", "Sneaker", "Ankle boot"][best]


async def test_per_pixel_and_heatmap(serve, models):
    gray, rgb = random_images(1, seed=4), random_images(1, 3, seed=5)
    async with serve() as (_, client):
        g = (await client.post("/likelihood", json={"images": [b64png(gray[0])], "per_pixel": True})).json()
        c = (
            await client.post(
                "/likelihood",
                data={"model": "rgb", "per_pixel": "true"},
                files={"image": ("c.png", png_bytes(rgb[0]), "image/png")},
            )
        ).json()
    result = g["results"][0]
    per_pixel = torch.tensor(result["per_pixel_nll"], dtype=torch.float64)
    assert per_pixel.shape == (8, 8)  # H x W for grayscale
    assert float(per_pixel.sum()) == pytest.approx(result["nll_nats"], rel=1e-4)
    with torch.no_grad(), torch_threads(1):
        expected = nll_per_subpixel(models["gray"](gray.long()), gray.long())[0, 0]
    assert torch.allclose(per_pixel, expected.double(), atol=1e-4)
    heatmap = png_tensor(result["heatmap_png"])
    assert heatmap.shape == (3, 8, 8)
    peak = divmod(int(per_pixel.argmax()), 8)
    assert heatmap[:, peak[0], peak[1]].tolist() == [255, 255, 255]  # the most surprising pixel is white

    rgb_result = c["results"][0]
    assert torch.tensor(rgb_result["per_pixel_nll"]).shape == (3, 8, 8)  # C x H x W for RGB
    assert float(torch.tensor(rgb_result["per_pixel_nll"]).sum()) == pytest.approx(rgb_result["nll_nats"], rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, fragments, field",
    [
        ({"json": {}}, ["no image given"], "image"),
        ({"json": {"images": []}}, ["no image given"], "image"),
        ({"json": {"images": "abc"}}, ["images must be a list of base64 strings"], "images"),
        ({"json": {"images": ["@@@"]}}, ["images[0] is not valid base64"], "images[0]"),
        (
            {"json": {"images": [b64png(random_images(1)[0]), base64.b64encode(b"nope").decode()]}},
            ["images[1]: could not read the image"],
            "images[1]",
        ),
        (
            {"json": {"images": [b64png(torch.zeros(1, 5, 7, dtype=torch.uint8))]}},
            ["image is 7x5 (WxH), the model expects 8x8"],
            "image",
        ),
        ({"json": {"images": [b64png(random_images(1)[0])], "label": 0}}, ["model 'gray' is unconditional"], "label"),
        (
            {"json": {"model": "cond", "images": [b64png(random_images(1)[0])], "label": "dog"}},
            ["unknown label 'dog'", "'Sneaker'"],
            "label",
        ),
        (
            {"json": {"model": "cond", "images": [b64png(random_images(1)[0])], "label": [0, 1]}},
            ["got 2 labels for 1 images"],
            "label",
        ),
        ({"json": {"images": [b64png(random_images(1)[0])], "per_pixel": "maybe"}}, ["per_pixel:"], "per_pixel"),
        ({"json": {"images": [b64png(random_images(1)[0])] * 3}}, ["3 images given, at most 2 per request"], "images"),
    ],
)
async def test_likelihood_input_errors(serve, kwargs, fragments, field):
    async with serve(max_images_per_request=2) as (_, client):
        response = await client.post("/likelihood", **kwargs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and error.get("field") == field
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"])


async def test_likelihood_queue_full_maps_to_503(serve):
    from app.engine import QueueFullError

    async with serve() as (app, client):

        async def full(*args, **kwargs):
            raise QueueFullError("busy")

        app.state.registry.models["gray"].engine.likelihood = full
        response = await client.post("/likelihood", json={"images": [b64png(random_images(1)[0])]})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "overloaded"


async def test_an_image_mode_pil_cannot_convert_is_a_400_not_a_500(serve):
    """Found by tests/test_image_decoding_fuzz.py: a LAB TIFF used to escape as a ValueError (500)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).convert("LAB").save(buffer, format="TIFF")
    async with serve() as (_, client):
        response = await client.post("/likelihood", files={"image": ("x.tif", buffer.getvalue(), "image/tiff")})
    assert response.status_code == 400
    assert "could not use a LAB image" in response.json()["error"]["message"]
